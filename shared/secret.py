"""A wrapper that keeps secrets out of reprs, logs, tracebacks and metrics."""

from __future__ import annotations

from pathlib import Path

from shared.errors import ClusteralertError

__all__ = ["Secret", "read_secret_file"]


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
    ``echo`` add one). Raises with the file name and the OS reason, never the content."""
    try:
        data = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ClusteralertError(f"cannot read {path}: {reason}") from None
    if data.endswith("\r\n"):
        data = data[:-2]
    elif data.endswith("\n"):
        data = data[:-1]
    if not data:
        raise ClusteralertError(f"{path} is empty")
    return Secret(data)
