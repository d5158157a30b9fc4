"""The cluster event and its JSON wire codec (docs/design.md, "The event").

Two kinds of bad input are treated differently on purpose:

* Structural faults (not JSON, a missing or wrongly typed field, a module name outside
  ``[a-z0-9_-]{1,32}``, more than 64 KiB) make the event unusable; they raise
  :class:`InvalidEvent` with a one-line reason.
* Dirty content (control characters, bad UTF-8, over-long values) is cleaned: control
  characters are shown escaped, invalid bytes become U+FFFD and long values are cut with a
  visible marker. Refusing an alert over a stray newline would lose it, and cleaning here
  means nothing from an event can reach a mail header raw.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from shared.errors import InvalidEvent
from shared.levels import LEVELS, Level

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_PARAMS",
    "PARAM_KEY_RE",
    "SCHEMA_VERSION",
    "Event",
    "canonical_uuid",
    "clean_text",
    "decode_event",
    "encode_event",
    "event_doc",
    "event_from_doc",
    "new_event",
    "peek_event",
    "routing_key",
    "visible",
]

SCHEMA_VERSION: Final = 1
MAX_EVENT_BYTES: Final = 64 * 1024
MAX_PARAMS: Final = 64
MAX_NAME_CHARS: Final = 255  # cluster, node
MAX_PARAM_BYTES: Final = 4 * 1024
MAX_TEXT_BYTES: Final = 16 * 1024
MAX_SOURCE_CHARS: Final = 32
MAX_EVENT_ID: Final = 2**63 - 1  # an AMQP/JSON-safe integer, and a short header

MODULE_RE: Final = re.compile(r"[a-z0-9_-]{1,32}")
# Params are referenced from catalog texts as {name}, so keys must be placeholder-safe.
PARAM_KEY_RE: Final = re.compile(r"[A-Za-z0-9_]{1,64}")

# C0, DEL, C1, and the Unicode line/paragraph separators some mail clients honour.
# Lone surrogates (from "\udc80"-style JSON escapes) cannot be encoded at all downstream.
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")
_CANONICAL_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NAMED_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _truncate_bytes(text: str, limit: int) -> str:
    """Cut ``text`` so its UTF-8 form, marker included, fits ``limit`` bytes."""
    if len(text) * 4 <= limit or (len(text) <= limit and text.isascii()):
        return text  # fits whatever its characters (UTF-8 takes at most 4 bytes each)
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    marker = f" [truncated, {len(encoded)} bytes]"
    keep = encoded[: max(0, limit - len(marker))].decode("utf-8", errors="ignore")
    return keep + marker


def visible(value: str) -> str:
    """An untrusted string safe to print: control characters escaped visibly (``\\x1b``,
    ``\\r``), lone surrogates replaced."""
    if value.isascii() and value.isprintable():
        return value  # space to tilde only: nothing to escape (the usual case, cheaply)
    return _CONTROL_RE.sub(_escape_control, _SURROGATE_RE.sub("\ufffd", value))


def clean_text(value: str, max_bytes: int) -> str:
    """Make an untrusted string safe to show anywhere: :func:`visible`, and at most
    ``max_bytes`` of UTF-8."""
    return _truncate_bytes(visible(value), max_bytes)


def _clean_name(value: str, max_chars: int) -> str:
    """Like :func:`clean_text`, but limited in characters, as the schema counts them."""
    value = clean_text(value, max_chars * 4 + 64)
    if len(value) <= max_chars:
        return value
    marker = "[truncated]"
    return value[: max_chars - len(marker)] + marker


@dataclass(frozen=True, slots=True)
class Event:
    """One cluster event. Instances are always clean: build them with :func:`new_event` or
    :func:`decode_event`, which enforce the wire rules."""

    id: str
    time: datetime
    cluster: str
    node: str
    module: str
    event_id: int
    source: str
    level: Level | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    text: str | None = None
    # The node whose producer spooled the event; ``node`` is the node it is about.
    reporter: str | None = None

    @property
    def key(self) -> str:
        """The catalog and filter key, ``module:event_id``."""
        return f"{self.module}:{self.event_id}"

    @property
    def reported_by(self) -> str:
        """Who reported the event: its ``reporter``, else (events from before the field
        existed) the node it is about."""
        return self.reporter if self.reporter is not None else self.node


def _routing_key(module: str, event_id: int, node: str) -> str:
    """``{module}.{event_id}.{node}``. Dots in the node would add topic words, so they
    become underscores; AMQP caps routing keys at 255 bytes."""
    key = f"{module}.{event_id}.{node.replace('.', '_')}"
    return key.encode("utf-8")[:255].decode("utf-8", errors="ignore")


def routing_key(event: Event) -> str:
    """The routing key an event is published with (the heartbeats and the canary are
    published from ``Event`` objects, not from spooled bytes)."""
    return _routing_key(event.module, event.event_id, event.node)


def peek_event(raw: bytes) -> tuple[str, str]:
    """The id and routing key of a spooled event, checking only what publishing needs.
    Spool files were cleaned when they were written, and the worker decodes everything
    fully; the forwarder's hot path only has to refuse what is not an event at all."""
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(raw)} bytes, at most {MAX_EVENT_BYTES} allowed")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or doc.get("v") != SCHEMA_VERSION:
        raise InvalidEvent("not a version 1 event object")
    event_uuid, module, event_id, node = (doc.get(k) for k in ("id", "module", "event_id", "node"))
    # The id goes into logs and the AMQP message_id: only the canonical form passes.
    if not isinstance(event_uuid, str) or not _CANONICAL_UUID.fullmatch(event_uuid):
        raise InvalidEvent("id: not a UUID")
    if not isinstance(module, str) or not MODULE_RE.fullmatch(module):
        raise InvalidEvent("module: missing or invalid")
    if isinstance(event_id, bool) or not isinstance(event_id, int) or event_id < 0:
        raise InvalidEvent("event_id: missing or invalid")
    if not isinstance(node, str):
        raise InvalidEvent("node: missing or invalid")
    return event_uuid, _routing_key(module, event_id, node)


