"""Log setup shared by the command-line programs: one line per record, on stderr."""

from __future__ import annotations

import logging

__all__ = ["setup_logging"]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pika and amqp log every reconnect attempt at length; our own lines say what matters.
    for noisy in ("pika", "amqp", "kombu"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
