"""Shared fixtures: the real H&E data folder and small temporary stores.

The data folder comes from ``SCRATCHPATH_TEST_DATA`` (default ``../shared/data`` beside the
repository). A missing folder fails the run: tests never silently skip the real data.

Tests marked ``cuda`` (the CUDA tier, ``tests/test_cuda.py``) run where CUDA is present and are
skipped with the reason elsewhere, so that a run without a GPU reports them as not run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# As `scratchpath.cli.main` does: albumentations would otherwise ask PyPI for a newer release.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    reason = pytest.mark.skip(
        reason="CUDA tier: no CUDA device here (torch.cuda.is_available() is False); "
        "not run, see `make gpu-check`"
    )
    for item in cuda_items:
        item.add_marker(reason)


def _data_root() -> Path:
    return Path(os.environ.get("SCRATCHPATH_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the real data (read-only: write into ``tmp_path``)."""
    root = _data_root()
    if not (root / "README.md").is_file():
        pytest.fail(f"real test data not found at {root}; set SCRATCHPATH_TEST_DATA", pytrace=False)
    return root


@pytest.fixture(scope="session")
def slides_dir(data_dir: Path) -> Path:
    return data_dir / "slides"


@pytest.fixture(scope="session")
def tiles_dir(data_dir: Path) -> Path:
    return data_dir / "tiles"
