"""build-cc4m end to end under the Prefect test harness on a small slice of the embedded sample."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from curation.io import sha256_file
from curation.lock import LOCK_NAME
from curation.manifest import verify_manifest
from manifests.layout import BuildLayout
from tests.flows.conftest import SAMPLE_ROWS

pytestmark = pytest.mark.usefixtures("prefect_harness")


# ---------------------------------------------------------------------------------------------------------- helpers
def build_contents(build_dir: str | Path) -> dict[str, Any]:
    """Everything a build produces that must be reproducible: shard sha256s and every parquet's rows (schema
    metadata dropped: it may hold timings; so are downloads.parquet's attempt times)."""
    layout = BuildLayout(Path(build_dir))
    contents: dict[str, Any] = {f"shards/{p.name}": sha256_file(p) for p in layout.shards()}
    tables = [layout.downloads, layout.duplicates, layout.kept, layout.entity_index, layout.partners,
              layout.cooccurrence, layout.locator]
    for directory in (layout.ingest_dir, layout.rejects_dir, layout.captions_dir, layout.selected_dir, layout.meta_dir):
        tables += layout.parts(directory)
    for path in tables:
        table = pq.read_table(path)
        if path == layout.downloads:  # when each sample was fetched is a fact of the run, like a timing
            table = table.drop_columns(["first_attempt_at", "last_attempt_at"])
        contents[str(path.relative_to(layout.root))] = table.to_pylist()
    return contents


