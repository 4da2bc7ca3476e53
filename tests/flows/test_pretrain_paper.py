"""Deployment `pretrain/paper`: stage 1 -> stage 2 from stage 1's selected checkpoint -> evaluation, on the sample
build, with the tiny preset, a few steps and a DINO-shaped fake init (no network), through the deployment's flow."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from flows.local import PREFECT_FILE
from manifests.registry import ModelRegistry
from manifests.version import REPO_ROOT


def _paper_deployment():
    from prefect.flows import load_flow_from_entrypoint

    (dep,) = [d for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"] if d["name"] == "paper"]
    path, _, function = dep["entrypoint"].partition(":")
    return dep, load_flow_from_entrypoint(f"{REPO_ROOT / path}:{function}")


def test_pretrain_paper_chains_stage1_stage2_and_evaluation(sample_build, tmp_path):
    from ovseg_core.models.checkpoint import load_checkpoint
    from ovseg_core.models.visual_init import save_dino_shaped_checkpoint

    dep, flow = _paper_deployment()
    assert flow.name == "pretrain" and dep["name"] == "paper"
    init = save_dino_shaped_checkpoint(tmp_path / "dino.pt", embed_dim=192, depth=4, num_heads=4, patch_size=8,
                                       img_size=64)
    params = {**dep["parameters"], "build_dir": sample_build["build_dir"], "gpus_per_node": 1, "nodes": 1,
              "preset": "tiny", "visual_init": str(init), "global_batch": 8, "max_images": 3,
              "registry_dir": str(tmp_path / "registry"),
              "datasets": [{"layout": "sample", "root": sample_build["sample"]["eval_dir"], "split": "val"}],
              "stage_overrides": {"steps": 3, "device": "cpu", "threads": 1, "max_text_len": 24,
                                  "shuffle_buffer": 16, "save_every": 0, "log_every": 1, "val_max_samples": 16,
                                  "model_overrides": [["text_pretrained", False]]}}
    out = flow(**params)
    s1, s2 = Path(out["stage1"]["out_dir"]), Path(out["stage2"]["out_dir"])
    plan1, plan2 = (json.loads((s / "run.json").read_text()) for s in (s1, s2))
    assert (plan1["stage"], plan1["global_batch"], plan2["stage"], plan2["global_batch"]) == (1, 8, 2, 4)
    assert plan1["visual_init"] == str(init)
    assert json.loads((s1 / "visual_init.json").read_text())["expected_missing"] == []
    stage2_cfg = load_checkpoint(out["stage2"]["checkpoint"])["train_config"]
    assert stage2_cfg["init_checkpoint"] == out["stage1"]["checkpoint"]  # the checkpoint stage 1 selected
    assert stage2_cfg["recipe"] == "paper" and stage2_cfg["frozen_text_mode"] == "train"
    stage1_weights = load_checkpoint(out["stage1"]["checkpoint"])["model"]["visual.blocks1.0.attn.qkv.weight"]
    stage2_init = load_checkpoint(out["stage2"]["checkpoint"])["model"]["visual_teacher.blocks1.0.attn.qkv.weight"]
    assert not torch.equal(stage1_weights, torch.zeros_like(stage1_weights))
    # the EMA teacher started as stage 1's encoder and moved by 1% per step: still close to it
    assert torch.allclose(stage1_weights, stage2_init, atol=0.05)
    (evaluated,) = out["evaluation"]["datasets"].values()
    assert evaluated["n_images"] == 3 and evaluated["split"] == "val" and out["evaluation"]["mIoU"] is not None
    entries = ModelRegistry(tmp_path / "registry").list()
    assert [(e.stage, e.parent_id) for e in entries] == [(1, None), (2, out["stage1"]["entry_id"])]
