"""Spool discipline: bounds, claims between concurrent forwarders, orphaned claims and
half-written files, and the status report."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from producer.spool import Spool
from shared.errors import SpoolError
from shared.event import Event, encode_event, new_event
from tests.conftest import BIN
from tests.waiting import wait_until


def event(i: int = 0) -> Event:
    return new_event(module="rm", event_id=i, cluster="c", node="n", source="t")


def emit(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "clusteralert-producer"), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_full_spool_makes_emit_fail_loudly(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[producer]\nspool_dir = "{tmp_path / "spool"}"\nmax_events = 3\n')
    for i in range(3):
        assert emit(config, "emit", "--module", "rm", "--event-id", str(i)).returncode == 0
    full = emit(config, "emit", "--module", "rm", "--event-id", "9")
    assert full.returncode == 1
    assert full.stdout == ""
    assert "is full: 3 events waiting (max_events = 3)" in full.stderr
    assert full.stderr.count("\n") == 1
    assert len(list((tmp_path / "spool").glob("0*.json"))) == 3


def test_max_bytes_bounds_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=600)
    spool.write(event(1))
    try:
        for i in range(10):
            spool.write(event(i))
    except Exception as exc:
        assert "max_bytes = 600" in str(exc)
    else:
        raise AssertionError("the spool never filled up")
    assert spool.stats().bytes <= 600


def test_claims_are_exclusive_and_orphans_come_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.write(event())
    first, second = spool.new_claim(), spool.new_claim()
    claimed = first.take(path)
    assert claimed is not None and claimed.exists() and not path.exists()
    assert second.take(path) is None  # already taken
    assert spool.release_orphaned_claims() == 0  # its owner is alive
    assert spool.stats().events == 1  # a claimed event still counts as waiting
    # Simulate a forwarder that died: its lock is released without giving files back.
    os.close(first._lock_fd)
    assert spool.release_orphaned_claims() == 1
    assert path.exists()
    second.close()


def test_half_written_files_are_recovered_or_set_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    good = event()
    complete = spool.directory / f".tmp-00000000000000000001-{good.id}.json"
    complete.write_bytes(encode_event(good))
    torn = spool.directory / ".tmp-00000000000000000002-x.json"
    torn.write_bytes(b'{"v":1,"id":"')
    fresh = spool.directory / ".tmp-00000000000000000003-y.json"
    fresh.write_bytes(b"{")
    old = time.time() - 3600
    for path in (complete, torn):
        os.utime(path, (old, old))
    done = dict((p.name, what) for p, what in spool.recover_stale_tmp())
    assert done == {
        f"00000000000000000001-{good.id}.json": "recovered an event whose writer died",
        torn.name: "set aside a half-written event",
    }
    assert [p.name for p in spool.pending()] == [f"00000000000000000001-{good.id}.json"]
    assert (spool.directory / "rejected" / torn.name).exists()
    assert fresh.exists()  # a writer may still be busy with it


def test_status_reports_depth_age_and_last_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[producer]\nspool_dir = "{tmp_path / "spool"}"\n')
    assert emit(config, "emit", "--module", "rm", "--event-id", "1").returncode == 0
    Spool(tmp_path / "spool").write_status(
        {
            "connected": False,
            "published": 0,
            "last_error": "broker unreachable",
            "last_error_time": time.time(),
        }
    )
    result = emit(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["events"] == 1 and report["bytes"] > 0
    assert 0 <= report["oldest_age_seconds"] < 60
    assert report["last_error"] == "broker unreachable"
    text = emit(config, "status")
    assert "events waiting: 1" in text.stdout and "broker unreachable" in text.stdout


def _fail_rename_into(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, before: Callable[[], object]
) -> None:
    """The next rename of a temp file into ``spool`` fails with ENOSPC, after ``before``."""
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == spool.directory and Path(src).name.startswith(".tmp-"):
            monkeypatch.setattr(os, "rename", real_rename)
            before()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_a_failed_write_once_leaves_no_marker_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pacemaker's next recipient run must spool the alert the failed run could not."""
    spool = Spool(tmp_path / "spool")
    alert = event(22)
    _fail_rename_into(spool, monkeypatch, lambda: None)
    with pytest.raises(SpoolError, match="disk is full"):
        spool.write_once(alert)
    assert not list(spool.pending())
    written = spool.write_once(alert)
    assert written is not None
    assert [p.name for p in spool.pending()] == [written.name]
    assert spool.write_once(alert) is None  # and only once


