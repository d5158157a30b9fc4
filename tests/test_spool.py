"""Spool discipline: bounds, claims between concurrent forwarders, orphaned claims and
half-written files, and the status report."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from producer.spool import Spool
from shared.errors import InvalidEvent, SpoolError
from shared.event import MAX_EVENT_BYTES, Event, encode_event, new_event
from tests.conftest import BIN, Process, free_port
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


def test_status_reports_depth_age_the_agents_last_real_error_and_when_it_is_gone(
    tmp_path: Path, processes: Callable[..., Process]
) -> None:
    # The agent itself meets a real failure: nothing listens on the broker's port. The
    # status command must report what that agent wrote, not a file the test made up.
    dead_port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[broker]\nurls = ["amqp://guest:guest@127.0.0.1:{dead_port}/"]\n'
        f'[producer]\nspool_dir = "{tmp_path / "spool"}"\n'
    )
    assert emit(config, "emit", "--module", "rm", "--event-id", "1").returncode == 0
    agent = processes("clusteralert-producer", "run", "--config", str(config))

    def report() -> dict[str, object] | None:
        result = emit(config, "status", "--json")
        assert result.returncode == 0, result.stderr
        doc: dict[str, object] = json.loads(result.stdout)
        return doc if doc["last_error"] else None

    doc = wait_until(report, 30, "the agent to report its broker failure")
    assert doc["events"] == 1 and isinstance(doc["bytes"], int) and doc["bytes"] > 0
    assert isinstance(doc["oldest_age_seconds"], float) and 0 <= doc["oldest_age_seconds"] < 60
    assert doc["forwarder_connected"] is False
    assert doc["forwarders_running"] == 1
    assert f"127.0.0.1:{dead_port}" in str(doc["last_error"])
    assert str(doc["last_error"]).endswith("unreachable: Connection refused")
    assert isinstance(doc["last_error_time"], float)
    assert abs(time.time() - doc["last_error_time"]) < 60
    text = emit(config, "status").stdout
    assert "events waiting: 1" in text and "not connected" in text
    assert f"127.0.0.1:{dead_port}" in text
    # One line of its own per failed attempt, not pika's five with object reprs.
    assert "AMQPConnectionWorkflowFailed" not in agent.output()
    assert "unreachable: Connection refused" in agent.output()
    # Once the agent is gone, status says so, not what it last wrote.
    assert agent.stop() == 0
    doc = json.loads(emit(config, "status", "--json").stdout)
    assert doc["forwarders_running"] == 0 and doc["forwarder_connected"] is False
    text = emit(config, "status").stdout
    assert "forwarder:      not running" in text and "events waiting: 1" in text


def test_status_of_a_spool_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.write_text("not a directory")
    config = tmp_path / "c.toml"
    config.write_text(f'[producer]\nspool_dir = "{spool}"\n')
    result = emit(config, "status")
    assert result.returncode == 1
    assert result.stderr == (f"clusteralert-producer: cannot read spool {spool}: Not a directory\n")


def test_max_events_and_max_bytes_0_mean_unbounded(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    Spool(spool_dir).write(event(0))
    # More than the default bound (10000) already waiting, made cheaply as hard links
    # (10000 separate writes take seconds on some disks).
    first = next(spool_dir.glob("0*.json"))
    for i in range(1, 10_001):
        os.link(first, spool_dir / f"{i + 1:020d}-{uuid.uuid4()}.json")
    bounded = tmp_path / "bounded.toml"
    bounded.write_text(f'[producer]\nspool_dir = "{spool_dir}"\n')
    full = emit(bounded, "emit", "--module", "rm", "--event-id", "1")
    assert full.returncode == 1 and "is full" in full.stderr  # the default bound holds
    unbounded = tmp_path / "unbounded.toml"
    unbounded.write_text(f'[producer]\nspool_dir = "{spool_dir}"\nmax_events = 0\nmax_bytes = 0\n')
    result = emit(unbounded, "emit", "--module", "rm", "--event-id", "1")
    assert result.returncode == 0, result.stderr
    assert Spool(spool_dir).stats().events == 10_002


def test_a_new_spool_directory_is_group_writable_and_setgid(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    spool_dir = tmp_path / "state" / "spool"
    config.write_text(f'[producer]\nspool_dir = "{spool_dir}"\n')
    old = os.umask(0o022)  # a typical service umask must not strip the group bits
    try:
        assert emit(config, "emit", "--module", "rm", "--event-id", "1").returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o2770


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


def test_the_bounds_are_reached_not_passed_and_the_refusal_names_them(tmp_path: Path) -> None:
    # Events of one size: the same digits, and a time with its microseconds.
    when = datetime(2026, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC)
    events = [
        new_event(module="rm", event_id=i, cluster="c", node="n", source="t", time=when)
        for i in range(1, 4)
    ]
    size = len(encode_event(events[0]))
    assert {len(encode_event(e)) for e in events} == {size}
    for name, spool in (
        ("max_events = 2", Spool(tmp_path / "by-count", max_events=2)),
        (f"max_bytes = {2 * size}", Spool(tmp_path / "by-size", max_bytes=2 * size)),
    ):
        spool.write(events[0])
        spool.write(events[1])  # exactly at the bound: still taken
        with pytest.raises(SpoolError) as refused:
            spool.write(events[2])
        assert f"spool {spool.directory} is full" in str(refused.value)
        assert f"({name}); is the forwarder running?" in str(refused.value)
        assert spool.stats().events == 2


def test_stats_count_claimed_events_and_nothing_else(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    paths = [spool.write(event(i)) for i in range(3)]
    sizes = sum(p.stat().st_size for p in paths)
    # Beside the events: a writer's temp file, other files and a directory, more of them
    # than events, so that a scan that stopped at the first would miss some events.
    (spool.directory / f".tmp-{paths[0].name}").write_bytes(b"x" * 1000)
    for i in range(20):
        (spool.directory / f"note{i}").write_text("x")
    claim = spool.new_claim()
    assert claim.take(paths[0]) is not None  # the oldest, now in a claim directory
    stats = spool.stats()
    assert (stats.events, stats.bytes) == (3, sizes)
    assert stats.oldest_ns == int(paths[0].name.partition("-")[0])
    assert spool.stats(with_bytes=False) == type(stats)(3, 0, stats.oldest_ns)
    claim.close()


def test_a_closed_claim_gives_back_what_it_holds_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    paths = [spool.write(event(i)) for i in range(2)]
    claim = spool.new_claim()
    for path in paths:
        assert claim.take(path) is not None
    assert list(spool.pending()) == []
    claim.close()
    assert list(spool.pending()) == paths
    assert list(spool.claims_dir.iterdir()) == []  # no claim directory, no lock file


def test_orphans_of_dead_forwarders_come_back_and_a_live_own_claim_stays(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    paths = [spool.write(event(i)) for i in range(5)]
    dead = [spool.new_claim() for _ in range(2)]
    own = spool.new_claim()
    for claim, path in zip([*dead, dead[1], own, own], paths, strict=True):
        assert claim.take(path) is not None
    for claim in dead:
        os.close(claim._lock_fd)  # died without giving anything back
    # Its own claim is passed over even though this process could take its lock.
    assert spool.release_orphaned_claims(own=own) == 3
    assert list(spool.pending()) == paths[:3]
    assert sorted(p.name for p in spool.claims_dir.iterdir()) == sorted(
        [own.directory.name, f"{own.directory.name}.lock"]
    )
    own.close()


def test_read_event_takes_a_file_up_to_the_limit_and_refuses_what_cannot_be_one(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    largest = spool.directory / "largest.json"
    largest.write_bytes(b"{" + b"x" * (MAX_EVENT_BYTES - 2) + b"}")
    assert spool.read_event(largest) == largest.read_bytes()
    too_large = spool.directory / "too-large.json"
    too_large.write_bytes(b"x" * (MAX_EVENT_BYTES + 1))
    link = spool.directory / "link.json"
    link.symlink_to(largest)
    directory = spool.directory / "dir.json"
    directory.mkdir()
    for path, why in (
        (too_large, f"{MAX_EVENT_BYTES + 1} bytes, larger than any event ({MAX_EVENT_BYTES})"),
        (link, "a symbolic link, not followed"),
        (directory, "not a regular file"),
    ):
        with pytest.raises(InvalidEvent) as refused:
            spool.read_event(path)
        assert str(refused.value) == why
    with pytest.raises(FileNotFoundError):
        spool.read_event(spool.directory / "gone.json")


def test_a_spool_made_in_process_is_setgid_shared_and_its_files_0640(tmp_path: Path) -> None:
    """As the emit test above, in-process, so that mutation testing sees it; also the
    mode of a spooled file and of a directory that existed already (left as it is)."""
    spool = Spool(tmp_path / "state" / "spool")
    old = os.umask(0o077)  # the strictest umask: the spool's modes must not depend on it
    try:
        path = spool.write(event())
    finally:
        os.umask(old)
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o2770
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_gid == spool.directory.stat().st_gid
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o750)
    Spool(existing).ensure()
    assert stat.S_IMODE(existing.stat().st_mode) == 0o750  # as the operator (or tmpfiles) made it


def test_a_spooled_file_takes_the_spools_group_without_the_setgid_bit(tmp_path: Path) -> None:
    """A spool directory without setgid (made by hand) in another group than the
    writer's: each file is still given the spool's group, so the agent can read it.
    (The tests run as root, which may give any group.)"""
    other = pwd.getpwnam("nobody").pw_gid
    assert other != os.getgid()
    directory = tmp_path / "spool"
    directory.mkdir()
    os.chown(directory, -1, other)
    directory.chmod(0o770)
    path = Spool(directory).write(event())
    assert path.stat().st_gid == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
