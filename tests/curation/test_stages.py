"""The one stage plan (manifests.stages declares, curation.stages binds), the one Source interface and the one
override merge: what the in-process runner and the flow both rely on."""
from __future__ import annotations

import json
import tarfile

import pytest

import curation.stages
from curation.build import run_build
from curation.config import STAGE_CONFIGS, BuildConfig, config_with_overrides
from curation.source import SourceError, TableSource, WebDatasetSource, open_source
from curation.stages import STAGE_PLAN, StageRun, run_stage
from manifests.layout import BuildLayout
from manifests.schema import STAGES, load_schema
from manifests.stages import BUILD_STAGES, COUNTED_STAGES, STAGE_NAMES


def test_every_declared_stage_is_bound_once_in_order():
    assert [s.spec for s in STAGE_PLAN] == list(BUILD_STAGES)
    assert STAGES == STAGE_NAMES and "verify" in STAGES and len(set(STAGES)) == len(STAGES)
    assert {s.spec.config_field for s in STAGE_PLAN} - {None} == set(STAGE_CONFIGS)
    layout = BuildLayout("/b")
    assert all(path.is_relative_to("/b") for stage in STAGE_PLAN for path in stage.outputs(layout))


def test_the_manifest_schema_requires_the_counted_stages_and_every_stage_config():
    schema = load_schema()["properties"]
    assert schema["counts"]["required"] == list(COUNTED_STAGES)
    assert schema["config"]["required"] == [s.config_field for s in BUILD_STAGES if s.config_field
                                            and s.config_field != "verify"]


def test_open_source_tells_the_kinds_apart_once(tmp_path):
    tsv = tmp_path / "src.tsv"
    tsv.write_text("http://x/1.jpg\ta dog\n", encoding="utf-8")
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w"):
        pass
    assert isinstance(open_source(str(tsv)), TableSource)
    assert isinstance(open_source(str(shards)), WebDatasetSource)
    assert isinstance(open_source(f"{shards}/{{00000..00001}}.tar"), WebDatasetSource)
    assert open_source("https://host/cc12m.tsv").remote_copy(tmp_path) == tmp_path / "source" / "cc12m.tsv"
    assert open_source(str(tsv)).remote_copy(tmp_path) is None and open_source(str(shards)).remote_copy(tmp_path) is None
    open_source(str(tsv)).check()
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "typo.tsv")).check()
    with pytest.raises(SourceError, match=r"1 shard\(s\) not found"):
        open_source(f"{shards}/{{00000..00001}}.tar").check()


def test_the_runner_calls_each_stage_of_the_plan_in_order(tmp_path, monkeypatch):
    """run_build is the plan's loop: every stage runs once, in plan order, per-part stages once per ingest part,
    and each stage sees the results of the stages before it."""
    calls: list[tuple[str, str | None, tuple[str, ...]]] = []

    def fake(name):
        def run(run: StageRun, part: str | None = None):
            calls.append((name, part, tuple(run.results)))
            if name == "ingest":
                return {"parts": ["part-00000.parquet", "part-00001.parquet"]}
            return {"path": str(tmp_path / "b" / "manifest.json")} if name == "manifest" else {"stage": name}
        return run

    plan = tuple(type(s)(s.spec, fake(s.name)) for s in STAGE_PLAN)
    monkeypatch.setattr(curation.build, "STAGE_PLAN", plan)
    source = tmp_path / "src.tsv"
    source.write_text("http://x/1.jpg\ta dog\n", encoding="utf-8")
    results: dict = {}
    run_build(BuildConfig(source=str(source), build_dir=str(tmp_path / "b")), results=results)
    assert [c[0] for c in calls] == ["ingest", "parse", "parse", "select", "select", *STAGE_NAMES[3:]]
    assert [c[1] for c in calls if c[0] == "parse"] == ["part-00000.parquet", "part-00001.parquet"]
    assert all(c[2] == STAGE_NAMES[:STAGE_NAMES.index(c[0])] for c in calls)
    assert list(results) == ["seconds", *STAGE_NAMES] and list(results["seconds"]) == list(STAGE_NAMES)


def test_run_stage_maps_a_per_part_stage_over_the_ingest_parts(tmp_path):
    seen = []
    stage = type(STAGE_PLAN[1])(STAGE_PLAN[1].spec, lambda run, part: seen.append(part) or {"part": part})
    run = StageRun(BuildConfig(source=str(tmp_path / "s.tsv"), build_dir=str(tmp_path / "b")),
                   results={"ingest": {"parts": ["a", "b"]}})
    assert run_stage(stage, run) == [{"part": "a"}, {"part": "b"}] and seen == ["a", "b"]


def test_one_override_merge_for_the_cli_and_the_flow(tmp_path):
    base = BuildConfig(source="old.tsv", build_dir="old", download={"timeout": 7}).to_dict()
    cfg = config_with_overrides(str(tmp_path / "s.tsv"), str(tmp_path / "b"), base,
                                {"processes": 3, "download": {"image_size": 96}, "samples_per_shard": 5})
    assert (cfg.download.timeout, cfg.download.processes_count, cfg.download.image_size) == (7, 3, 96)
    assert cfg.shard.samples_per_shard == 5 and cfg.source == str(tmp_path / "s.tsv")
    with pytest.raises(ValueError, match="unknown build config key 'sample_per_shard'"):
        config_with_overrides("s.tsv", "b", None, {"sample_per_shard": 5})
    with pytest.raises(ValueError, match="unknown settings"):
        config_with_overrides("s.tsv", "b", None, {"download": {"imagesize": 5}})
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
