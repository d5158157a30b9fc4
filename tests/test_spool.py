"""Spool discipline: bounds, claims between concurrent forwarders, orphaned claims and
half-written files, and the status report."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from producer.spool import Spool
from shared.event import Event, encode_event, new_event
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


def test_status_reports_depth_age_and_the_agents_last_real_error(
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
    processes("clusteralert-producer", "run", "--config", str(config))

    def report() -> dict[str, object] | None:
        result = emit(config, "status", "--json")
        assert result.returncode == 0, result.stderr
        doc: dict[str, object] = json.loads(result.stdout)
        return doc if doc["last_error"] else None

    doc = wait_until(report, 30, "the agent to report its broker failure")
    assert doc["events"] == 1 and isinstance(doc["bytes"], int) and doc["bytes"] > 0
    assert isinstance(doc["oldest_age_seconds"], float) and 0 <= doc["oldest_age_seconds"] < 60
    assert doc["forwarder_connected"] is False
    assert f"127.0.0.1:{dead_port}" in str(doc["last_error"])
    assert isinstance(doc["last_error_time"], float)
    assert abs(time.time() - doc["last_error_time"]) < 60
    text = emit(config, "status").stdout
    assert "events waiting: 1" in text and "not connected" in text
    assert f"127.0.0.1:{dead_port}" in text


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
