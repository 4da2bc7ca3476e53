"""The weekly retrain as a new user runs it: twice on the sample, a few steps each. It reports what changed since ITS
previous run ("unchanged" the second time) and promotes only with paired bootstrap evidence, recorded."""
from __future__ import annotations

import shutil

from manifests.registry import ModelRegistry


def test_retrain_twice_logs_its_own_changes_and_gates_promotion(sample_build, sample_source, small_config,
                                                                tmp_path):
    from flows.retrain import retrain

    build_dir = tmp_path / "cc4m"
    shutil.copytree(sample_build["build_dir"], build_dir, symlinks=True)  # the shared build stays read-only
    registry = tmp_path / "registry"
    params = {"build_dir": str(build_dir), "sample": True, "sample_dir": str(sample_source["root"]),
              "sample_rows": 200, "config": small_config, "steps": 3, "batch_size": 8, "max_images": 6,
              "registry_dir": str(registry),
              "train_overrides": {"device": "cpu", "threads": 1, "max_text_len": 24, "shuffle_buffer": 16,
                                  "save_every": 0, "val_max_samples": 8}}
    first = retrain(**params)
    second = retrain(**params)
    assert first["changes"]["kind"] == "first" and first["changes"]["samples_added"] == first["changes"]["samples"]
    assert second["changes"]["kind"] == "unchanged"
    assert (second["changes"]["samples_added"], second["changes"]["samples_removed"]) == (0, 0)
    reg = ModelRegistry(registry)
    log = reg.decisions()
    assert [d["candidate_id"] for d in log] == [first["candidate"], second["candidate"]]
    for run, decision in zip((first, second), log):
        comparisons = decision["evidence"]["comparisons"]
        assert {"untrained", "all_background"} <= set(comparisons)
        assert decision["evidence"]["n_images"] == 6
        assert run["promoted"] == decision["promote"] == all(c["low"] > 0 for c in comparisons.values())
        assert all(c["low"] <= c["delta"] <= c["high"] for c in comparisons.values())
    if first["promoted"]:
        assert "champion" in log[1]["evidence"]["comparisons"]
    champion = reg.champion()
    promoted = [r["candidate"] for r in (first, second) if r["promoted"]]
    assert (champion.entry_id if champion else None) == (promoted[-1] if promoted else None)
