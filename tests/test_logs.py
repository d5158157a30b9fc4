"""The log set-up: one line per record in either format, and none of the per-record
lookups (source line, thread, process) that neither format shows."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from shared.logs import setup_logging


@pytest.fixture
def restored() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile, logging.logThreads)
    saved_more = (logging.logProcesses, logging.logMultiprocessing)
    yield
    root.handlers[:], level, logging._srcfile, logging.logThreads = saved
    root.setLevel(level)
    logging.logProcesses, logging.logMultiprocessing = saved_more


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_line_says_what_it_says_without_looking_up_caller_thread_or_process(
    fmt: str, restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(fmt=fmt)  # type: ignore[arg-type]
    records: list[logging.LogRecord] = []
    handler = logging.getLogger().handlers[0]

    def keep(record: logging.LogRecord) -> bool:
        records.append(record)
        return True

    handler.addFilter(keep)
    logging.getLogger("worker.pipeline").info("sent event %s", "e1")
    line = capsys.readouterr().err.strip()
    if fmt == "json":
        doc = json.loads(line)
        assert (doc["level"], doc["logger"], doc["message"]) == (
            "info",
            "worker.pipeline",
            "sent event e1",
        )
    else:
        assert line.endswith(" INFO worker.pipeline: sent event e1")
    (record,) = records
    assert record.lineno == 0  # no stack walk for the caller
    assert record.thread is None and record.process is None
