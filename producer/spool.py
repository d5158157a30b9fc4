"""The durable spool: one file per event, in a directory on the node.

An event counts as accepted only when it survives a power cut: it is written to a temp
file, fsynced, renamed into place, and the directory is fsynced so the rename itself is
on disk. Names sort by creation time, so the forwarder sends in order.

Layout::

    spool/00001795...-<event id>.json    waiting to be forwarded
    spool/.tmp-...                        being written by emit
    spool/claims/<claim id>/...json       taken by one running forwarder
    spool/claims/<claim id>.lock          held (flock) while that forwarder lives
    spool/rejected/...                    set aside: not a valid event
    spool/.forwarder-status               the forwarder's last state, for `status`
    spool/.seen/<event id>                events with a deterministic id already spooled

The spool is writable by a group (the Pacemaker agent's), and the forwarder may run with
more privileges than that group, so nothing in it is trusted: files are opened without
following symbolic links, their size is checked before they are read, and the status
file is written through a fresh temp file.

Forwarders claim a file by renaming it into their claim directory, which is atomic: two
``run`` processes never publish the same file. A claim whose lock nobody holds belongs to
a forwarder that died; its files go back to the spool.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from shared.errors import InvalidEvent, SpoolError
from shared.event import MAX_EVENT_BYTES, Event, encode_event

__all__ = ["SUFFIX", "Claim", "Spool", "SpoolStats"]

SUFFIX: Final = ".json"
_TMP_PREFIX: Final = ".tmp-"
REJECTED_DIR: Final = "rejected"
CLAIMS_DIR: Final = "claims"
STATUS_FILE: Final = ".forwarder-status"
SEEN_DIR: Final = ".seen"
# A temp file this old belongs to an emit that died between write and rename.
STALE_TMP_SECONDS: Final = 60.0
# Spool files: the agent reads them as owner or through the spool's group.
FILE_MODE: Final = 0o640
# A planted symbolic link is never followed, and a FIFO never blocks an open.
_NOFOLLOW: Final = os.O_NOFOLLOW | os.O_CLOEXEC
_READ: Final = os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW
_CREATE: Final = os.O_CREAT | _NOFOLLOW
_WRITE_ROUNDS: Final = 10


@dataclass(frozen=True, slots=True)
class SpoolStats:
    events: int
    bytes: int
    oldest_ns: int | None  # creation time of the oldest event, from its name


def _created_ns(name: str) -> int | None:
    head = name.partition("-")[0]
    return int(head) if head.isdigit() else None


class Spool:
    def __init__(self, directory: Path, *, max_events: int = 0, max_bytes: int = 0):
        self.directory = directory
        self.max_events = max_events  # 0: unbounded
        self.max_bytes = max_bytes

    @property
    def claims_dir(self) -> Path:
        return self.directory / CLAIMS_DIR

    def ensure(self) -> None:
        try:
            created = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o2770)
            if created:
                # mkdir ignores the setgid bit: set it, so files made by the Pacemaker
                # agent (hacluster) get the directory's group and the agent can read them.
                os.chmod(self.directory, 0o2770)  # noqa: S103 - shared with the agent's group
                # The new directory entry itself must survive a power cut too.
                _fsync_dir(self.directory.parent)
        except OSError as exc:
            raise SpoolError(f"cannot create spool {self.directory}: {exc.strerror}") from None

    def write(self, event: Event) -> Path:
        """Make ``event`` durable and return its file. Raises :class:`SpoolError` with a
        one-line reason (spool full, disk full, permissions); a half-written file never
        stays."""
        written = self._write(event, once=False)
        assert written is not None
        return written

    def write_once(self, event: Event) -> Path | None:
        """Like :meth:`write`, but only the first call for an event id spools it; later
        ones (Pacemaker runs its agent once per recipient, in parallel) return None.

        The decision is a hard link of the complete, fsynced temp file to
        ``.seen/<id>``, made before the rename: whoever links first wins. The winner
        holds an exclusive flock on that file until its event is durably in the spool,
        or until it has withdrawn the marker after a failure. A run that finds the
        marker waits for that lock and then looks: a marker still linked means the
        event is in the spool (or was already forwarded); a withdrawn one means the
        first run failed, and this run spools the event itself. So a marker never
        stands for an event that is not in the spool. Markers expire after a day."""
        return self._write(event, once=True)

    def _write(self, event: Event, *, once: bool) -> Path | None:
        self.ensure()
        data = encode_event(event)
        self._check_room(len(data))
        # Only a first run that failed and withdrew its marker makes another round.
        for _ in range(_WRITE_ROUNDS):
            name = f"{time.time_ns():020d}-{event.id}{SUFFIX}"
            final = self.directory / name
            tmp = self.directory / f"{_TMP_PREFIX}{name}"
            fd = -1
            marked = renamed = False
            try:
                fd = os.open(tmp, os.O_WRONLY | _CREATE | os.O_EXCL, FILE_MODE)
                self._share(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                if once:
                    # Held until the event is durable or the marker is withdrawn.
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if not self._mark_seen(tmp, event.id):
                        tmp.unlink()
                        if self._first_run_spooled(event.id):
                            return None
                        continue
                    marked = True
                os.rename(tmp, final)
                renamed = True
                _fsync_dir(self.directory)
                return final
            except OSError as exc:
                # Undo everything before the lock goes: a waiting run must find either
                # the event durably spooled or no marker at all.
                for leftover in (
                    final if renamed else tmp,
                    self.directory / SEEN_DIR / event.id if marked else None,
                ):
                    if leftover is not None:
                        with contextlib.suppress(OSError):
                            leftover.unlink()
                reason = (
                    "disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
                )
                raise SpoolError(f"cannot write to spool {self.directory}: {reason}") from None
            finally:
                if fd >= 0:
                    os.close(fd)
        raise SpoolError(f"cannot write to spool {self.directory}: other runs keep failing")

    def _share(self, fd: int) -> None:
        """Make a new spool file readable by the agent whatever the writer's umask and
        whether or not the directory has its setgid bit: mode 0640, group of the spool.
        Changing the group needs membership of it (or root); without it the file keeps
        the writer's group, and the forwarder sets it aside if it cannot read it."""
        os.fchmod(fd, FILE_MODE)
        group = os.stat(self.directory).st_gid
        if os.fstat(fd).st_gid != group:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, group)

    def _mark_seen(self, tmp: Path, event_id: str) -> bool:
        """True if this is the first file for ``event_id``."""
        seen = self._subdir(SEEN_DIR, 0o2770)
        try:
            os.link(tmp, event_id, dst_dir_fd=seen)
        except FileExistsError:
            return False
        finally:
            os.close(seen)
        return True

    def _subdir(self, name: str, mode: int) -> int:
        """An open descriptor of the spool's directory ``name``, created with ``mode``
        if missing. The group can write the spool, so it could put a link there: that
        is refused, never followed (files are then moved or linked through the
        descriptor, so a swap after this check changes nothing)."""
        path = self.directory / name
        created = False
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            created = True
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SpoolError(
                    f"spool {self.directory}: {name} is not a directory (a link?); not used"
                ) from None
            raise
        if created:
            # mkdir honours the umask and ignores setgid; the group shares some of these.
            os.fchmod(fd, mode)
        return fd

    def _first_run_spooled(self, event_id: str) -> bool:
        """Wait for the run that owns the marker of ``event_id`` to finish; True if its
        event is in the spool (or already forwarded), False if it withdrew the marker."""
        try:
            fd = os.open(self.directory / SEEN_DIR / event_id, _READ)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            # The marker is a link to the event file's inode: withdrawn, and the temp
            # file removed, it has no name left.
            if os.fstat(fd).st_nlink == 0:
                return False
            # A first run killed between its link and its rename left a complete temp
            # file, which the forwarder recovers; make sure its name is on disk too.
            _fsync_dir(self.directory)
            return True
        finally:
            os.close(fd)

    def expire_seen(self, max_age: float = 86400.0, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with contextlib.suppress(FileNotFoundError):
            for entry in list(os.scandir(self.directory / SEEN_DIR)):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > max_age:
                        os.unlink(entry.path)

    def _check_room(self, size: int) -> None:
        if not self.max_events and not self.max_bytes:
            return
        try:
            stats = self.stats(with_bytes=bool(self.max_bytes))
        except OSError as exc:  # a spool this user may not list: say so, not a traceback
            raise SpoolError(f"cannot read spool {self.directory}: {exc.strerror}") from None
        if self.max_events and stats.events >= self.max_events:
            raise SpoolError(
                f"spool {self.directory} is full: {stats.events} events waiting "
                f"(max_events = {self.max_events}); is the forwarder running?"
            )
        if self.max_bytes and stats.bytes + size > self.max_bytes:
            raise SpoolError(
                f"spool {self.directory} is full: {stats.bytes} bytes waiting "
                f"(max_bytes = {self.max_bytes}); is the forwarder running?"
            )

    def stats(self, *, with_bytes: bool = True) -> SpoolStats:
        """Events waiting, claimed ones included, their size and the oldest one's age."""
        events = size = 0
        oldest: int | None = None
        for directory in (self.directory, *self._claim_dirs()):
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not entry.name.endswith(SUFFIX) or entry.name.startswith("."):
                    continue
                events += 1
                if with_bytes:
                    with contextlib.suppress(OSError):
                        size += entry.stat(follow_symlinks=False).st_size
                created = _created_ns(entry.name)
                if created is not None and (oldest is None or created < oldest):
                    oldest = created
        return SpoolStats(events, size, oldest)

    def _claim_dirs(self) -> list[Path]:
        try:
            return [
                Path(e.path) for e in os.scandir(self.claims_dir) if e.is_dir(follow_symlinks=False)
            ]
        except FileNotFoundError:
            return []

    def pending(self) -> Iterator[Path]:
        """Spooled events, oldest first. Temp files of writers in progress are skipped."""
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(self.directory)
                if entry.name.endswith(SUFFIX)
                and not entry.name.startswith(".")
                # Links and other odd entries too: the forwarder sets them aside.
                and not entry.is_dir(follow_symlinks=False)
            )
        except FileNotFoundError:
            return
        for name in names:
            yield self.directory / name

    def read_event(self, path: Path) -> bytes:
        """The bytes of one spool file, never following a link and never reading more
        than an event can hold. Raises :class:`InvalidEvent` for what cannot be an
        event (a link, not a plain file, too large) and OSError when it cannot be read
        (permissions)."""
        try:
            fd = os.open(path, _READ)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidEvent("a symbolic link, not followed") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidEvent("not a regular file")
            if info.st_size > MAX_EVENT_BYTES:
                raise InvalidEvent(
                    f"{info.st_size} bytes, larger than any event ({MAX_EVENT_BYTES})"
                )
            chunks: list[bytes] = []
            size = 0
            # Bounded even if the file grows after the fstat.
            while size <= MAX_EVENT_BYTES and (chunk := os.read(fd, MAX_EVENT_BYTES + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def reject(self, path: Path) -> Path:
        """Move a spool file that cannot be sent aside instead of deleting it: nothing
        is lost, and the forwarder does not trip over it again. A ``rejected`` that is
        not a real directory (a planted link) is refused, never followed."""
        dir_fd = self._subdir(REJECTED_DIR, 0o750)
        try:
            os.replace(path, path.name, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        return self.directory / REJECTED_DIR / path.name

    def recover_stale_tmp(self, now: float | None = None) -> list[tuple[Path, str]]:
        """Deal with temp files of writers that died: a complete event is put in place
        (its emit may have failed, so it can arrive twice, but it is not lost), anything
        else is set aside. Returns what was done, for the log."""
        from shared.event import decode_event

        now = time.time() if now is None else now
        done: list[tuple[Path, str]] = []
        for entry in list(os.scandir(self.directory)):
            if not entry.name.startswith(_TMP_PREFIX):
                continue
            path = Path(entry.path)
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < STALE_TMP_SECONDS:
                    continue
                try:
                    decode_event(self.read_event(path))
                except Exception:
                    done.append((self.reject(path), "set aside a half-written event"))
                    continue
                target = self.directory / entry.name[len(_TMP_PREFIX) :]
                os.rename(path, target)
                done.append((target, "recovered an event whose writer died"))
            except OSError:
                continue  # another forwarder dealt with it first
        return done

    def new_claim(self) -> Claim:
        return Claim(self)

    def release_orphaned_claims(self, own: Claim | None = None) -> int:
        """Give back the files of forwarders that died (their lock is free). Another
        forwarder may be doing the same at the same moment: a file gone is fine."""
        released = 0
        for directory in self._claim_dirs():
            if own is not None and directory == own.directory:
                continue  # flock is per process on some file systems (NFS)
            lock_path = directory.with_suffix(".lock")
            try:
                fd = os.open(lock_path, os.O_RDWR | _NOFOLLOW)
            except FileNotFoundError:
                fd = -1
            try:
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # its forwarder is alive
                with contextlib.suppress(FileNotFoundError):
                    for entry in list(os.scandir(directory)):
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(entry.path, self.directory / entry.name)
                            released += 1
                    directory.rmdir()
                with contextlib.suppress(FileNotFoundError):
                    lock_path.unlink()
            finally:
                if fd >= 0:
                    os.close(fd)
        if released:
            _fsync_dir(self.directory)
        return released

    def forwarders_running(self) -> int:
        """How many forwarders hold a claim on this spool now (each holds its lock for
        as long as it lives; see :class:`Claim`)."""
        running = 0
        for directory in self._claim_dirs():
            try:
                fd = os.open(directory.with_suffix(".lock"), os.O_RDONLY | _NOFOLLOW)
            except OSError:
                continue  # gone, or not ours to read: not a live forwarder we can see
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                running += 1
            except OSError:
                pass
            finally:
                os.close(fd)  # also drops the lock, had it been free
        return running

    def write_status(self, status: dict[str, object]) -> None:
        """Best effort: status is for operators, never worth failing forwarding for.
        Written to a temp file of a fresh name (O_EXCL: a planted link is never
        followed) and renamed over the status file (a rename replaces a link there,
        it does not write through it)."""
        tmp = self.directory / f"{STATUS_FILE}.tmp-{uuid.uuid4().hex}"
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_WRONLY | _CREATE | os.O_EXCL, FILE_MODE)
            try:
                os.write(fd, json.dumps(status).encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / STATUS_FILE)
        with contextlib.suppress(OSError):
            tmp.unlink()

    def read_status(self) -> dict[str, object]:
        try:
            data = json.loads(self.read_event(self.directory / STATUS_FILE))
        except (OSError, ValueError, InvalidEvent):
            return {}
        return data if isinstance(data, dict) else {}


class Claim:
    """The files one forwarder has taken from the spool, held under an flock."""

    def __init__(self, spool: Spool):
        self.spool = spool
        claim_id = uuid.uuid4().hex
        spool.ensure()
        # Refuses a link in place of claims/; the claim's own names are fresh ones.
        os.close(spool._subdir(CLAIMS_DIR, 0o2770))
        self.directory = spool.claims_dir / claim_id
        self._lock_fd = os.open(self.directory.with_suffix(".lock"), os.O_RDWR | _CREATE, 0o640)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.directory.mkdir(mode=0o2770)

    def take(self, path: Path) -> Path | None:
        """Claim ``path``; None if another forwarder took it first."""
        target = self.directory / path.name
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        return target

    def give_back(self, claimed: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rename(claimed, self.spool.directory / claimed.name)

    def close(self) -> None:
        """Give back everything still claimed and drop the claim."""
        with contextlib.suppress(FileNotFoundError):
            for entry in list(os.scandir(self.directory)):
                self.give_back(Path(entry.path))
            self.directory.rmdir()
        with contextlib.suppress(FileNotFoundError):
            self.directory.with_suffix(".lock").unlink()
        os.close(self._lock_fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
