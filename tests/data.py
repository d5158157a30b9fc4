"""Where tests find the team's real-world inputs: ``../shared/data`` beside the
repository (CI has it too), or ``$CLUSTERALERT_SHARED_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data(name: str) -> Path:
    base = os.environ.get("CLUSTERALERT_SHARED_DATA")
    root = Path(base) if base else Path(__file__).resolve().parents[2] / "shared" / "data"
    path = root / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: tests read real-world inputs from ../shared/data "
            "(or $CLUSTERALERT_SHARED_DATA)"
        )
    return path
