"""A wrapper that keeps secrets out of reprs, logs, tracebacks and metrics."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from shared.errors import ClusteralertError

__all__ = ["Secret", "read_secret_file"]

# Far above any password or token; a file larger than this is a mistake, not a secret.
MAX_SECRET_BYTES: Final = 64 * 1024


class Secret:
    """Holds a password. ``str``/``repr`` show a mask; call :meth:`reveal` at the one place
    that must hand it to a client library."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str:
        # Refuse pickling: a pickled config is a secret written somewhere unexpected.
        raise TypeError("Secret cannot be pickled")


def read_secret_file(path: Path) -> Secret:
    """Read a secret file, stripping exactly one trailing newline (as editors and
    ``echo`` add one). Raises with the file name and the OS reason, never the content.

    Only a regular file of at most ``MAX_SECRET_BYTES`` is read: a path naming
    /dev/zero or a FIFO nobody writes would otherwise stall start-up for ever."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ClusteralertError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ClusteralertError(f"cannot read {path}: not a regular file")
        raw = os.read(fd, MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ClusteralertError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_SECRET_BYTES:
        raise ClusteralertError(f"cannot read {path}: larger than {MAX_SECRET_BYTES} bytes")
    try:
        data = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ClusteralertError(f"cannot read {path}: not UTF-8 text") from None
    if data.endswith("\r\n"):
        data = data[:-2]
    elif data.endswith("\n"):
        data = data[:-1]
    if not data:
        raise ClusteralertError(f"{path} is empty")
    return Secret(data)
