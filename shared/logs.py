"""Log setup shared by the command-line programs: one line per record, on stderr, as
text or (``--log-format json``) as one JSON object per line for log shippers."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

__all__ = ["JsonFormatter", "setup_logging"]

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already rendered, e.g. by a filter that masked secrets
            doc["exception"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(verbose: bool = False, fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Neither format shows the source line, thread or process of a record, which every
    # record would otherwise look up: a stack walk, a thread lookup and a getpid each
    # (about a quarter of a line's cost, and the worker logs a line per mail).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # pika and amqp log every reconnect attempt at length; our own lines say what matters.
    # pika does so at ERROR, five lines an attempt, with object reprs: only -v shows it.
    for noisy in ("pika", "amqp", "kombu"):
        quiet = logging.CRITICAL if noisy == "pika" else logging.WARNING
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else quiet)
