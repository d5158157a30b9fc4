"""Secrets out of text that leaves the worker: the scrubber's forms of a secret, relay
text masked before it is cut, and the log filter (unit level; the end-to-end check with
an echoing relay is in test_faults.py)."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator

import pytest

from shared.logs import JsonFormatter
from shared.secret import Secret
from worker.classify import classify_auth, classify_response
from worker.scrub import MASK, LogScrubber, Scrubber

PASSWORD = "s3cret/pass+word"
scrub = Scrubber([Secret(PASSWORD), None])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_every_form_of_the_secret_is_masked() -> None:
    raw = PASSWORD.encode()
    forms = {
        "as given": PASSWORD,
        "AUTH LOGIN": b64(raw),
        "AUTH PLAIN": b64(b"\0alert\0" + raw),
        "AUTH PLAIN with an authzid": b64(b"admin\0alert\0" + raw),
        # The secret starts at each offset modulo 3 in one of these encodings.
        "AUTH PLAIN, user abc": b64(b"\0abc\0" + raw),
        "percent-encoded, as in a URL": "s3cret%2Fpass%2Bword",
    }
    for name, form in forms.items():
        masked = scrub(f"535 5.7.8 rejected {form} (try again)")
        assert form not in masked, name
        assert masked == f"535 5.7.8 rejected {MASK} (try again)", name


def test_an_encoding_glued_to_other_text_is_masked() -> None:
    blob = b64(b"\0alert\0" + PASSWORD.encode())
    for prefix in ("x", "ab", "pw=", "auth:"):
        assert blob not in scrub(f"535 {prefix}{blob}"), prefix


def test_ordinary_text_is_left_alone() -> None:
    text = "451 4.3.0 Try again later; queue id 7F3A2B1C0D, see https://example.com/why"
    assert scrub(text) == text
    assert Scrubber([])(text) == text


def test_relay_text_is_masked_before_it_is_cut() -> None:
    # The password straddles the 300-character cut: cut first, a prefix would survive.
    message = "x" * 290 + PASSWORD
    for error in (
        classify_response(451, message, scrub),
        classify_auth(_auth_error(message), scrub),
    ):
        assert PASSWORD[:8] not in error.detail
        assert len(error.detail) <= 300


def _auth_error(message: str) -> Exception:
    import aiosmtplib

    return aiosmtplib.SMTPAuthenticationError(535, message)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, io.StringIO]]:
    text, json_out = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(json_out)]
    handlers[0].setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handlers[1].setFormatter(JsonFormatter())
    logger = logging.getLogger("test_scrub")
    logger.propagate = False
    for handler in handlers:
        handler.addFilter(LogScrubber(scrub))
        logger.addHandler(handler)
    yield logger, text, json_out
    for handler in handlers:
        logger.removeHandler(handler)


def test_log_lines_and_tracebacks_are_masked_in_text_and_json(
    captured: tuple[logging.Logger, io.StringIO, io.StringIO],
) -> None:
    logger, text, json_out = captured
    logger.warning("relay said %s", f"535 {b64(PASSWORD.encode())}")
    try:
        raise RuntimeError(f"unexpected reply 554 {PASSWORD}")
    except RuntimeError:
        logger.exception("handling failed")
    for out in (text.getvalue(), json_out.getvalue()):
        assert PASSWORD not in out and b64(PASSWORD.encode()) not in out
        assert "RuntimeError: unexpected reply 554" in out  # the traceback is still there
        assert out.count(MASK) == 2
