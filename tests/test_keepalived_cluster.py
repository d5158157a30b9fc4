"""The keepalived notify script run by a real keepalived (Debian's) in a network-and-mount
namespace, VRRP over a veth pair that exists only inside it: instances become MASTER, a
reload removes one with ``notify_deleted`` and one without, and keepalived stops. A
wrapper records every notify call, and the spool is checked against those records.

Marked ``cluster`` like the Pacemaker test (root, Debian packages).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.sources import KEEPALIVED_EVENTS
from tests.conftest import BIN
from tests.ha_agent import lab_dir
from tests.netns import Namespace
from tests.waiting import wait_until

__all__ = ["lab_dir"]  # fixture

pytestmark = pytest.mark.cluster

INSTANCE = """\
vrrp_instance {name} {{
    state {state}
    interface lab0
    virtual_router_id {vrid}
    priority {priority}
    advert_int 1
    virtual_ipaddress {{
        10.214.0.{vrid}/24
    }}
{extra}    notify {notify}
}}
"""


def keepalived_conf(notify: Path, *, with_removed: bool) -> str:
    parts = ["global_defs {\n    router_id lab\n    script_user root\n}\n"]
    parts.append(INSTANCE.format(name="VI_1", state="MASTER", vrid=51, priority=150,
                                 extra="", notify=notify))  # fmt: skip
    if with_removed:
        # Reported as DELETED when removed by a reload; VI_3, without, as FAULT.
        parts.append(INSTANCE.format(name="VI_2", state="BACKUP", vrid=52, priority=100,
                                     extra="    notify_deleted\n", notify=notify))  # fmt: skip
        parts.append(INSTANCE.format(name="VI_3", state="BACKUP", vrid=53, priority=100,
                                     extra="", notify=notify))  # fmt: skip
    return "".join(parts)


@pytest.fixture
def namespace(lab_dir: Path) -> Iterator[Namespace]:
    run = lab_dir / "run"
    run.mkdir()
    ns = Namespace("keepalived", {"/run": run})
    try:
        ns.run("ip", "link", "add", "lab0", "type", "veth", "peer", "name", "lab1")
        ns.run("ip", "addr", "add", "10.214.0.1/24", "dev", "lab0")
        for dev in ("lab0", "lab1"):
            ns.run("ip", "link", "set", dev, "up")
        yield ns
    finally:
        ns.close()


def test_keepalived_notify_calls_become_one_event_each(lab_dir: Path, namespace: Namespace) -> None:
    spool = lab_dir / "spool"
    config = lab_dir / "clusteralert.toml"
    config.write_text(f'[producer]\nspool_dir = "{spool}"\ncluster = "lab"\nnode = "lb1"\n')
    calls = lab_dir / "calls"
    notify = lab_dir / "notify"
    notify.write_text(
        textwrap.dedent(f"""\
            #!/bin/sh
            CLUSTERALERT_CONFIG={config} {BIN / "clusteralert-producer"} keepalived "$@" \\
                > /dev/null 2>> {lab_dir / "notify.err"}
            echo "$? $*" >> {calls}
            """)
    )
    notify.chmod(0o755)
    conf = lab_dir / "keepalived.conf"
    conf.write_text(keepalived_conf(notify, with_removed=True))

    def called() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    pid = namespace.start(
        "keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp",
        "--use-file", str(conf), "--pid", str(lab_dir / "keepalived.pid"),
        "--vrrp_pid", str(lab_dir / "vrrp.pid"),
        log=lab_dir / "keepalived.log",
    )  # fmt: skip
    try:
        masters = {f"0 INSTANCE VI_{i} MASTER" for i in (1, 2, 3)}
        wait_until(
            lambda: masters <= {" ".join(c.split()[:4]) for c in called()}, 120, "three MASTERs"
        )
        conf.write_text(keepalived_conf(notify, with_removed=False))
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: len([c for c in called() if " VI_2 " in c or " VI_3 " in c]) >= 6,
                   120, "VI_2 and VI_3 removed")  # fmt: skip
    finally:
        namespace.stop(pid, 60)
    wait_until(lambda: any(" VI_1 STOP " in c for c in called()), 30, "VI_1 stopped")

    lines = called()
    print("\n".join(lines))
    assert all(line.startswith("0 ") for line in lines), (
        lines,
        (lab_dir / "notify.err").read_text(),
    )
    events = [json.loads(p.read_text()) for p in sorted(spool.glob("0*.json"))]
    # One event per call (calls may run in parallel: compared in any order).
    assert sorted((e["params"]["name"], e["params"]["state"]) for e in events) == sorted(
        (line.split()[2], line.split()[3]) for line in lines
    )
    by_call = {(e["params"]["name"], e["params"]["state"]): e for e in events}
    # What keepalived 2.2 really sends when a reload removes an instance: DELETED with
    # notify_deleted, FAULT (indistinguishable from a real fault) without it; no STOP.
    assert ("VI_2", "STOP") not in by_call and ("VI_3", "STOP") not in by_call
    deleted = by_call["VI_2", "DELETED"]
    assert (deleted["event_id"], deleted["level"]) == (KEEPALIVED_EVENTS["DELETED"], "warning")
    assert by_call["VI_3", "FAULT"]["level"] == "error"
    assert by_call["VI_1", "STOP"]["event_id"] == KEEPALIVED_EVENTS["STOP"]
    assert {e["node"] for e in events} == {"lb1"}
