"""``clusteralert-producer emit`` as users run it: a real process, a real spool."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import BIN

# A group the test runner (root) is not in, standing for the agent's.
AGENT_GID = grp.getgrnam("nogroup").gr_gid


def emit(tmp_path: Path, *args: str, spool: Path | None = None) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "producer.toml"
    spool = spool or tmp_path / "spool"
    config.write_text(f'[producer]\nspool_dir = "{spool}"\ncluster = "prod"\n')
    return subprocess.run(
        [str(BIN / "clusteralert-producer"), "emit", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_emit_spools_a_durable_event_and_prints_its_id(tmp_path: Path) -> None:
    result = emit(
        tmp_path,
        "--module",
        "rm",
        "--event-id",
        "9",
        "--level",
        "error",
        "--node",
        "n1",
        "--param",
        "monitor=httpw",
        "detail=a=b",
        "--param",
        "x=line1\nline2",
    )
    assert result.returncode == 0, result.stderr
    event_id = result.stdout.strip()
    uuid.UUID(event_id)
    [spooled] = (tmp_path / "spool").glob("*.json")
    assert spooled.name.endswith(f"-{event_id}.json")
    doc = json.loads(spooled.read_bytes())
    assert doc["id"] == event_id and doc["cluster"] == "prod" and doc["node"] == "n1"
    assert doc["params"] == {"monitor": "httpw", "detail": "a=b", "x": "line1\\nline2"}
    assert doc["source"] == "cli"
    assert not list((tmp_path / "spool").glob(".tmp-*"))


def test_emit_rejects_bad_input_with_one_line(tmp_path: Path) -> None:
    for args, reason in [
        (("--module", "Bad Module", "--event-id", "1"), "module: 'Bad Module' must match"),
        (("--module", "rm", "--event-id", "1", "--param", "novalue"), "expected KEY=VALUE"),
        (
            ("--module", "rm", "--event-id", "1", "--param", "a=1", "--param", "a=2"),
            "--param 'a' given twice, with different values",
        ),
        (("--module", "rm", "--event-id", "-3"), "event_id: expected an integer from 0"),
        # Only workers send the pipeline's canary and probe.
        (
            ("--module", "clusteralert", "--event-id", "2"),
            "clusteralert:2 is the pipeline's canary",
        ),
        (("--module", "clusteralert", "--event-id", "3"), "clusteralert:3 is the pipeline's probe"),
    ]:
        result = emit(tmp_path, *args)
        assert result.returncode == 1, args
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and reason in result.stderr, result.stderr
    assert not list((tmp_path / "spool").glob("*.json"))


def test_emit_reports_an_unwritable_spool(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = emit(tmp_path, "--module", "rm", "--event-id", "1", spool=blocker / "spool")
    assert result.returncode == 1
    assert result.stderr.startswith("clusteralert-producer: cannot create spool")
    assert result.stderr.count("\n") == 1


def test_emit_does_not_import_broker_clients(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[producer]\nspool_dir = "{tmp_path / "spool"}"\n')
    code = (
        "import sys\n"
        "from producer.cli import main\n"
        f"rc = main(['emit', '--config', {str(config)!r}, '--module', 'rm', '--event-id', '1'])\n"
        "heavy = sorted(m for m in ('pika', 'kombu', 'aiosmtplib', 'prometheus_client', "
        "'tenacity', 'asyncio', 'ssl') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.splitlines()[-1] == "0 []", result.stdout + result.stderr


def test_spool_write_is_durable_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync the file, then rename it into place, then fsync the directory."""
    import os

    from producer.spool import Spool
    from shared.event import new_event

    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        kind = "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        calls.append(f"fsync {kind}")
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        calls.append("rename")
        real_rename(src, dst)

    spool = Spool(tmp_path / "spool")
    spool.ensure()
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    spool.write(new_event(module="rm", event_id=1, cluster="c", node="n", source="t"))
    assert calls == ["fsync file", "rename", "fsync dir"]


def test_emit_writes_files_the_agent_can_read_whatever_the_umask(tmp_path: Path) -> None:
    """Run by root with umask 077, into a spool without its setgid bit: the file must
    still be 0640 and belong to the spool's group, which the agent reads through."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o770)
    os.chown(spool, -1, AGENT_GID)
    os.chmod(spool, 0o770)  # noqa: S103 - no setgid bit, on purpose
    config = tmp_path / "producer.toml"
    config.write_text(f'[producer]\nspool_dir = "{spool}"\n')
    result = subprocess.run(
        [
            BIN / "clusteralert-producer",
            "emit",
            "--config",
            config,
            "--module",
            "rm",
            "--event-id",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        umask=0o077,
    )
    assert result.returncode == 0, result.stderr
    (spooled,) = spool.glob("0*.json")
    info = spooled.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, AGENT_GID)


@pytest.mark.parametrize("command", ["clusteralert-producer", "clusteralert-worker"])
def test_version_is_the_installed_packages(command: str) -> None:
    from importlib.metadata import version

    result = subprocess.run(
        [str(BIN / command), "--version"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{command} {version('clusteralert')}\n"
