"""Session-wide test settings: offline, no telemetry, Prefect state kept out of ~/.prefect."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(REPO_ROOT / ".prefect-home"))


@pytest.fixture(scope="session")
def cc3m_captions_tsv() -> Path:
    """The real CC3M validation captions in CC12M layout (read-only fixture from ../shared/data)."""
    path = SHARED_DATA / "cc3m_val_10k.tsv"
    if not path.exists():
        pytest.fail(f"missing shared test data: {path}")
    return path
