"""flows/pretrain.py without training: the torchrun command line and failure on a non-zero exit."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flows import pretrain as pretrain_module

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_torchrun_command_runs_the_flows_entry_point(tmp_path):
    cmd = pretrain_module.torchrun_command(tmp_path / "cfg.json", devices=4, nodes=2, node_rank=1,
                                           master_addr="10.0.0.1", master_port=29400)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc_per_node=4", "--node_rank=1", "--master_addr=10.0.0.1",
            "--master_port=29400"} <= set(cmd)
    assert cmd[-4:] == ["-m", "ovseg_core.train.cli", "--config", str(tmp_path / "cfg.json")]


def _empty_valid_build(root: Path) -> Path:
    """A finished build with nothing in it: the smallest folder the training side of the contract accepts."""
    from manifests.schema import SCHEMA_VERSION

    zero = {"ingest": {"read": 0, "ingested": 0, "rejected": 0, "rejected_by_reason": {}},
            "parse": {"ingested": 0, "parsed": 0, "failed": 0},
            "select": {"parsed": 0, "selected": 0, "dropped": 0, "dropped_by_reason": {}},
            "download": {"selected": 0, "success": 0, "failed": 0, "failed_by_reason": {}, "errors": {}},
            "dedup": {"success": 0, "removed_duplicate": 0, "removed_by_kind": {"exact": 0, "near": 0}, "kept": 0},
            "index": {"kept": 0, "partner_rows": 0, "samples_with_partners": 0, "samples_without_partners": 0,
                      "classes": 0},
            "reshard": {"written": 0, "shards": 0, "samples_per_shard": 8}}
    stages = ("ingest", "parse", "select", "download", "dedup", "index", "shard")
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "code_version": "test", "inputs": {"source": "x", "sha256": "0" * 64,
        "rows": 0}, "vocabulary_version": "v", "spacy_model": {"name": "n", "version": "0"},
        "config": {s: {} for s in stages}, "counts": zero, "shards": [], "files": []}))
    return root


def test_the_flow_refuses_a_folder_that_is_not_a_finished_build(tmp_path):
    (tmp_path / "cc4m").mkdir()
    state = pretrain_module.pretrain(build_dir=str(tmp_path / "cc4m"), out_dir=str(tmp_path / "run"), steps=1,
                                     registry_dir=str(tmp_path / "registry"), return_state=True)
    assert state.is_failed() and "not a finished CC4M build" in str(state.message)
    assert not (tmp_path / "run").exists()  # refused before anything was started


def test_multi_device_run_fails_the_flow_on_a_non_zero_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_module, "torchrun_command",
                        lambda *a, **k: [sys.executable, "-c", "import sys; print('rank died'); sys.exit(3)"])
    _empty_valid_build(tmp_path / "cc4m")
    state = pretrain_module.pretrain(build_dir=str(tmp_path / "cc4m"), out_dir=str(tmp_path / "run"), devices=2,
                                     steps=1, registry_dir=str(tmp_path / "registry"), return_state=True)
    assert state.is_failed()
    assert "exited with 3" in str(state.message) or "exited with 3" in repr(state)
    assert "rank died" in (tmp_path / "run" / "torchrun.log").read_text()
    assert not (tmp_path / "registry" / "registry.jsonl").exists()


FAKE_RANK0 = """
import json, os, sys, time
out = sys.argv[1]
for step in (2, 4, 6):
    tmp = os.path.join(out, ".progress.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "total_steps": 6, "loss": 3.0 - step / 4, "samples_per_s": 12.5,
                   "eta_s": (6 - step) * 2.0, "elapsed_s": step * 2.0}, f)
    os.replace(tmp, os.path.join(out, "progress.json"))
    time.sleep(0.4)
json.dump({"final_step": 6, "seconds": 1.0, "last_checkpoint": "ckpt.pt", "losses": [{"loss": 1.5}]},
          open(os.path.join(out, "result.json"), "w"))
"""


def test_torchrun_progress_becomes_a_prefect_progress_artifact(tmp_path, monkeypatch):
    from prefect import flow
    from prefect.artifacts import Artifact

    calls = []
    real_update = pretrain_module.update_progress_artifact

    def recording_update(artifact_id, progress, description=None):
        calls.append((progress, description))
        return real_update(artifact_id, progress=progress, description=description)

    out = tmp_path / "run"
    (out).mkdir()
    (out / "progress.json").write_text('{"step": 999}')  # a stale file from an earlier run is never reported
    monkeypatch.setattr(pretrain_module, "update_progress_artifact", recording_update)
    monkeypatch.setattr(pretrain_module, "torchrun_command",
                        lambda *a, **k: [sys.executable, "-c", FAKE_RANK0, str(out)])

    @flow
    def run():
        return pretrain_module.train_torchrun({"out_dir": str(out), "preset": "vit_b", "stage": 1}, 2, 1, 0,
                                              "127.0.0.1", 29500, poll_s=0.1)

    result = run()
    assert result["metrics"]["final_step"] == 6
    # polling may miss an intermediate state on a busy machine, never the final one, never a stale or repeated one
    reported = [round(c[0], 3) for c in calls]
    assert reported == sorted(set(reported)) and set(reported) <= {33.333, 66.667, 100.0}
    assert reported[-1] == 100.0
    assert calls[-1][1] == "step 6/6, loss 1.5000, 12.5 samples/s, ETA 0:00:00"
    described = {c[1] for c in calls}
    assert described <= {"step 2/6, loss 2.5000, 12.5 samples/s, ETA 0:00:08",
                         "step 4/6, loss 2.0000, 12.5 samples/s, ETA 0:00:04",
                         "step 6/6, loss 1.5000, 12.5 samples/s, ETA 0:00:00"}
    stored = Artifact.get("pretrain-progress")
    assert stored is not None and float(stored.data) == pytest.approx(100.0)


def test_latest_points_at_the_newest_keyed_run(tmp_path):
    train = tmp_path / "train"
    old, new = train / "tiny-stage1-aaaaaaaaaaaa", train / "tiny-stage1-bbbbbbbbbbbb"
    for run in (old, new):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_text(run.name)
    link = train / "tiny-stage1-latest"
    pretrain_module.point_latest(old, link)
    pretrain_module.point_latest(new, link)
    assert (link / "checkpoints" / "last.pt").read_text() == new.name
    assert sorted(p.name for p in train.iterdir()) == sorted([old.name, new.name, link.name])  # no temporaries
