"""A skipped test fails the run: CI has RabbitMQ and every dependency, so a skip can only
hide a failure. A plugin of its own so that a test can run it against a throwaway suite."""

from __future__ import annotations

import pytest

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module-level skip (importorskip, pytest.skip(allow_module_level=True)) is reported
    # at collection, never as a test: without this hook it would pass the run unseen.
    if report.skipped:
        _skipped.append(report.nodeid or "collection")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nskipped tests fail the run: {', '.join(_skipped)}")