def canonical_uuid(value: str) -> str:
    """``value`` in the canonical form of a UUID; ValueError if it is none. The form every
    id is written in passes unparsed: ids are checked at each decode, events many times."""
    if _CANONICAL_UUID.fullmatch(value):
        return value
    return str(uuid.UUID(value))


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise InvalidEvent(f"time: timestamp has no UTC offset: {value[:40]!r}")
        # Near datetime's limits the conversion overflows: still only a bad timestamp.
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidEvent(f"time: not an RFC 3339 timestamp: {value[:40]!r}") from None


# Levels other sources use, mapped onto ours. Anything else is dropped rather than
# refused: the level is optional and the catalog's level wins anyway.
_LEVEL_ALIASES: Final = {
    "warn": "warning",
    "notice": "info",
    "debug": "info",
    "err": "error",
    "crit": "error",
    "critical": "error",
    "alert": "error",
    "emerg": "error",
    "fatal": "error",
}


def _as_level(value: object) -> Level | None:
    if not isinstance(value, str):
        return None
    lowered = value.strip().lower()
    lowered = _LEVEL_ALIASES.get(lowered, lowered)
    for level in LEVELS:
        if lowered == level:
            return level
    return None


def _check_params(params: Mapping[str, object]) -> dict[str, str]:
    """Validate keys and types; escape values but do not cut them yet (see :func:`_fit`)."""
    if len(params) > MAX_PARAMS:
        raise InvalidEvent(f"params: {len(params)} keys, at most {MAX_PARAMS} allowed")
    cleaned: dict[str, str] = {}
    for key, value in params.items():
        if not isinstance(key, str) or not PARAM_KEY_RE.fullmatch(key):
            raise InvalidEvent(
                f"params: key {str(key)[:40]!r} must be 1-64 letters, digits or underscores"
            )
        if not isinstance(value, str):
            raise InvalidEvent(f"params.{key}: expected a string, got {type(value).__name__}")
        cleaned[key] = clean_text(value, len(value.encode("utf-8", "surrogatepass")) * 4 + 64)
    return cleaned


def _fit(event: Event) -> Event:
    """Cut param values to their 4 KiB limit, then halve the limit of the largest until
    the encoded event fits the wire limit. Per-value limits alone allow 64 x 4 KiB, far
    over 64 KiB; cutting the biggest values keeps every key, so every placeholder still
    has its (shortened) value. Markers give the original size."""
    params = event.params
    limits = dict.fromkeys(params, MAX_PARAM_BYTES)

    def cut() -> dict[str, str]:
        return {k: _truncate_bytes(v, limits[k]) for k, v in params.items()}

    fitted = cut()
    # The common case needs no encoding to know it fits: at most 4 bytes per character,
    # plus JSON quoting (escapes double a character at most, as \uXXXX is ASCII).
    rough = sum(len(k) + 6 * len(v) for k, v in fitted.items()) + 6 * (
        len(event.cluster) + len(event.node) + len(event.reporter or "") + len(event.text or "")
    )
    if rough + 1024 < MAX_EVENT_BYTES:
        if all(fitted[k] is v for k, v in params.items()):
            return event  # nothing was cut: the usual case needs no second event
        return Event(**{**_fields(event), "params": fitted})
    while len(_encode_unchecked(event, fitted)) > MAX_EVENT_BYTES:
        biggest = max(fitted, key=lambda k: len(fitted[k].encode("utf-8")), default=None)
        if biggest is None or limits[biggest] <= 128:
            raise InvalidEvent(f"event is larger than {MAX_EVENT_BYTES} bytes after truncation")
        limits[biggest] = min(limits[biggest], len(fitted[biggest].encode("utf-8"))) // 2
        fitted = cut()
    return Event(**{**_fields(event), "params": fitted})


