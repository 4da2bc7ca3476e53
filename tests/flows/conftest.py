"""Fixtures for the flow tests: ONE Prefect test harness per session (~10 s: temporary SQLite + API subprocess) and
one small sample build shared by the tests that only read it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# A small slice of the embedded sample: enough rows to exercise every ingest reject and download failure kind
# (the sample puts them in its first rows) while img2dataset stays in the ~10-20 s range.
SAMPLE_ROWS = 200


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    # Results and cache records of this session live in a temporary folder, never in the repo's .prefect-home.
    with (temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}),
          prefect_test_harness(server_startup_timeout=90)):
        yield


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from curation.sample import make_sample

    info = make_sample(tmp_path_factory.mktemp("sample"), n_rows=SAMPLE_ROWS)
    return {"root": Path(info.root), "source_tsv": Path(info.source_tsv), "eval_dir": Path(info.eval_dir)}


@pytest.fixture(scope="session")
def small_config() -> dict[str, Any]:
    """Build overrides that keep a test build small and quick: 2 ingest parts (exercises the fan-out), 2 shards."""
    return {"rows_per_part": 100, "samples_per_shard": 25, "processes": 1, "threads": 8, "image_size": 64,
            "download": {"timeout": 2}}


@pytest.fixture(scope="session")
def sample_build(prefect_harness, sample_source, small_config, tmp_path_factory) -> dict[str, Any]:
    """The flow run once on the small sample; tests that only read the result share it (read-only!)."""
    from flows.build import build_cc4m

    build_dir = tmp_path_factory.mktemp("builds") / "cc4m"
    summary = build_cc4m(build_dir=str(build_dir), config=small_config, sample=True,
                         sample_dir=str(sample_source["root"]), sample_rows=SAMPLE_ROWS)
    return summary
