"""The one placeholder grammar of catalog texts, for the renderer, the vendor CSV reader
and the follower's match-back alike.

- ``{name}`` (letters, digits, underscore; ``{1}`` is positional parameter 1) is what a
  catalog text holds and what the renderer substitutes. This is our own substitution
  rather than ``str.format``: catalog texts come from files, and ``str.format`` would let
  a text reach attributes (``{0.__class__}``) or fail on a stray brace. A placeholder
  without a value renders visibly as ``{name?}``, so a mail is never lost over a missing
  parameter.
- ``%1``, ``%2``... are the vendor's spelling of ``{1}``, ``{2}``...: ``%N`` with N from 1,
  not followed by more of a printf conversion, so ``0x%08x`` or ``%s`` stay literal text.
  The CSV reader rewrites them as ``{N}``; the match-back reads both spellings, since a
  logged wording may be written either way.

Only the standard library: the node agent imports this for its match-back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = ["from_vendor", "placeholders", "render_template", "split_template"]

_BRACED: Final = r"\{([A-Za-z0-9_]+)\}"
_VENDOR: Final = r"%([1-9][0-9]*)(?![0-9A-Za-z])"
_BRACED_RE: Final = re.compile(_BRACED)
_VENDOR_RE: Final = re.compile(_VENDOR)
_EITHER_RE: Final = re.compile(f"{_BRACED}|{_VENDOR}")


def render_template(template: str, values: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        return f"{{{match.group(1)}?}}" if value is None else value

    return _BRACED_RE.sub(substitute, template)


def placeholders(template: str) -> list[str]:
    """The placeholder names a template uses, in order."""
    return _BRACED_RE.findall(template)


def from_vendor(text: str) -> str:
    """A vendor text with its ``%N`` written as ``{N}``."""
    return _VENDOR_RE.sub(r"{\1}", text)


def split_template(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``text`` as ``(literals, names)``: ``literals[0] names[0] literals[1] ...
    names[-1] literals[-1]``, one literal more than names. ``{1}`` and ``%1`` are both
    name ``"1"``."""
    literals: list[str] = []
    names: list[str] = []
    position = 0
    for match in _EITHER_RE.finditer(text):
        literals.append(text[position : match.start()])
        names.append(match.group(1) or match.group(2))
        position = match.end()
    literals.append(text[position:])
    return tuple(literals), tuple(names)
