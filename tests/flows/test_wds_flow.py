"""build-cc4m from webdataset shards under the Prefect test harness: no download, and every long stage leaves a
progress artifact at 100 % in the run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _progress_artifacts(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id, *(f.id for f in subflows)])))


@pytest.mark.slow
def test_flow_builds_from_wds_shards_with_progress_artifacts(sample_source, small_config, tmp_path):
    from curation.sample import make_sample
    from curation.sample.wds import make_wds_source
    from flows.build import build_cc4m

    info = make_sample(sample_source["root"], n_rows=200)  # the session's sample (already made: reused)
    wds = make_wds_source(info, tmp_path / "wds", n_shards=2)
    state = build_cc4m(source=wds.pattern, build_dir=str(tmp_path / "cc4m"), config=small_config, return_state=True)
    assert state.is_completed()
    summary = state.result()
    counts = json.loads(Path(summary["manifest"]).read_text())["counts"]
    assert counts["ingest"]["rejected_by_reason"] == {"empty_caption": 1, "no_image": 1}
    assert counts["reshard"]["written"] > 0 and not (tmp_path / "cc4m" / "staging" / "urls.parquet").exists()

    artifacts = _progress_artifacts(state.state_details.flow_run_id)
    described = {a.description.split(":")[0].split(" ")[0]: a.data for a in artifacts}
    assert {"ingest", "parse", "extract", "dedup", "reshard"} <= set(described), described
    assert all(a.data == 100.0 for a in artifacts)
