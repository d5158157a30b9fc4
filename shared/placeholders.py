"""Placeholder substitution for catalog texts and the subject line.

``{name}`` (letters, digits, underscore; ``{1}`` is positional parameter 1) is replaced by
its value. This is our own substitution rather than ``str.format``: catalog texts come
from files, and ``str.format`` would let a text reach attributes (``{0.__class__}``) or
fail on a stray brace. A placeholder without a value renders visibly as ``{name?}``, so a
mail is never lost over a missing parameter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = ["placeholders", "render_template"]

_PLACEHOLDER_RE: Final = re.compile(r"\{([A-Za-z0-9_]+)\}")


def render_template(template: str, values: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        return f"{{{match.group(1)}?}}" if value is None else value

    return _PLACEHOLDER_RE.sub(substitute, template)


def placeholders(template: str) -> list[str]:
    """The placeholder names a template uses, in order."""
    return _PLACEHOLDER_RE.findall(template)