def task_states(flow_run_id: Any) -> dict[str, list[str]]:
    """Task name -> state names of a flow run and its subflows."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        parent_tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        child_tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[f.id for f in subflows]))) if subflows else []
    states: dict[str, list[str]] = {}
    for run in [*parent_tasks, *child_tasks]:
        if run.state is not None and run.name.rsplit("-", 1)[0] != "per-part-stages":
            states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def run_build(build_dir: Path, sample_source: dict[str, Any], config: dict[str, Any]):
    from flows.build import build_cc4m

    return build_cc4m(build_dir=str(build_dir), config=config, sample=True, sample_dir=str(sample_source["root"]),
                      sample_rows=SAMPLE_ROWS, return_state=True)


# ------------------------------------------------------------------------------------------------------------ tests
def test_sample_build_counts_add_up_and_manifest_verifies(sample_build):
    layout = BuildLayout(Path(sample_build["build_dir"]))
    counts = json.loads(layout.manifest.read_text())["counts"]
    assert counts["ingest"]["read"] == SAMPLE_ROWS == counts["ingest"]["ingested"] + counts["ingest"]["rejected"]
    assert counts["select"]["parsed"] == counts["select"]["selected"] + counts["select"]["dropped"]

    downloads = pq.read_table(layout.downloads).to_pylist()
    duplicates = pq.read_table(layout.duplicates).to_pylist()
    meta = [row for part in layout.parts(layout.meta_dir) for row in pq.read_table(part).to_pylist()]
    failed = [d for d in downloads if d["status"] != "success"]
    assert failed, "the sample's deliberate failures must show up"
    assert all(d["error_message"] for d in failed), "every failure has a reason"
    selected = counts["select"]["selected"]
    assert len(downloads) == selected == len(meta) + len(failed) + len(duplicates)
    assert counts["reshard"]["written"] == len(meta)

    # Shard contents match meta: same samples, same order/positions, same JPEG bytes.
    for shard in layout.shards():
        expected = sorted((m for m in meta if m["shard"] == shard.name), key=lambda m: m["position"])
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            keys = list(dict.fromkeys(m.name.rsplit(".", 1)[0] for m in members))
            assert keys == [f"{m['sample_id']:012d}" for m in expected]
            for m in expected:
                jpg = tar.extractfile(f"{m['sample_id']:012d}.jpg").read()
                assert sha256_file_bytes(jpg) == m["sha256"] or m["sha256"] is None
                record = json.load(tar.extractfile(f"{m['sample_id']:012d}.json"))
                assert record["entities"] == list(m["entities"])

    partners = pq.read_table(layout.partners).to_pylist()
    written = {m["sample_id"] for m in meta}
    assert partners and all(p["partner_id"] != p["sample_id"] for p in partners)
    assert all(p["partner_id"] in written and p["sample_id"] in written for p in partners)

    report = verify_manifest(layout.manifest)
    assert report.ok, report.problems
    assert Path(sample_build["report"]).exists()


def sha256_file_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_sample_build_publishes_artifacts(sample_build):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["build-cc4m-report", "build-cc4m-counts"])))
    assert {a.key for a in artifacts} == {"build-cc4m-report", "build-cc4m-counts"}
    table = next(a for a in artifacts if a.key == "build-cc4m-counts")
    assert "written" in str(table.data)


def test_rerun_of_a_finished_build_does_no_work(sample_build, sample_source, small_config):
    build_dir = Path(sample_build["build_dir"])
    def outputs() -> dict[Path, int]:  # the lock file records each run's holder: it is not a build output
        return {p: p.stat().st_mtime_ns for p in build_dir.rglob("*") if p.is_file() and p.name != LOCK_NAME}

    before = outputs()
    contents = build_contents(build_dir)

    second = run_build(build_dir, sample_source, small_config)
    assert second.is_completed()
    summary = second.result()
    assert all(r["skipped"] for r in summary["counts"]["parse"] + summary["counts"]["select"])
    assert outputs() == before, "a finished build was modified by a rerun"

    # No Prefect result cache: every stage runs and skips by its own content fingerprints (a stale cache key could
    # serve an edited source); the report too is left as it is.
    states = task_states(second.state_details.flow_run_id)
    for name in ("ingest", "parse", "select", "download", "verify", "dedup", "index", "reshard", "report"):
        assert set(states[name]) == {"Completed"}, (name, states[name])
    for name in ("download", "dedup", "index", "reshard"):
        assert summary["counts"][name]["skipped"], name
    assert build_contents(build_dir) == contents


@pytest.mark.slow
def test_resume_after_interruptions_gives_identical_output(sample_build, sample_source, small_config, tmp_path,
                                                         monkeypatch):
    import curation.stages  # the stage plan's functions call these names

    build_dir = tmp_path / "cc4m"
    real_parse, real_dedup = curation.stages.parse_part, curation.stages.deduplicate

    def parse_failing_on_second_part(build_dir, part, cfg, progress=None):
        if part == "part-00001.parquet":
            raise RuntimeError("simulated crash while parsing part 1")
        return real_parse(build_dir, part, cfg, progress)

    # 1) one fan-out task fails: the whole flow fails (futures are resolved), part 0 is done and kept.
    monkeypatch.setattr(curation.stages, "parse_part", parse_failing_on_second_part)
    state = run_build(build_dir, sample_source, small_config)
    assert state.is_failed()
    layout = BuildLayout(build_dir)
    assert [p.name for p in layout.parts(layout.captions_dir)] == ["part-00000.parquet"]
    assert not layout.downloads.exists()

    # 2) crash after the download: parse resumes, the download happens once, dedup fails.
    monkeypatch.setattr(curation.stages, "parse_part", real_parse)
    monkeypatch.setattr(curation.stages, "deduplicate", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    state = run_build(build_dir, sample_source, small_config)
    assert state.is_failed()
    assert layout.downloads.exists() and not layout.kept.exists()

    # 3) resume to the end: byte-identical shards and identical tables to the uninterrupted build.
    monkeypatch.setattr(curation.stages, "deduplicate", real_dedup)
    state = run_build(build_dir, sample_source, small_config)
    assert state.is_completed()
    assert build_contents(build_dir) == build_contents(sample_build["build_dir"])
    assert verify_manifest(layout.manifest).ok


def test_deleted_outputs_are_rebuilt_not_served_from_cache(sample_build, sample_source, small_config, tmp_path):
    """A task whose outputs were deleted must run again although a cache record for its inputs exists."""
    build_dir = tmp_path / "cc4m"
    shutil.copytree(sample_build["build_dir"], build_dir)
    layout = BuildLayout(build_dir)
    assert run_build(build_dir, sample_source, small_config).is_completed()   # records cache entries for this dir
    reference = build_contents(build_dir)
    layout.partners.unlink()
    for shard in layout.shards():
        shard.unlink()
    state = run_build(build_dir, sample_source, small_config)
    assert state.is_completed()
    states = task_states(state.state_details.flow_run_id)
    assert states["index"] == ["Completed"] and states["reshard"] == ["Completed"]
    assert build_contents(build_dir) == reference
    assert verify_manifest(layout.manifest).ok


def test_per_part_fan_out_on_dask_matches_threads(prefect_harness, sample_source, tmp_path):
    from curation.config import BuildConfig
    from curation.ingest import IngestConfig, ingest_source
    from flows.build import make_task_runner, per_part_stages

    outputs = {}
    for runner in ("threads", "dask"):
        build_dir = tmp_path / runner
        cfg = BuildConfig(source=str(sample_source["source_tsv"]), build_dir=str(build_dir)).to_dict()
        ingest = ingest_source(sample_source["source_tsv"], build_dir, IngestConfig(rows_per_part=100))
        fan_out = per_part_stages.with_options(task_runner=make_task_runner(runner, dask_workers=2))
        result = fan_out(ingest["parts"], ["parse", "select"], cfg)
        assert [r["part"] for r in result["select"]] == ingest["parts"]
        layout = BuildLayout(build_dir)
        outputs[runner] = {f"{d.name}/{p.name}": pq.read_table(p).to_pylist()
                           for d in (layout.captions_dir, layout.selected_dir) for p in layout.parts(d)}
    assert len(outputs["dask"]) == 2 * len(ingest["parts"]) == 4
    assert outputs["dask"] == outputs["threads"]


@pytest.mark.slow
def test_whole_dag_build_then_train_evaluate_register(sample_build, sample_source, small_config, tmp_path):
    """build-cc4m with then_train: (finished build: no work) -> a few training steps -> evaluate on the sample eval
    set -> registry entry with lineage and the evaluation mIoU."""
    from flows.build import build_cc4m
    from manifests.registry import ModelRegistry

    registry = tmp_path / "registry"
    summary = build_cc4m(build_dir=sample_build["build_dir"], config=small_config, sample=True,
                         sample_dir=str(sample_source["root"]), sample_rows=SAMPLE_ROWS, then_train=True,
                         train={"out_dir": str(tmp_path / "train"), "steps": 2, "batch_size": 4,
                                "registry_dir": str(registry), "train_overrides": {"log_every": 1},
                                "max_images": 2, "overlays": 1})
    trained, evaluated = summary["train"]["pretrain"], summary["train"]["evaluate"]
    assert Path(trained["checkpoint"]).is_file()
    (result,) = evaluated["datasets"].values()
    assert result["split"] == "val" and result["n_images"] == 2 and 0.0 <= result["mIoU"] <= 1.0
    assert Path(result["per_class_csv"]).is_file() and len(result["overlays"]) == 1
    assert Path(result["overlays"][0]).is_file()

    (entry,) = ModelRegistry(registry).list()
    manifest_sha = sha256_file(Path(sample_build["build_dir"]) / "manifest.json")
    assert entry.entry_id == trained["entry_id"] and entry.build_manifest_sha256 == manifest_sha
    assert entry.steps == 2 and entry.preset == "tiny" and entry.stage == 1 and entry.parent_id is None
    assert entry.metrics["eval_mIoU"] == pytest.approx(result["mIoU"])


@pytest.mark.slow
def test_retrain_twice_logs_its_own_changes_and_promotes_only_with_evidence(sample_build, sample_source,
                                                                           small_config, tmp_path):
    """retrain twice on the finished sample build, as a new user would: each run reports what changed since ITS
    previous run ("unchanged" the second time), and a candidate is promoted only when the paired bootstrap intervals
    of its validation mIoU (selection split, never the eval split) against the untrained model, all-background and
    the champion all have a lower bound above 0; the decision, numbers and intervals are in the registry."""
    from flows.retrain import retrain
    from manifests.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "registry")
    params = {"build_dir": sample_build["build_dir"], "sample": True, "sample_dir": str(sample_source["root"]),
              "sample_rows": SAMPLE_ROWS, "config": small_config, "steps": 2, "batch_size": 4, "max_images": 6,
              "registry_dir": str(registry.root)}
    first = retrain(**params)
    second = retrain(**params)
    assert first["changes"]["kind"] == "first" and first["changes"]["samples_added"] == first["changes"]["samples"]
    assert second["changes"]["kind"] == "unchanged"
    assert (second["changes"]["samples_added"], second["changes"]["samples_removed"]) == (0, 0)
    log = registry.decisions()
    assert [d["candidate_id"] for d in log] == [first["candidate"], second["candidate"]]
    for run, decision in zip((first, second), log):
        comparisons = decision["evidence"]["comparisons"]
        assert {"untrained", "all_background"} <= set(comparisons) and decision["evidence"]["n_images"] == 6
        assert run["promoted"] == decision["promote"] == all(c["low"] > 0 for c in comparisons.values())
        assert all(c["low"] <= c["high"] for c in comparisons.values())
        assert registry.get(run["candidate"]).metrics["val_mIoU"] == decision["evidence"]["candidate_mIoU"]
    assert ("champion" in log[1]["evidence"]["comparisons"]) == first["promoted"]
    promoted = [r["candidate"] for r in (first, second) if r["promoted"]]
    champion = registry.champion()
    assert (champion.entry_id if champion else None) == (promoted[-1] if promoted else None)