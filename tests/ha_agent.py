"""The node agents installed for the cluster managers' users (Pacemaker runs its alert
agent as ``hacluster``; keepalived runs notify scripts as root).

The test's own virtualenv may live where ``hacluster`` cannot read (a clone under /root,
a Python built under /root/.pyenv), so the agent is installed the way the README's bare
node install does it, into a virtualenv of its own under /tmp: a Python 3.11+ that
``hacluster`` can run, the project's two packages the producer needs (``shared`` and
``producer``; the agent modes import nothing else), and the same console scripts pip
writes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN

ROOT = Path(__file__).resolve().parent.parent
AGENT_USER = "hacluster"
AGENT_GROUP = "haclient"
_PACKAGES = ("shared", "producer")
_SCRIPTS = ("clusteralert-producer", "clusteralert-pacemaker-alert")


def as_agent_user(*command: str) -> list[str]:
    return ["runuser", "-u", AGENT_USER, "--", *command]


def _runs_for_agent_user(python: str) -> bool:
    probe = "import sys; sys.exit(sys.version_info < (3, 11))"
    done = subprocess.run(as_agent_user(python, "-c", probe), capture_output=True, check=False)
    return done.returncode == 0


def _python_for_agent_user() -> str:
    candidates = [
        str(Path(sys._base_executable).resolve()),  # type: ignore[attr-defined]
        *(
            found
            for name in ("python3.13", "python3.12", "python3.11", "python3")
            if (found := shutil.which(name, path="/usr/local/bin:/usr/bin")) is not None
        ),
    ]
    for python in candidates:
        if _runs_for_agent_user(python):
            return python
    raise AssertionError(f"no Python 3.11+ that {AGENT_USER} can run among {candidates}")


def install_agent(directory: Path) -> Path:
    """A virtualenv in ``directory`` with the node agent; returns its bin directory."""
    venv = directory / "venv"
    python = _python_for_agent_user()
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    for package in _PACKAGES:
        shutil.copytree(
            ROOT / package, Path(purelib) / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for script in _SCRIPTS:
        # pip's console script, with this virtualenv's interpreter.
        body = (BIN / script).read_text().split("\n", 1)[1]
        target = venv / "bin" / script
        target.write_text(f"#!{venv / 'bin' / 'python'}\n{body}")
        target.chmod(0o755)
    return venv / "bin"


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """A directory the cluster managers' users can reach (pytest's tmp_path is private
    to root), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="clusteralert-lab-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def agent_bin(lab_dir: Path) -> Path:
    return install_agent(lab_dir)
