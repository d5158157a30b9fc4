"""A pytest plugin that scripts/mutate loads: the tests run in an empty scratch directory
of their own, not in mutmut's ``mutants/``.

A mutant can turn a path into ``None``, and ``os.scandir(None)`` lists the working
directory: a spool clean-up so mutated (giving back claims, moving stale temp files aside,
expiring markers) would move or delete mutmut's own files and wreck the run. In the
scratch directory it finds nothing. Collection is over by then, so every import has been
resolved."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_scratch: list[str] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    scratch = tempfile.mkdtemp(prefix="clusteralert-mutant-")
    _scratch.append(scratch)
    os.chdir(scratch)


def pytest_sessionfinish(session: pytest.Session) -> None:
    # pytest is back in the directory it started in by now; only the scratch directory,
    # by the name it was made with, is removed.
    while _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)
