"""Log followers: turn matching lines of a log file into events, inside ``run``.

Each follower reads its file from where it stopped and keeps its position in the spool
directory across restarts. Every line written after the follower first looked at the path
is read once: on the very first start it begins at the end of the file, so history is
not mailed, but a file that was not there yet is read from its start when it appears.

Rotation (the file is replaced): a new file at the path is opened as soon as a poll sees
it, and the old one is read to its end first, however far behind the follower is (a
burst, a spool that was full), and until it has been quiet for ``ROTATE_WAIT``: a daemon
may still write to the old file until it is told to reopen. A file rotated while the agent
was down is found again in the same directory by its inode. Truncation in place
(copytruncate): the bytes last read are checked on each poll; when they are gone, reading
starts again at 0.

A line becomes an event whose id is derived from the file (inode, and a generation that
each new file or truncation bumps) and the line's offset, and it is spooled with
:meth:`Spool.write_once`: a line is spooled once even when a crash comes between
spooling it and saving the position.

A pattern's named groups give ``module``, ``event_id``, ``level`` and params; a group
named ``message`` is the text. A line with a module and event id but no other params is
matched back against the catalog text for that key (:mod:`producer.matchback`) to
recover its positional params; if that fails, the message becomes the event's ``text``,
so a mail never shows ``{1?}`` for a value the line had.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Final, NamedTuple

from producer.matchback import Template
from producer.spool import Spool
from shared.catalog import Catalog
from shared.config import FollowConfig
from shared.errors import ClusteralertError, InvalidEvent
from shared.event import new_event

__all__ = ["ROTATE_WAIT", "LogFollower"]

log = logging.getLogger(__name__)

MAX_LINE: Final = 64 * 1024  # longer lines are cut: a runaway line must not eat memory
MAX_PER_POLL: Final = 1024 * 1024  # bytes one poll reads, so the I/O loop is never held long
# How long a rotated file must be quiet before the follower moves on to the new one:
# logrotate creates the new file, then signals the daemon, which writes to the old
# file until then (all of logrotate's files first, with sharedscripts).
ROTATE_WAIT: Final = 2.0
_READ_CHUNK: Final = 256 * 1024
_SEEN: Final = 64  # bytes before the read position that must still be there (truncation)
_NS: Final = uuid.UUID("0c7a4f4e-2a5b-4c66-b1a4-8d1f5a0e7c31")
STATE_DIR: Final = ".follow"


class _Newer(NamedTuple):
    """A file that replaced the one being read; read once that one is done."""

    fd: int
    inode: int
    noticed: float


class LogFollower:
    def __init__(
        self,
        config: FollowConfig,
        spool: Spool,
        catalog: Catalog,
        *,
        cluster: str,
        node: str,
        rotate_wait: float = ROTATE_WAIT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.spool = spool
        self.catalog = catalog
        self.cluster = cluster
        self.node = node
        self.rotate_wait = rotate_wait
        self.clock = clock
        self.patterns = [re.compile(p) for p in config.patterns]
        digest = hashlib.sha256(str(config.path).encode()).hexdigest()[:16]
        self._state_path = spool.directory / STATE_DIR / f"{digest}.json"
        self._file: int = -1
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._skipping = False
        self._generation = 0
        self._seen = b""  # the last bytes read, ending at _seen_end
        self._seen_end = 0
        self._grew_at = 0.0
        self._newer: list[_Newer] = []
        self._open_error = "-"  # "-": nothing said yet; "" after a successful open
        self._templates: dict[str, Template | None] = {}
        self.spooled = 0

    # -- position ------------------------------------------------------------------------

    def _load_state(self) -> tuple[int | None, int, str, list[int]]:
        """The saved inode, offset, fingerprint and the inodes of newer files waiting;
        offset -1 when there is no state. Inode None: the path was not there when the
        follower first looked."""
        try:
            state = json.loads(self._state_path.read_text())
            self._generation = int(state.get("generation", 0))
            inode = None if state["inode"] is None else int(state["inode"])
            newer = [int(n) for n in state.get("newer", [])]
            return inode, int(state["offset"]), str(state.get("tail", "")), newer
        except (OSError, ValueError, KeyError, TypeError):
            return None, -1, "", []

    def _tail(self, fd: int, offset: int) -> str:
        """A fingerprint of the bytes just before ``offset``: a file truncated and
        written again while we were away has other bytes there."""
        start = max(0, offset - 64)
        return hashlib.sha256(os.pread(fd, offset - start, start)).hexdigest()[:16]

    def _save_state(self) -> None:
        self._state_path.parent.mkdir(exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        state = {
            "path": str(self.config.path),
            "inode": self._inode,
            "offset": self._offset,
            "generation": self._generation,
            "tail": self._tail(self._file, self._offset) if self._file >= 0 else "",
            "newer": [n.inode for n in self._newer],
        }
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_path)

    def _open_first(self) -> bool:
        """Open the file when the follower starts (or the path first appears)."""
        saved_inode, saved_offset, tail, saved_newer = self._load_state()
        try:
            fd = os.open(self.config.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1  # a log appears when its program first writes
        stat = os.fstat(fd) if fd >= 0 else None
        if (
            stat is not None
            and saved_inode == stat.st_ino
            and 0 <= saved_offset <= stat.st_size
            and tail == self._tail(fd, saved_offset)
        ):
            self._begin(fd, stat.st_ino, saved_offset)  # where we stopped last time
        elif stat is not None and saved_offset < 0:
            self._begin(fd, stat.st_ino, stat.st_size)  # never seen: do not mail its history
        elif self._resume_rotated(saved_inode, saved_offset, tail, saved_newer):
            # Rotated while we were away: finish the old files, then this one.
            if stat is not None and stat.st_ino not in self._known():
                self._newer.append(_Newer(fd, stat.st_ino, self.clock()))
            elif fd >= 0:
                os.close(fd)
        elif stat is not None:
            # Rotated or truncated while we were away, or a reused inode: offsets
            # repeat, so a new generation keeps the new lines' event ids new.
            self._generation += 1
            self._begin(fd, stat.st_ino, 0)
        else:
            if saved_offset < 0:
                # Not there when first looked at: whatever appears there later is new.
                self._offset = 0
                self._save_state()
            return False
        self._save_state()
        return True

    def _resume_rotated(self, inode: int | None, offset: int, tail: str, newer: list[int]) -> bool:
        """Find the file we were reading, and those waiting after it, renamed within the
        same directory (logrotate's ``messages.1``); read on from there."""
        chain = [(inode, offset, tail), *((n, 0, "") for n in newer)]
        found = [
            (fd, ino, off)
            for ino, off, old_tail in chain
            if ino is not None and (fd := self._find_rotated(ino, off, old_tail)) is not None
        ]
        if not found:
            return False
        fd, ino, off = found[0]
        if ino != inode:
            self._generation += 1
        self._begin(fd, ino, off)
        self._newer = [_Newer(fd, ino, self.clock()) for fd, ino, _ in found[1:]]
        return True

    def _find_rotated(self, inode: int, offset: int, tail: str) -> int | None:
        """An open descriptor of the file with ``inode`` in the log's directory, if it
        still has the bytes we last read before ``offset``."""
        try:
            with os.scandir(self.config.path.parent) as entries:
                names = [e.path for e in entries if e.inode() == inode]
        except OSError:
            return None
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            stat = os.fstat(fd)
            if (
                stat.st_ino == inode
                and offset <= stat.st_size
                and (offset == 0 or tail == self._tail(fd, offset))
            ):
                return fd
            os.close(fd)
        return None

    def _known(self) -> list[int | None]:
        return [self._inode, *(n.inode for n in self._newer)]

    def _begin(self, fd: int, inode: int | None, offset: int) -> None:
        """Read ``fd`` from ``offset`` on."""
        self._file, self._inode, self._offset = fd, inode, offset
        self._partial = b""
        self._skipping = False
        start = max(0, offset - _SEEN)
        self._seen, self._seen_end = os.pread(fd, offset - start, start), offset
        self._grew_at = self.clock()

    # -- reading -------------------------------------------------------------------------

    def poll(self) -> int:
        """Read what is new, spool matching lines; returns how many were spooled."""
        before = self.spooled
        if self._file < 0:
            try:
                opened = self._open_first()
            except OSError as exc:
                opened, error = False, exc.strerror or str(exc)
            else:
                error = "" if opened else "cannot open it"
            if not opened:
                if error != self._open_error:
                    # Said once per distinct problem (polls run four times a second).
                    self._open_error = error
                    raise ClusteralertError(f"{self.config.path}: {error}")
                return 0
            self._open_error = ""
        # Before reading: a read that fails (a full spool) must not hide a rotation.
        problem = self._notice_new_file()
        if self._truncated():
            # Truncated in place (copytruncate): start over at the beginning. Offsets
            # repeat now, so a new generation keeps the new lines' event ids new.
            self._generation += 1
            self._begin(self._file, self._inode, 0)
            self._save_state()
        budget = MAX_PER_POLL
        while True:
            at_end, budget = self._read(budget)
            if not at_end or not self._newer:
                break
            if self.clock() - max(self._grew_at, self._newer[0].noticed) < self.rotate_wait:
                break
            self._next_file()
        if problem != self._open_error:
            # Said once; the old file was read meanwhile, and the new one is tried again.
            self._open_error = problem
            if problem:
                raise ClusteralertError(f"{self.config.path}: {problem}")
        return self.spooled - before

    def _notice_new_file(self) -> str:
        """Open a file that replaced the newest one we know, so it is kept for us.
        Returns why a new file cannot be opened, or ""."""
        known = self._known()
        try:
            if os.stat(self.config.path).st_ino in known:
                return ""
            fd = os.open(self.config.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return ""  # between two steps of a rotation: looked at again next poll
        except OSError as exc:
            return f"cannot open the new file: {exc.strerror or exc}"
        inode = os.fstat(fd).st_ino
        if inode in known:
            os.close(fd)
        else:
            self._newer.append(_Newer(fd, inode, self.clock()))
            self._save_state()  # a restart finds it again by its inode
        return ""

    def _truncated(self) -> bool:
        """Whether the bytes last read are gone (the file shrank or was written anew)."""
        if not self._seen:
            return False
        start = self._seen_end - len(self._seen)
        return os.pread(self._file, len(self._seen), start) != self._seen

    def _next_file(self) -> None:
        """The old file is read to its end and quiet: go on with the file that replaced it."""
        if self._partial and not self._skipping:
            # Its last line has no newline and will not get one: a line all the same.
            # If spooling fails, nothing has moved: this is tried again on the next poll.
            self._line(self._partial, self._offset)
        newer = self._newer.pop(0)
        self._close_file()
        self._generation += 1
        self._begin(newer.fd, newer.inode, 0)
        self._save_state()

    def _read(self, budget: int) -> tuple[bool, int]:
        """Read what is new, at most ``budget`` bytes: this runs on the agent's I/O loop,
        which must keep serving the broker; the rest comes on the next poll. Returns
        whether the end of the file was reached, and the budget left."""
        while budget > 0:
            position = self._offset + len(self._partial)
            chunk = os.pread(self._file, _READ_CHUNK, position)
            if not chunk:
                return True, budget
            budget -= len(chunk)
            seen = self._seen + chunk if position == self._seen_end else chunk
            self._seen, self._seen_end = seen[-_SEEN:], position + len(chunk)
            self._grew_at = self.clock()
            data = self._partial + chunk
            start = 0
            try:
                while (end := data.find(b"\n", start)) >= 0:
                    if self._skipping:
                        self._skipping = False  # the end of an over-long line
                    elif self._line(data[start:end], self._offset):
                        # Position saved only after a spooled line (and per chunk): a
                        # crash re-reads lines, and their ids make the spool keep one.
                        self._offset += end + 1 - start
                        start = end + 1
                        self._save_state()
                        continue
                    self._offset += end + 1 - start
                    start = end + 1
            except Exception:
                # This line is read again next time; what was after it is not yet read.
                self._partial = b""
                self._save_state()
                raise
            self._save_state()
            self._partial = data[start:]
            if len(self._partial) > MAX_LINE:
                # A line with no end in sight: handle its start, skip the rest of it.
                if not self._skipping:
                    self._line(self._partial[:MAX_LINE], self._offset)
                self._skipping = True
                self._offset += len(self._partial)
                self._partial = b""
                self._save_state()
        return False, 0

    def _line(self, raw: bytes, offset: int) -> bool:
        """Spool ``raw`` if it matches; True when an event was spooled."""
        line = raw[:MAX_LINE].decode("utf-8", errors="replace").rstrip("\r")
        for pattern in self.patterns:
            match = pattern.search(line)
            if match is not None:
                break
        else:
            return False
        groups = {k: v for k, v in match.groupdict().items() if v is not None}
        module = groups.pop("module", None) or self.config.module
        event_text = groups.pop("message", None)
        level = groups.pop("level", None) or self.config.level
        # The line's host: on a central syslog server it is the node the line came from.
        node = groups.pop("node", None) or self.node
        raw_id = groups.pop("event_id", None)
        try:
            event_id = int(raw_id) if raw_id is not None else self.config.event_id
        except ValueError:
            event_id = None
        if module is None or event_id is None:
            return False
        params = groups
        text = None
        if not params and event_text:
            params = self._params_from_catalog(module, event_id, event_text) or {}
            if not params:
                text = event_text
        identity = f"{self.config.path}|{self._inode}|{self._generation}|{offset}"
        try:
            event = new_event(
                id=str(uuid.uuid5(_NS, identity)),
                module=module.lower(),
                event_id=event_id,
                level=level,
                cluster=self.cluster,
                node=node,
                params=params,
                text=text,
                source="log",
                reporter=self.node,  # this agent; node is the line's host
            )
        except InvalidEvent as exc:
            log.warning(
                "%s: line at offset %d not turned into an event: %s", self.config.path, offset, exc
            )
            return False
        # A failure (a full spool) propagates before the position moves past this line,
        # so the line is tried again on the next poll.
        if self.spool.write_once(event) is not None:
            self.spooled += 1
        return True

    def _params_from_catalog(self, module: str, event_id: int, message: str) -> dict[str, str]:
        """Params of the first of the entry's logged wordings the message matches."""
        entry = self.catalog.lookup(module.lower(), event_id)
        for text in entry.logged_texts if entry is not None else ():
            if text not in self._templates:
                self._templates[text] = Template.parse(text)
            template = self._templates[text]
            params = template.match(message.strip()) if template else None
            if params:
                return params
        return {}

    def _close_file(self) -> None:
        if self._file >= 0:
            with contextlib.suppress(OSError):
                os.close(self._file)
            self._file = -1

    def close(self) -> None:
        # A file truncated since the last read keeps the state saved then: its
        # fingerprint is of the old bytes, so the next start sees the truncation too.
        if self._file >= 0 and not self._truncated():
            self._save_state()
        self._close_file()
        for newer in self._newer:
            with contextlib.suppress(OSError):
                os.close(newer.fd)
        self._newer.clear()
