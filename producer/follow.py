"""Log followers: turn matching lines of a log file into events, inside ``run``.

Each follower reads its file from where it stopped, survives rotation (the file is
replaced: the old one is read to its end first) and truncation (copytruncate: start
again at 0), and keeps its position in the spool directory across restarts. On the very
first start it begins at the end of the file, so history is not mailed.

A line becomes an event whose id is derived from the file (inode, and a generation that
a truncation bumps) and the line's offset, and it
is spooled with :meth:`Spool.write_once`: a line is spooled once even when a crash
comes between spooling it and saving the position.

A pattern's named groups give ``module``, ``event_id``, ``level`` and params; a group
named ``message`` is the text. A line with a module and event id but no other params is
matched back against the catalog text for that key (``Detected an error in monitoring
{1}. ({2} : {3})``, or ``%1`` style) to recover its positional params; if that fails, the
message becomes the event's ``text``, so a mail never shows ``{1?}`` for a value the
line had.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from typing import Final

from producer.spool import Spool
from shared.catalog import Catalog
from shared.config import FollowConfig
from shared.errors import ClusteralertError, InvalidEvent
from shared.event import new_event

__all__ = ["LogFollower", "catalog_regex"]

log = logging.getLogger(__name__)

MAX_LINE: Final = 64 * 1024  # longer lines are cut: a runaway line must not eat memory
MAX_PER_POLL: Final = 1024 * 1024  # bytes one poll reads, so the I/O loop is never held long
MAX_BACKMATCH: Final = 2048  # longer messages are not matched back against catalog texts
_READ_CHUNK: Final = 256 * 1024
_NS: Final = uuid.UUID("0c7a4f4e-2a5b-4c66-b1a4-8d1f5a0e7c31")
_PLACEHOLDER_RE: Final = re.compile(r"\{([A-Za-z0-9_]+)\}|%([0-9]+)")
STATE_DIR: Final = ".follow"


def catalog_regex(text: str) -> re.Pattern[str] | None:
    """A regex matching what ``text`` renders to, with one group per placeholder.
    Positional placeholders become groups named ``p1``... (params ``1``...)."""
    parts: list[str] = []
    seen: set[str] = set()
    position = 0
    for match in _PLACEHOLDER_RE.finditer(text):
        parts.append(re.escape(text[position : match.start()]))
        name = match.group(1) or match.group(2)
        group = f"p{name}" if name.isdigit() else name
        parts.append(f"(?P={group})" if group in seen else f"(?P<{group}>.*?)")
        seen.add(group)
        position = match.end()
    if not seen:
        return None
    parts.append(re.escape(text[position:]))
    try:
        return re.compile("".join(parts), re.DOTALL)
    except re.error:
        return None


class LogFollower:
    def __init__(
        self, config: FollowConfig, spool: Spool, catalog: Catalog, *, cluster: str, node: str
    ):
        self.config = config
        self.spool = spool
        self.catalog = catalog
        self.cluster = cluster
        self.node = node
        self.patterns = [re.compile(p) for p in config.patterns]
        digest = hashlib.sha256(str(config.path).encode()).hexdigest()[:16]
        self._state_path = spool.directory / STATE_DIR / f"{digest}.json"
        self._file: int = -1
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._skipping = False
        self._generation = 0
        self._open_error = "-"  # "-": nothing said yet; "" after a successful open
        self._regex_cache: dict[tuple[str, int], re.Pattern[str] | None] = {}
        self.spooled = 0

    # -- position ------------------------------------------------------------------------

    def _load_state(self) -> tuple[int | None, int, str]:
        try:
            state = json.loads(self._state_path.read_text())
            self._generation = int(state.get("generation", 0))
            return int(state["inode"]), int(state["offset"]), str(state.get("tail", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None, -1, ""

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
        }
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_path)

    def _open(self, *, first: bool) -> bool:
        try:
            fd = os.open(self.config.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # not there (yet): a log appears when its program first writes
        except OSError:
            raise
        stat = os.fstat(fd)
        self._file, self._inode = fd, stat.st_ino
        saved_inode, saved_offset, tail = self._load_state() if first else (None, 0, "")
        if (
            first
            and saved_inode == stat.st_ino
            and 0 <= saved_offset <= stat.st_size
            and tail == self._tail(fd, saved_offset)
        ):
            self._offset = saved_offset  # where we stopped last time
        elif first and saved_offset < 0:
            self._offset = stat.st_size  # never seen: do not mail the file's history
        else:
            # Rotated or truncated (while we were away, or just now), or a reused inode:
            # offsets repeat, so a new generation keeps the new lines' event ids new.
            self._offset = 0
            self._generation += 1
        self._partial = b""
        self._save_state()
        return True

    # -- reading -------------------------------------------------------------------------

    def poll(self) -> int:
        """Read what is new, spool matching lines; returns how many were spooled."""
        before = self.spooled
        if self._file < 0:
            try:
                opened = self._open(first=self._inode is None)
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
        self._read_to_end()
        try:
            current = os.stat(self.config.path)
        except OSError:
            current = None
        if current is not None and current.st_ino != self._inode:
            # Rotated: the old file is complete now; read its tail, then switch.
            self._read_to_end()
            self._close_file()
            if self._open(first=False):
                self._read_to_end()
        elif current is not None and current.st_size < self._offset:
            # Truncated in place (copytruncate): start over at the beginning. Offsets
            # repeat now, so a new generation keeps the new lines' event ids new.
            self._generation += 1
            self._offset = 0
            self._partial = b""
            self._read_to_end()
        return self.spooled - before

    def _read_to_end(self) -> None:
        """Read what is new, at most ``MAX_PER_POLL`` bytes: this runs on the agent's I/O
        loop, which must keep serving the broker; the rest comes on the next poll."""
        budget = MAX_PER_POLL
        while budget > 0:
            chunk = os.pread(self._file, _READ_CHUNK, self._offset + len(self._partial))
            if not chunk:
                return
            budget -= len(chunk)
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
                node=self.node,
                params=params,
                text=text,
                source="log",
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
        entry = self.catalog.lookup(module.lower(), event_id)
        # Lazy groups make matching polynomial: a long crafted line must not stall the
        # agent's I/O loop, so long messages go into the text as they are.
        if entry is None or len(message) > MAX_BACKMATCH:
            return {}
        key = (entry.text, id(entry))
        if key not in self._regex_cache:
            self._regex_cache[key] = catalog_regex(entry.text)
        regex = self._regex_cache[key]
        match = regex.fullmatch(message.strip()) if regex else None
        if match is None:
            return {}
        return {
            (name[1:] if name.startswith("p") and name[1:].isdigit() else name): value
            for name, value in match.groupdict().items()
        }

    def _close_file(self) -> None:
        if self._file >= 0:
            with contextlib.suppress(OSError):
                os.close(self._file)
            self._file = -1

    def close(self) -> None:
        if self._file >= 0:
            self._save_state()
        self._close_file()