def test_a_run_that_finds_the_marker_waits_for_the_first_writer_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second run sees the marker while the first is still writing, and the first
    then fails: the second must not report "already spooled" and spool nothing."""
    spool = Spool(tmp_path / "spool")
    alert = event(22)
    second_waits = threading.Event()
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_SH:
            second_waits.set()
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    # The first run fails only once the second one found its marker (or gave up).
    _fail_rename_into(spool, monkeypatch, lambda: second_waits.wait(10))
    outcome: dict[str, object] = {}

    def first() -> None:
        try:
            spool.write_once(alert)
        except SpoolError as exc:
            outcome["first"] = exc

    def second() -> None:
        # Only once the first run holds the marker.
        wait_until((spool.directory / ".seen" / alert.id).exists, 10, "the marker")
        outcome["second"] = spool.write_once(alert)
        second_waits.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert isinstance(outcome["first"], SpoolError)
    assert isinstance(outcome["second"], Path)
    assert [p.name for p in spool.pending()] == [outcome["second"].name]


FAULT_INJECTION = """
import errno, os
_real_rename = os.rename
def _rename(src, dst, *args, **kwargs):
    if os.path.basename(str(src)).startswith(".tmp-"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _real_rename(src, dst, *args, **kwargs)
os.rename = _rename
"""


def test_the_pacemaker_agent_after_a_failed_run_still_spools_the_alert(tmp_path: Path) -> None:
    """Real processes: the first recipient's run hits a full disk (injected into that
    process alone), the next recipient's run must spool the alert."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sitecustomize.py").write_text(FAULT_INJECTION)
    config = tmp_path / "c.toml"
    config.write_text(f'[producer]\nspool_dir = "{tmp_path / "spool"}"\n')
    alert = {
        "CLUSTERALERT_CONFIG": str(config),
        "CRM_alert_kind": "fencing",
        "CRM_alert_node": "node2",
        "CRM_alert_rc": "1",
        "CRM_alert_desc": "Operation reboot of node2 failed",
        "CRM_alert_timestamp_epoch": "1700000000",
    }

    def run(recipient: str, **extra: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **alert, "CRM_alert_recipient": recipient, **extra}
        return subprocess.run(
            [str(BIN / "clusteralert-pacemaker-alert")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    failed = run("a@example.com", PYTHONPATH=str(faults))
    assert failed.returncode == 1
    assert "disk is full" in failed.stderr and failed.stderr.count("\n") == 1
    assert not list((tmp_path / "spool").glob("0*.json"))
    second = run("b@example.com")
    assert second.returncode == 0, second.stderr
    spooled = list((tmp_path / "spool").glob("0*.json"))
    assert len(spooled) == 1 and second.stdout.strip() in spooled[0].name


def test_the_status_file_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    """The agent may run as root: a link planted where it writes its status must not
    let anyone in the spool's group overwrite another file, or read one through it."""
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in (".forwarder-status.tmp", ".forwarder-status"):
        (spool.directory / name).symlink_to(victim)
    assert spool.read_status() == {}  # a link is not the status
    spool.write_status({"connected": True})
    assert victim.read_text() == "precious\n"
    status = spool.directory / ".forwarder-status"
    assert not status.is_symlink()
    assert spool.read_status() == {"connected": True}
    victim.write_text('{"last_error": "planted"}')
    (spool.directory / ".forwarder-status").unlink()
    (spool.directory / ".forwarder-status").symlink_to(victim)
    assert spool.read_status() == {}


@pytest.mark.parametrize("name", ["rejected", ".seen", "claims"])
def test_a_spool_directory_replaced_by_a_link_is_never_used(tmp_path: Path, name: str) -> None:
    """Anyone in the spool's group may swap one of its directories for a link elsewhere:
    the agent (maybe root) must not move, link or create files there."""
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (spool.directory / name).symlink_to(elsewhere)
    path = spool.write(event(1))
    with pytest.raises((SpoolError, OSError)):
        if name == "rejected":
            spool.reject(path)
        elif name == ".seen":
            spool.write_once(event(2))
        else:
            spool.new_claim()
    assert list(elsewhere.iterdir()) == []
    assert [p.name for p in spool.pending()] == [path.name]
