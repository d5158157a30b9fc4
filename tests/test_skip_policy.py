"""The rule that a skip fails the run holds for every kind of skip pytest knows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PASSING = "def test_fine() -> None:\n    assert 1 + 1 == 2\n"
SKIPS = {
    "module importorskip": 'import pytest\npytest.importorskip("no_such_module_here")\n',
    "module skip": 'import pytest\npytest.skip("off", allow_module_level=True)\n',
    "test skip": 'import pytest\ndef test_s() -> None:\n    pytest.skip("off")\n',
    "skip marker": "import pytest\n@pytest.mark.skip\ndef test_s() -> None:\n    pass\n",
}


def run_suite(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.skip_policy",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("kind", sorted(SKIPS))
def test_every_kind_of_skip_fails_the_run(tmp_path: Path, kind: str) -> None:
    result = run_suite(tmp_path, {"test_ok.py": PASSING, "test_skipping.py": SKIPS[kind]})
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "skipped tests fail the run: " in result.stdout
    assert "test_skipping.py" in result.stdout


def test_a_suite_without_skips_passes(tmp_path: Path) -> None:
    result = run_suite(tmp_path, {"test_ok.py": PASSING})
    assert result.returncode == 0, result.stdout
    assert "skipped tests fail the run" not in result.stdout
