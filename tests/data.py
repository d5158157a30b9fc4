"""Where tests find vendor inputs: our own fixture in the vendor's format (always), and the
vendor's full published list (only when ``CLUSTERALERT_VENDOR_LIST`` names a copy; it is not
ours to redistribute, so it never lives in the repository)."""

from __future__ import annotations

import os
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VENDOR_SAMPLE = FIXTURES / "vendor_sample.csv"
VENDOR_LIST_ENV = "CLUSTERALERT_VENDOR_LIST"


def vendor_list_path() -> Path | None:
    value = os.environ.get(VENDOR_LIST_ENV)
    return Path(value) if value else None


def vendor_list() -> Path:
    path = vendor_list_path()
    # conftest collects the module only when the variable is set; a wrong path must fail.
    assert path is not None, f"{VENDOR_LIST_ENV} is not set"
    assert path.is_file(), f"{VENDOR_LIST_ENV}={path} is not a file"
    return path