def _fields(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in Event.__slots__}


def new_event(
    *,
    module: str,
    event_id: int,
    cluster: str,
    node: str,
    source: str,
    level: str | None = None,
    params: Mapping[str, object] | None = None,
    text: str | None = None,
    time: datetime | None = None,
    id: str | None = None,
    reporter: str | None = None,
) -> Event:
    """Build a clean event from local input (CLI arguments, an alert agent's environment).
    Raises :class:`InvalidEvent` for structural faults, cleans everything else."""
    if not MODULE_RE.fullmatch(module):
        raise InvalidEvent(f"module: {module[:40]!r} must match [a-z0-9_-]{{1,32}}")
    if (
        isinstance(event_id, bool)
        or not isinstance(event_id, int)
        or not 0 <= event_id <= MAX_EVENT_ID
    ):
        raise InvalidEvent(
            f"event_id: expected an integer from 0 to {MAX_EVENT_ID}, got {str(event_id)[:40]}"
        )
    event = Event(
        id=canonical_uuid(id) if id else str(uuid.uuid4()),
        time=(time or datetime.now(UTC)).astimezone(UTC),
        cluster=_clean_name(cluster, MAX_NAME_CHARS),
        node=_clean_name(node, MAX_NAME_CHARS),
        module=module,
        event_id=event_id,
        source=_clean_name(source, MAX_SOURCE_CHARS),
        level=_as_level(level),
        text=None if text is None else clean_text(text, MAX_TEXT_BYTES),
        reporter=None if reporter is None else _clean_name(reporter, MAX_NAME_CHARS),
        params=_check_params(params or {}),
    )
    return _fit(event)


def _doc(event: Event, params: Mapping[str, str]) -> dict[str, object]:
    doc: dict[str, object] = {
        "v": SCHEMA_VERSION,
        "id": event.id,
        "time": _format_time(event.time),
        "cluster": event.cluster,
        "node": event.node,
        "module": event.module,
        "event_id": event.event_id,
        "params": dict(params),
        "source": event.source,
    }
    if event.level is not None:
        doc["level"] = event.level
    if event.text is not None:
        doc["text"] = event.text
    if event.reporter is not None:
        doc["reporter"] = event.reporter
    return doc


def _encode_unchecked(event: Event, params: Mapping[str, str]) -> bytes:
    return json.dumps(_doc(event, params), ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8"
    )


def event_doc(event: Event) -> dict[str, object]:
    """The wire form as a JSON object, for formats that carry events inside them."""
    return _doc(event, event.params)


def encode_event(event: Event) -> bytes:
    """The wire form: compact JSON in UTF-8."""
    return _encode_unchecked(event, event.params)


def _require(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in doc:
        raise InvalidEvent(f"{name}: missing")
    value = doc[name]
    # bool is an int subclass; JSON true is never a valid event_id or version.
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidEvent(f"{name}: expected {expected}, got {type(value).__name__}")
    return value


def _optional_str(doc: Mapping[str, Any], name: str) -> str | None:
    if doc.get(name) is None:
        return None
    return str(_require(doc, name, str))


def decode_event(raw: bytes) -> Event:
    """Parse and clean a wire event. Raises :class:`InvalidEvent` with a one-line reason."""
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(raw)} bytes, at most {MAX_EVENT_BYTES} allowed")
    # Invalid UTF-8 is dirt, not structure: replace it and let cleaning make it visible.
    text = raw.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers beyond Python's digit limit.
        raise InvalidEvent(f"not JSON: {str(exc)[:200]}") from None
    return event_from_doc(doc)


def event_from_doc(doc: object) -> Event:
    """Check and clean an event already parsed from JSON (see :func:`decode_event`)."""
    if not isinstance(doc, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(doc).__name__}")
    version = _require(doc, "v", int)
    if version != SCHEMA_VERSION:
        raise InvalidEvent(f"v: unsupported schema version {version}")
    event_uuid = _require(doc, "id", str)
    try:
        event_uuid = canonical_uuid(event_uuid)
    except ValueError:
        raise InvalidEvent(f"id: not a UUID: {event_uuid[:40]!r}") from None
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise InvalidEvent(f"params: expected object, got {type(params).__name__}")
    return new_event(
        id=event_uuid,
        time=_parse_time(_require(doc, "time", str)),
        cluster=_require(doc, "cluster", str),
        node=_require(doc, "node", str),
        module=_require(doc, "module", str),
        event_id=_require(doc, "event_id", int),
        source=_require(doc, "source", str),
        level=level if isinstance(level := doc.get("level"), str) else None,
        params=params,
        text=_optional_str(doc, "text"),
        reporter=_optional_str(doc, "reporter"),
    )
