"""Log followers: matching lines become events exactly once, across rotation,
truncation and restarts; junk never crashes them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.follow import LogFollower
from producer.matchback import Template
from producer.spool import Spool
from shared.catalog import Catalog, CatalogEntry
from shared.config import CLUSTERPRO_PATTERN, FollowConfig, parse_config
from tests.conftest import Process, amqp_url
from tests.pipeline import take_messages
from tests.waiting import wait_until

SYSLOG = b"Nov 27 03:00:01 server1 clusterpro: "


def syslog(body: str, tag: str = "clusterpro") -> str:
    """``body`` as the syslog daemon writes it to a file for program ``tag``."""
    return f"Nov 27 03:00:01 server1 {tag}: {body}"


CATALOG = Catalog(
    [
        CatalogEntry("rm", 9, "error", True, "Detected an error in monitoring {1}. ({2} : {3})"),
        CatalogEntry("nm", 1, "error", True, "Server %1 has been stopped."),
    ]
)


class Node:
    def __init__(self, tmp_path: Path):
        self.log = tmp_path / "messages"
        self.log.write_text("")
        self.spool = Spool(tmp_path / "spool")
        self.spool.ensure()
        self.follower = self.new_follower()

    def new_follower(self) -> LogFollower:
        return LogFollower(
            FollowConfig(self.log), self.spool, CATALOG, cluster="c", node="n1", rotate_wait=0
        )

    def append(self, *lines: str | bytes, path: Path | None = None) -> None:
        with (path or self.log).open("ab") as fh:
            for line in lines:
                fh.write((line.encode() if isinstance(line, str) else line) + b"\n")

    def events(self) -> list[dict[str, object]]:
        return [json.loads(p.read_bytes()) for p in self.spool.pending()]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_history_is_skipped_then_new_lines_become_events(node: Node) -> None:
    node.append(syslog("<type: rm><event: 9> old news"))
    node.follower = node.new_follower()
    assert node.follower.poll() == 0  # first start: begin at the end
    node.append(
        "Nov 26 03:00:01 n1 clusterpro: <type: rm><event: 9> Detected an error in monitoring "
        "httpw. (11 : timeout)",
        "Nov 26 03:00:02 n1 sshd[1]: unrelated line",
        "Nov 26 03:00:03 n1 clusterpro: <type: nm><event: 1> Server db2 has been stopped.",
        "Nov 26 03:00:04 n1 clusterpro: <type: rm><event: 77> something new entirely",
    )
    assert node.follower.poll() == 3
    events = node.events()
    assert [(e["module"], e["event_id"]) for e in events] == [("rm", 9), ("nm", 1), ("rm", 77)]
    assert events[0]["params"] == {"1": "httpw", "2": "11", "3": "timeout"}
    assert events[1]["params"] == {"1": "db2"}
    assert events[2]["params"] == {} and events[2]["text"] == "something new entirely"
    assert all(e["source"] == "log" and e["node"] == "n1" for e in events)


def test_rotation_truncation_and_restart_send_each_line_once(node: Node) -> None:
    node.follower.poll()
    node.append(syslog("<type: rm><event: 1> a"))
    node.follower.poll()
    # Rotation: the old file gets a last line after the rename, then a new file appears.
    rotated = node.log.with_suffix(".1")
    os.rename(node.log, rotated)
    node.append(syslog("<type: rm><event: 2> b"), path=rotated)
    node.append(syslog("<type: rm><event: 3> c"))
    node.follower.poll()
    # Restart: lines written while the follower is down are read once it is back.
    node.follower.close()
    node.append(syslog("<type: rm><event: 4> d"))
    node.follower = node.new_follower()
    node.follower.poll()
    node.follower.poll()
    # copytruncate: the file is emptied in place.
    with node.log.open("r+b") as fh:
        fh.truncate(0)
    node.append(syslog("<type: rm><event: 5> e"))
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1, 2, 3, 4, 5]


def test_a_line_spooled_before_a_crash_is_not_spooled_again(node: Node) -> None:
    node.follower.poll()
    node.append(syslog("<type: rm><event: 1> a"))
    node.follower.poll()
    state = next((node.spool.directory / ".follow").glob("*.json"))
    saved = json.loads(state.read_text())
    node.follower.close()
    # The crash came after spooling but before the position was saved.
    empty_tail = hashlib.sha256(b"").hexdigest()[:16]  # the fingerprint at offset 0
    state.write_text(json.dumps({**saved, "offset": 0, "tail": empty_tail}))
    node.follower = node.new_follower()
    node.follower.poll()
    assert len(node.events()) == 1


def test_pathological_lines_do_not_crash_the_follower(node: Node) -> None:
    node.follower.poll()
    node.append(SYSLOG + b"<type: rm><event: 1> " + b"x" * 2_000_000)
    node.append(SYSLOG + b"<type: rm><event: 2> bad \xff\xfe utf-8 \x1b[31m")
    node.append(SYSLOG + b"<type: rm><event: 99999999999999999999999> too big")
    node.append(SYSLOG + b"<type: rm><event: 3> fine")
    for _ in range(4):  # each poll reads at most 1 MiB, to keep the I/O loop responsive
        node.follower.poll()
    events = node.events()
    assert [e["event_id"] for e in events] == [1, 2, 3]
    assert len(json.dumps(events[0]).encode()) < 64 * 1024
    assert events[1]["text"] == "bad \ufffd\ufffd utf-8 \\x1b[31m"


def test_a_failed_spool_write_loses_no_line_and_repeats_none(node: Node) -> None:
    node.follower.poll()
    node.append(*(syslog(f"<type: rm><event: {i}> line {i}") for i in range(1, 7)))
    real_write_once = node.spool.write_once
    calls = 0

    def flaky(event):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:
            from shared.errors import SpoolError

            raise SpoolError("spool is full")
        return real_write_once(event)

    node.spool.write_once = flaky  # type: ignore[method-assign]
    with pytest.raises(Exception, match="spool is full"):
        node.follower.poll()
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1, 2, 3, 4, 5, 6]


def test_the_old_file_is_read_until_the_daemon_has_reopened(node: Node) -> None:
    """logrotate creates the new file, then signals the daemon, which writes to the old
    file until then: the follower stays with the old file until it has been quiet."""
    now = [0.0]
    node.follower = LogFollower(
        FollowConfig(node.log), node.spool, CATALOG, cluster="c", node="n1", clock=lambda: now[0]
    )
    node.follower.poll()
    rotated = node.log.with_suffix(".1")
    os.rename(node.log, rotated)
    node.log.touch()
    node.follower.poll()
    now[0] += 1.5
    node.append(syslog("<type: rm><event: 1> before the daemon reopened"), path=rotated)
    node.follower.poll()
    now[0] += 1.5  # 1.5 s quiet: not yet
    node.append(syslog("<type: rm><event: 2> after the signal"))
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1]
    now[0] += 0.5
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1, 2]


def test_an_unreadable_new_file_is_said_once_and_the_old_one_is_still_read(node: Node) -> None:
    from shared.errors import ClusteralertError

    node.follower.poll()
    rotated = node.log.with_suffix(".1")
    os.rename(node.log, rotated)
    node.append(syslog("<type: rm><event: 1> last line of the old file"), path=rotated)
    node.append(syslog("<type: rm><event: 2> in the new file"))
    real_open = os.open

    def refuse_the_new_file(path, *args):  # type: ignore[no-untyped-def]
        if Path(path) == node.log:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args)

    with mock.patch("producer.follow.os.open", refuse_the_new_file):
        with pytest.raises(ClusteralertError, match="cannot open the new file: Permission denied"):
            node.follower.poll()
        assert node.follower.poll() == 0  # said once
    assert [e["event_id"] for e in node.events()] == [1]
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1, 2]


def test_truncation_while_the_agent_was_down_keeps_new_lines(node: Node) -> None:
    node.follower.poll()
    node.append(syslog("<type: rm><event: 1> before"))
    node.follower.poll()
    node.follower.close()
    with node.log.open("r+b") as fh:
        fh.truncate(0)
    node.append(syslog("<type: rm><event: 2> after, at the same offset"))
    node.follower = node.new_follower()
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1, 2]


def test_match_back_reads_printf_tokens_as_text_like_the_csv_reader() -> None:
    # The vendor list's "0x%08x" stays literal in the catalog; were it param "08" here,
    # the wording could never match the line the vendor logged.
    assert Template.parse("Cluster stop request failed(0x%08x).") is None
    template = Template.parse("Server %1 stopped (%s, %0).")
    assert template is not None and template.names == ("1",)
    assert template.match("Server n1 stopped (%s, %0).") == {"1": "n1"}


def test_match_back_handles_positional_and_named_placeholders() -> None:
    template = Template.parse("Monitor {monitor} failed on %1 (%1)")
    assert template is not None
    assert template.match("Monitor httpw failed on n1 (n1)") == {"monitor": "httpw", "1": "n1"}
    assert template.match("Monitor httpw failed on n1 (n2)") is None  # %1 must repeat
    assert template.match("Monitor httpw failed on n1") is None
    assert Template.parse("no placeholders") is None
    # The same choices a lazy regex makes: each placeholder as short as the rest allows.
    template = Template.parse("{1}. ({2} : {3})")
    assert template is not None
    assert template.match("a. b. (c : d : e)") == {"1": "a. b", "2": "c", "3": "d : e"}
    assert template.match("x. (y : z)") == {"1": "x", "2": "y", "3": "z"}
    assert template.match(". ( : )") == {"1": "", "2": "", "3": ""}
    assert template.match("x. (y : z") is None


def test_match_back_uses_the_logged_wording_then_the_alternates(tmp_path: Path) -> None:
    from shared.catalog import load_catalog

    node = Node(tmp_path)
    catalog = load_catalog([]).layered(
        Catalog([CatalogEntry("rm", 70, "error", True, "Now {a}.", alternates=("Was {b}.",))])
    )
    node.follower = LogFollower(FollowConfig(node.log), node.spool, catalog, cluster="c", node="n")
    node.follower.poll()
    node.append(
        syslog("<type: rm><event: 9> Detected an error in monitoring httpw. (11 : timeout)"),
        syslog("<type: rm><event: 70> Was here."),
    )
    node.follower.poll()
    assert [e["params"] for e in node.events()] == [
        {"monitor": "httpw", "code": "11", "detail": "timeout"},
        {"b": "here"},
    ]


HOSTILE_TEXTS = [
    "{1} {2} {3} {4} {5} {6}.",
    "Detected an error in monitoring {1}. ({2} : {3})",
    "{1}{2}{3}{4}{5}{6}{7}{8}x",
    "%1 %1 %1 %1 %1 %1 %1 %1.",
    "a{1}a{2}a{3}a{4}a{5}a{6}b",
]


@settings(max_examples=200, deadline=None)
@given(
    text=st.sampled_from(HOSTILE_TEXTS),
    pieces=st.lists(st.sampled_from([" ", "x", "a", ". (", " : ", ".", "x ", "a a"]), min_size=1),
    length=st.integers(min_value=1_000, max_value=10_000),
)
def test_match_back_time_is_bounded_on_hostile_lines(
    text: str, pieces: list[str], length: int
) -> None:
    template = Template.parse(text)
    assert template is not None
    unit = "".join(pieces)
    line = (unit * (length // len(unit) + 1))[:length]
    for candidate in (line, line + ".", "." + line, line[:-1] + ")"):
        started = time.perf_counter()
        template.match(candidate)
        assert time.perf_counter() - started < 0.05, (text, candidate[:40])


def test_a_line_from_another_program_is_not_an_event(node: Node) -> None:
    node.follower.poll()
    node.append(
        syslog("<type: rm><event: 1> forged", tag="mallory"),
        syslog("<type: rm><event: 2> forged with a pid", tag="mallory[4242]"),
        "Nov 27 03:00:01 server1 sshd[7]: Invalid user clusterpro: <type: rm><event: 3> x",
        "<type: rm><event: 4> no syslog header at all",
        syslog("<type: rm><event: 5> real"),
        syslog("<type: rm><event: 6> real, with a pid", tag="clusterpro[311]"),
        syslog("<type: rm><event: 7> another daemon of the suite", tag="expresscls_md"),
        "2026-11-27T03:00:01.123456+09:00 server1 clusterpro: <type: rm><event: 8> iso time",
        "Nov  7 03:00:01 server1 clusterpro: <type: rm><event: 9> padded day",
    )
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [5, 6, 7, 8, 9]


def test_tags_of_the_default_pattern_are_configurable(tmp_path: Path) -> None:
    from shared.errors import ConfigError

    config = parse_config(
        {"producer": {"follow": [{"path": "log", "tags": ["mycluster"]}]}},
        sections=("producer",),
        base=tmp_path,
    )
    node = Node(tmp_path)
    node.follower = LogFollower(
        FollowConfig(node.log, config.producer.follow[0].patterns),
        node.spool,
        CATALOG,
        cluster="c",
        node="n1",
    )
    node.follower.poll()
    node.append(syslog("<type: rm><event: 1> x"), syslog("<type: rm><event: 2> y", "mycluster"))
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [2]
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "producer": {
                    "follow": [
                        {"path": "a", "tags": ["x"], "patterns": ["(?P<module>a)(?P<event_id>1)"]},
                        {"path": "b", "tags": ["bad tag"]},
                        {"path": "c", "tags": []},
                    ]
                }
            },
            sections=("producer",),
            base=tmp_path,
        )
    found = "\n".join(str(p) for p in info.value.problems)
    assert "producer.follow[0].tags: only used by the default pattern" in found
    assert "producer.follow[1].tags[0]" in found
    assert "producer.follow[2].tags" in found


# Operations on a followed log, as a syslog daemon, logrotate and the agent do them.
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 6)),
        st.tuples(st.just("rotate"), st.integers(0, 3), st.integers(0, 3)),
        st.tuples(st.just("copytruncate"), st.integers(0, 6)),
        st.tuples(st.just("poll"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
        st.tuples(st.just("spool_fails"), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=75, deadline=None)
@given(absent_at_start=st.booleans(), operations=OPERATIONS)
def test_no_line_is_skipped_or_repeated(
    absent_at_start: bool, operations: list[tuple[int | str, ...]]
) -> None:
    """Every event line written after the follower first looked at the path is spooled
    exactly once, whatever rotations, truncations, restarts and failed spool writes come
    between. Within what a polling follower can know: it looks at the path between two
    rotations, and copytruncate comes when it has read everything (what it had not read
    would be in the copy)."""
    from shared.errors import ClusteralertError, SpoolError

    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.multiple("producer.follow", MAX_PER_POLL=300, _READ_CHUNK=128),
    ):
        node = Node(Path(tmp))
        written: list[int] = []
        looked = True  # the follower has seen the file now at the path
        fail_next = False
        real_write_once = node.spool.write_once

        def write_once(event):  # type: ignore[no-untyped-def]
            nonlocal fail_next
            if fail_next:
                fail_next = False
                raise SpoolError("spool is full")
            return real_write_once(event)

        node.spool.write_once = write_once  # type: ignore[method-assign]

        def poll() -> int:
            nonlocal looked
            looked = True
            try:
                return node.follower.poll()
            except ClusteralertError:
                return -1

        def drain() -> None:
            quiet = 0
            while quiet < 3:
                quiet = quiet + 1 if poll() == 0 else 0

        def lines(count: int, path: Path) -> None:
            nonlocal looked
            looked = looked and path.exists()
            for _ in range(count):
                written.append(len(written) + 1)
                n = written[-1]
                node.append(syslog(f"<type: rm><event: {n}> line {n}"), f"noise {n}", path=path)

        if absent_at_start:
            node.log.unlink()
        poll()
        for name, *args in operations:
            if name == "append":
                lines(int(args[0]), node.log)
            elif name == "rotate" and looked and node.log.exists():
                for i in range(8, 0, -1):  # messages.1 -> .2 ..., as logrotate does
                    if node.log.with_suffix(f".{i}").exists():
                        os.rename(node.log.with_suffix(f".{i}"), node.log.with_suffix(f".{i + 1}"))
                os.rename(node.log, node.log.with_suffix(".1"))
                lines(int(args[0]), node.log.with_suffix(".1"))  # before the daemon reopens
                node.log.touch()
                lines(int(args[1]), node.log)
                looked = False
            elif name == "copytruncate" and node.log.exists():
                fail_next = False
                drain()
                shutil.copyfile(node.log, node.log.with_suffix(".copy"))
                with node.log.open("r+b") as fh:
                    fh.truncate(0)
                lines(int(args[0]), node.log)
                looked = False  # a truncated file renamed unseen is not recognised
            elif name == "poll":
                poll()
            elif name == "restart":
                node.follower.close()
                node.follower = node.new_follower()
            elif name == "spool_fails":
                fail_next = True
        fail_next = False
        drain()
        node.follower.close()
        assert sorted(int(str(e["event_id"])) for e in node.events()) == written


def test_follower_config_is_validated(tmp_path: Path) -> None:
    from shared.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "producer": {
                    "follow": [
                        {"path": "/var/log/x", "patterns": ["(unclosed"]},
                        {"path": "/var/log/y", "patterns": ["no groups here"]},
                    ]
                }
            },
            sections=("producer",),
            base=tmp_path,
        )
    found = [str(p) for p in info.value.problems]
    assert any(
        p.startswith("producer.follow[0].patterns[0]: not a valid regular expression")
        for p in found
    )
    assert any("producer.follow[1].patterns[0]: has no (?P<module>...) group" in p for p in found)
    config = parse_config(
        {"producer": {"follow": [{"path": "log"}]}}, sections=("producer",), base=tmp_path
    )
    assert config.producer.follow[0].patterns == (CLUSTERPRO_PATTERN,)
    assert config.producer.follow[0].path == tmp_path / "log"


class Agent:
    """A real ``clusteralert-producer run`` following ``log``, publishing to ``vhost``."""

    def __init__(
        self,
        tmp_path: Path,
        vhost: str,
        processes: Callable[..., Process],
        log: Path,
        catalog: str = "",
    ):
        from worker.broker import connect_any, declare_topology

        broker = parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",))
        with connect_any(broker.broker)[0] as connection:
            declare_topology(connection.default_channel)
        self.vhost, self.log, self.processes = vhost, log, processes
        self.state_dir = tmp_path / "spool" / ".follow"
        self.config = tmp_path / "node.toml"
        catalog_section = ""
        if catalog:
            (tmp_path / "catalog.toml").write_text(catalog)
            catalog_section = f'[catalog]\npath = "{tmp_path / "catalog.toml"}"\n'
        self.config.write_text(
            f'[broker]\nurls = ["{amqp_url(vhost)}"]\n'
            f'[producer]\nspool_dir = "{tmp_path / "spool"}"\n'
            f'[[producer.follow]]\npath = "{log}"\n' + catalog_section
        )
        self.received: list[dict[str, object]] = []
        self.process = self.start()

    def start(self) -> Process:
        self.process = self.processes("clusteralert-producer", "run", "--config", str(self.config))
        return self.process

    def events(self) -> list[dict[str, object]]:
        """Every event published so far (taken off the queue and kept here)."""
        self.received += [json.loads(body) for _, _, body in take_messages(self.vhost)]
        return self.received

    def ids(self) -> list[int]:
        return [int(str(e["event_id"])) for e in self.events()]


def append(path: Path, *lines: str) -> None:
    with path.open("a") as fh:
        fh.write("".join(line + "\n" for line in lines))


@pytest.mark.integration
def test_run_follows_a_log_across_rotation_and_restart_to_the_broker(
    tmp_path: Path, vhost: str, processes: Callable[..., Process]
) -> None:
    log = tmp_path / "messages"
    log.write_text(syslog("<type: rm><event: 1> history, not sent") + "\n")
    agent = Agent(tmp_path, vhost, processes, log)
    wait_until(lambda: any(agent.state_dir.glob("*.json")), 20, "the follower to start")
    append(log, syslog("<type: rm><event: 2> first"))
    append(log, "noise")
    os.rename(log, log.with_suffix(".1"))
    append(log.with_suffix(".1"), syslog("<type: rm><event: 3> written just after rotation"))
    append(log, syslog("<type: rm><event: 4> in the new file"))
    wait_until(lambda: len(agent.ids()) == 3, 20, "three events")
    assert agent.process.stop() == 0
    append(log, syslog("<type: rm><event: 5> while the agent was down"))
    agent.start()
    wait_until(lambda: len(agent.ids()) == 4, 20, "the fourth event")
    assert sorted(agent.ids()) == [2, 3, 4, 5]
    assert agent.process.stop() == 0


@pytest.mark.integration
def test_run_reads_a_rotated_file_to_its_end_however_far_behind_it_was(
    tmp_path: Path, vhost: str, processes: Callable[..., Process]
) -> None:
    log = tmp_path / "messages"
    log.write_text("")
    agent = Agent(tmp_path, vhost, processes, log)
    wait_until(lambda: any(agent.state_dir.glob("*.json")), 20, "the follower to start")
    append(log, syslog("<type: rm><event: 1> before the burst"))
    wait_until(lambda: agent.ids() == [1], 20, "the first event")
    # A burst: 8 MiB land in the old file between two polls (each reads at most 1 MiB),
    # then it is rotated; its last line must still be read before the new file.
    noise = ("n" * 1023 + "\n") * 8192
    with log.open("a") as fh:
        fh.write(noise + syslog("<type: rm><event: 2> the end of the burst") + "\n")
    os.rename(log, log.with_suffix(".1"))
    append(log, syslog("<type: rm><event: 3> in the new file"))
    wait_until(lambda: len(agent.ids()) >= 3, 20, "three events")
    assert agent.ids() == [1, 2, 3]
    assert agent.process.stop() == 0


@pytest.mark.integration
def test_run_sends_the_first_lines_of_a_log_created_after_it_started(
    tmp_path: Path, vhost: str, processes: Callable[..., Process]
) -> None:
    log = tmp_path / "messages"  # not there yet
    agent = Agent(tmp_path, vhost, processes, log)
    wait_until(lambda: str(log) in agent.process.output(), 20, "the follower to look for it")
    append(log, syslog("<type: rm><event: 10> the log's first line"))
    wait_until(lambda: any(agent.state_dir.glob("*.json")), 20, "the follower to open it")
    append(log, syslog("<type: rm><event: 11> its second line"))
    wait_until(lambda: 11 in agent.ids(), 20, "the second event")
    assert agent.ids() == [10, 11]
    assert agent.process.stop() == 0


@pytest.mark.integration
def test_a_hostile_line_does_not_stall_the_agent(
    tmp_path: Path, vhost: str, processes: Callable[..., Process]
) -> None:
    # Six placeholders and a line that nearly fits: a regex built from this text
    # backtracks through every way of placing five spaces among 700.
    catalog = (
        '[[message]]\nmodule = "rm"\nevent_id = 9\nlevel = "error"\nmail = true\n'
        'text = "{1} {2} {3} {4} {5} {6}."\n'
    )
    log = tmp_path / "messages"
    log.write_text("")
    agent = Agent(tmp_path, vhost, processes, log, catalog)
    wait_until(lambda: any(agent.state_dir.glob("*.json")), 20, "the follower to start")
    hostile = "x " * 700 + "x"
    append(
        log,
        syslog(f"<type: rm><event: 9> {hostile}"),
        syslog("<type: rm><event: 9> a b c d e f."),
    )
    events = wait_until(lambda: len(agent.events()) == 2 and agent.events(), 5, "both events")
    assert events[0]["text"] == hostile and events[0]["params"] == {}
    assert events[1]["params"] == {"1": "a", "2": "b", "3": "c", "4": "d", "5": "e", "6": "f"}
    # Publishing goes on: an emitted event is forwarded promptly too.
    emit = processes(
        "clusteralert-producer",
        "emit",
        "--config",
        str(agent.config),
        "--module",
        "rm",
        "--event-id",
        "12",
    )
    assert emit.proc.wait(20) == 0
    wait_until(lambda: 12 in agent.ids(), 5, "the emitted event")
    assert agent.process.stop() == 0
