"""The Pacemaker agent as Pacemaker really runs it: as ``hacluster``, with the spool the
README's install makes, and with the spools people make by mistake."""

from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path

from tests.ha_agent import AGENT_GROUP, agent_bin, as_agent_user, lab_dir

__all__ = ["agent_bin", "lab_dir"]  # fixtures

ALERT = {
    "CRM_alert_kind": "node",
    "CRM_alert_node": "pcmk2",
    "CRM_alert_nodeid": "2",
    "CRM_alert_desc": "lost",
    "CRM_alert_recipient": "ops",
    "CRM_alert_node_sequence": "1",
    "CRM_alert_timestamp_epoch": "1795792808",
    "CRM_alert_timestamp_usec": "671327",
    "CRM_alert_version": "2.1.5",
}


def run_agent(bin_dir: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_agent_user(str(bin_dir / "clusteralert-pacemaker-alert")),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CLUSTERALERT_CONFIG": str(config), **ALERT},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_spool_the_agent_cannot_write_is_one_line_naming_the_fix(
    lab_dir: Path, agent_bin: Path
) -> None:
    spool = lab_dir / "spool"
    spool.mkdir()
    spool.chmod(0o2770)  # root:root 2770: made by hand as root, group not haclient
    config = lab_dir / "c.toml"
    config.write_text(f'[producer]\nspool_dir = "{spool}"\ncluster = "c"\n')
    config.chmod(0o644)

    refused = run_agent(agent_bin, config)
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1, refused.stderr
    assert str(spool) in lines[0]
    assert f"chgrp {AGENT_GROUP} {spool}" in lines[0]
    assert list(spool.iterdir()) == []

    # The fix the line names works.
    os.chown(spool, -1, grp.getgrnam(AGENT_GROUP).gr_gid)
    accepted = run_agent(agent_bin, config)
    assert (accepted.returncode, accepted.stderr) == (0, "")
    assert len(list(spool.glob("0*.json"))) == 1
