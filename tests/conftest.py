import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_datasets() -> Path | None:
    """The real datasets for integration checks: $ECAVG_SHARED_DATA or ../shared/datasets beside the repo."""
    for candidate in (os.environ.get("ECAVG_SHARED_DATA"), REPO_ROOT.parent / "shared" / "datasets"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def shared_datasets() -> Path:
    root = find_shared_datasets()
    if root is None:
        pytest.skip("shared datasets not found (set ECAVG_SHARED_DATA or provide ../shared/datasets)")
    return root
