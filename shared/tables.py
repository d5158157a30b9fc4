"""Typed reading of parsed TOML tables that collects problems instead of stopping at the
first one, so ``check-config`` can show everything wrong in one run. Each problem names
its path, e.g. ``smtp[0].security: expected one of starttls, smtps, none``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from shared.errors import Problem

__all__ = ["Table"]

T = TypeVar("T")
_MISSING: Any = object()


class Table:
    """One TOML table being read. Every key read is marked as known; :meth:`finish`
    reports the rest as unknown, which catches typos such as ``min_levle``."""

    def __init__(self, data: object, path: str, problems: list[Problem]):
        self.path = path
        self.problems = problems
        if isinstance(data, dict):
            self.data: dict[str, Any] = data
        else:
            self.data = {}
            self.error("", f"expected a table, got {type(data).__name__}")
        self._seen: set[str] = set()

    def where(self, key: str) -> str:
        if not key:
            return self.path
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.where(key), message))

    def warn(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.where(key), message, "warning"))

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any, label: str) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.error(key, "missing")
                return None
            return default
        value = self.data[key]
        # TOML booleans are Python ints' subclass: never accept true as a number.
        if isinstance(value, bool) and kind is not bool:
            self.error(key, f"expected {label}, got a boolean")
            return default if default is not _MISSING else None
        if not isinstance(value, kind):
            self.error(key, f"expected {label}, got {_describe(value)}")
            return default if default is not _MISSING else None
        return value

    def text(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, str, default, "a string")

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, bool, default, "true or false")

    def integer(
        self, key: str, default: Any = _MISSING, *, low: int | None = None, high: int | None = None
    ) -> Any:
        value = self._get(key, int, default, "an integer")
        return self._check_range(key, value, default, low, high)

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        low: float | None = None,
        high: float | None = None,
    ) -> Any:
        value = self._get(key, (int, float), default, "a number")
        if isinstance(value, int):
            value = float(value)
        return self._check_range(key, value, default, low, high)

    def _check_range(
        self, key: str, value: Any, default: Any, low: float | None, high: float | None
    ) -> Any:
        if value is None or value is default:
            return value
        if low is not None and value < low:
            self.error(key, f"must be at least {low}, got {value}")
            return default if default is not _MISSING else None
        if high is not None and value > high:
            self.error(key, f"must be at most {high}, got {value}")
            return default if default is not _MISSING else None
        return value

    def choice(self, key: str, options: Sequence[T], default: Any = _MISSING) -> Any:
        value = self._get(key, str, default, "a string")
        if value is None or value is default:
            return value
        if value not in options:
            self.error(key, f"expected one of {', '.join(map(str, options))}, got {value!r}")
            return default if default is not _MISSING else None
        return value

    def str_list(self, key: str, default: Any = _MISSING, *, allow_single: bool = False) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.error(key, "missing")
                return ()
            return default
        value = self.data[key]
        if allow_single and isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(key, f"expected a list of strings, got {_describe(value)}")
            return default if default is not _MISSING else ()
        return tuple(value)

    def table(self, key: str) -> Table:
        self._seen.add(key)
        return Table(self.data.get(key, {}), self.where(key), self.problems)

    def tables(self, key: str) -> list[Table]:
        """An array of tables such as ``[[smtp]]``; elements are named ``smtp[0]``..."""
        self._seen.add(key)
        value = self.data.get(key, [])
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            self.error(key, f"expected an array of tables, got {_describe(value)}")
            return []
        base = self.where(key)
        return [Table(item, f"{base}[{i}]", self.problems) for i, item in enumerate(value)]

    def skip(self, *keys: str) -> None:
        """Mark keys as known without reading them (sections another program reads)."""
        self._seen.update(keys)

    def finish(self) -> None:
        for key in self.data:
            if key not in self._seen:
                self.error(key, "unknown key")


def _describe(value: object) -> str:
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value!r:.40}"
