"""What both command-line programs share: one-line error reporting and stop signals."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from shared.errors import ClusteralertError, ConfigError

__all__ = ["key_values", "on_stop_signal", "report_errors"]


def report_errors(prog: str, command: Callable[[], int]) -> int:
    """Run ``command``; turn our errors into one line each on stderr and exit code 1.
    A config error prints every problem found, so one run shows everything to fix."""
    try:
        return command()
    except BrokenPipeError:
        # The reader went away (``... | head``): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{prog}: {problem}", file=sys.stderr)
        return 1
    except ClusteralertError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1


def on_stop_signal(callback: Callable[[str], None]) -> None:
    """Call ``callback(signal name)`` on SIGTERM and SIGINT instead of dying mid-publish."""

    def handler(signum: int, frame: FrameType | None) -> None:
        callback(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def key_values(
    pairs: Sequence[str], error: type[ClusteralertError] = ClusteralertError
) -> dict[str, str]:
    """``--param KEY=VALUE`` options as a dict; ``error`` (one line) for a pair without
    ``=``, so that each command refuses it with its own exit status."""
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise error(f"--param {pair[:40]!r}: expected KEY=VALUE")
        if key in params and params[key] != value:
            # Which one was meant, only the operator knows.
            raise error(f"--param {key[:40]!r} given twice, with different values")
        params[key] = value
    return params


class Version(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked, so
    that every other run (``emit`` on a cluster node above all) skips the lookup."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, nargs=0, help="print the version and exit"
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("clusteralert")
        except PackageNotFoundError:
            installed = "(not installed as a package)"
        print(f"{parser.prog} {installed}")
        parser.exit()
