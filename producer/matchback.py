"""Match-back: recover a catalog text's params from a message that text rendered to.

``Detected an error in monitoring {1}. ({2} : {3})`` (or ``%1`` style, both as
:mod:`shared.placeholders` reads them) is split at its placeholders into literal pieces;
a message matches when it starts with the first piece, ends with the last, and holds the
ones between in order. The pieces are found left to right with ``str.find`` and each
placeholder takes what lies between, so the work is linear in the message length: a
follower's input is anyone's log line, and a regex built from the catalog text (lazy
groups and a full match) backtracks polynomially on a line that nearly fits, holding the
node agent's I/O loop for minutes.

Each placeholder takes the shortest text that lets the rest fit, as a lazy regex would.
A placeholder used twice must take the same text both times, checked after the split;
a message that only a later split would satisfy is not matched back (its text is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.placeholders import split_template

__all__ = ["Template"]


@dataclass(frozen=True, slots=True)
class Template:
    """A catalog text as ``literals[0] names[0] literals[1] ... names[-1] literals[-1]``."""

    literals: tuple[str, ...]
    names: tuple[str, ...]  # params: ``{1}`` and ``%1`` are both param "1"

    @classmethod
    def parse(cls, text: str) -> Template | None:
        """The template of ``text``; None when it has no placeholders (nothing to recover)."""
        literals, names = split_template(text)
        return cls(literals, names) if names else None

    def match(self, message: str) -> dict[str, str] | None:
        """The params that render this template to ``message``, or None."""
        head, tail = self.literals[0], self.literals[-1]
        end = len(message) - len(tail)
        if end < len(head) or not message.startswith(head) or not message.endswith(tail):
            return None
        values: dict[str, str] = {}
        position = len(head)
        for i, name in enumerate(self.names):
            if i + 1 < len(self.names):
                literal = self.literals[i + 1]
                found = message.find(literal, position, end)
                if found < 0:
                    return None
                value, position = message[position:found], found + len(literal)
            else:
                value = message[position:end]
            if values.setdefault(name, value) != value:
                return None
        return values
