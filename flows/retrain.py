"""Flow `retrain` (scheduled weekly in flows/prefect.yaml): rebuild CC4M incrementally, fine-tune from the champion,
measure on the VALIDATION split, promote only a real improvement.

    build-cc4m (same build_dir: idempotent stages only add what is new)
      -> what changed since THIS flow's previous run on this build ("unchanged" when nothing did)
      -> pretrain (init_checkpoint = champion's checkpoint, parent = champion; stage 1 from scratch if no champion)
      -> evidence on the first validation dataset (checkpoint SELECTION split, never the held-out evaluation
         split): paired bootstrap intervals of the candidate's mIoU minus the champion's, the all-background
         predictor's and the untrained model's, over the validation images (ovseg_core.evaluation.promotion)
      -> ModelRegistry.promote_with_evidence: promoted only when every interval's lower bound is above 0
         (manifests.registry.decide_with_evidence); the decision, numbers and intervals go in the decision log
"""
from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task

from flows.build import build_cc4m
from flows.pretrain import pretrain
from manifests.fileio import atomic_path, write_text_atomic
from manifests.registry import ModelRegistry, default_registry_dir

PROMOTION_METRIC = "val_mIoU"
# The embedded sample's eval set: ImageSets/Segmentation/train.txt is its checkpoint-selection split (never trained
# on); val.txt is the held-out evaluation split and is never used here.
SAMPLE_VALIDATION_SPLIT = "train"


def with_transient_retries(config: dict[str, Any] | None) -> dict[str, Any]:
    """The weekly rebuild fetches last week's transient download failures again (timeouts, resets, 429, 5xx), up to
    download.max_attempts per sample, unless the caller's config says otherwise."""
    merged = dict(config or {})
    merged["download"] = {"retry_transient": True, **dict(merged.get("download") or {})}
    return merged


@task(name="champion", cache_policy=None)
def champion_task(registry_dir: str) -> dict[str, Any] | None:
    champion = ModelRegistry(registry_dir).champion()
    return None if champion is None else champion.to_dict()


@task(name="validation-evidence", cache_policy=None)
def evidence_task(candidate: str, champion: str | None, dataset: dict[str, Any], max_images: int | None,
                  n_resamples: int = 2000) -> dict[str, Any]:
    """Paired bootstrap evidence of `candidate` against the champion and the trivial baselines (see module doc)."""
    from ovseg_core.evaluation.datasets import load_dataset
    from ovseg_core.evaluation.evaluate import protocol_sizes
    from ovseg_core.evaluation.promotion import ALL_BACKGROUND, CHAMPION, UNTRAINED, promotion_evidence, untrained_like
    from ovseg_core.models.checkpoint import load_model_from_checkpoint

    model = load_model_from_checkpoint(candidate)
    data = load_dataset(dataset["layout"], dataset["root"], dataset.get("split", "val"))
    others: dict[str, Any] = {UNTRAINED: untrained_like(candidate)}
    if data.has_background:
        others[ALL_BACKGROUND] = ALL_BACKGROUND
    if champion:
        others[CHAMPION] = load_model_from_checkpoint(champion)
    return promotion_evidence(model, data, others, max_images=max_images, n_resamples=n_resamples,
                              **protocol_sizes(int(model.image_size)))


@task(name="promote-with-evidence", cache_policy=None)
def promote_task(registry_dir: str, entry_id: str, evidence: dict[str, Any]) -> bool:
    return ModelRegistry(registry_dir).promote_with_evidence(entry_id, evidence, PROMOTION_METRIC)


def _state_paths(registry_dir: str, build_dir: str) -> tuple[Path, Path]:
    key = hashlib.sha256(str(Path(build_dir).resolve()).encode()).hexdigest()[:12]
    folder = Path(registry_dir) / "retrain-state"
    return folder / f"{key}.json", folder / f"{key}-samples.npy"


def changes_since_last_retrain(registry_dir: str, build_dir: str) -> dict[str, Any]:
    """What the build gained and lost since this flow's previous COMPLETED run on it (not the build's own last
    change, which the manifest keeps until the source changes again): kind "first", "unchanged" or "changed"."""
    from ovseg_core.data.cc4m import BuildReader

    reader = BuildReader(build_dir)
    now = np.asarray(sorted(reader.sample_ids()), dtype=np.int64)
    state_path, ids_path = _state_paths(registry_dir, build_dir)
    base = {"manifest_sha256": reader.manifest_sha256(), "samples": int(now.size)}
    if not state_path.exists():
        return {**base, "kind": "first", "since": None, "samples_added": int(now.size), "samples_removed": 0}
    state = json.loads(state_path.read_text())
    before = np.load(ids_path)
    added, removed = int(np.setdiff1d(now, before).size), int(np.setdiff1d(before, now).size)
    same = not added and not removed and state["manifest_sha256"] == base["manifest_sha256"]
    return {**base, "kind": "unchanged" if same else "changed", "since": state["retrained_at"],
            "samples_added": added, "samples_removed": removed}


def remember_retrain(registry_dir: str, build_dir: str) -> None:
    """Record this run's build state; the next retrain reports its changes against it."""
    from ovseg_core.data.cc4m import BuildReader

    reader = BuildReader(build_dir)
    state_path, ids_path = _state_paths(registry_dir, build_dir)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(ids_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(sorted(reader.sample_ids()), dtype=np.int64))
    write_text_atomic(state_path, json.dumps({"manifest_sha256": reader.manifest_sha256(),
                                              "retrained_at": datetime.now(UTC).isoformat(timespec="seconds")}))


@flow(name="retrain", persist_result=True)
def retrain(source: str | None = None, build_dir: str = ".cc4m-runs/retrain/cc4m", sample: bool = True,
            sample_dir: str | None = None, sample_rows: int | None = None, config: dict[str, Any] | None = None,
            preset: str = "tiny", steps: int = 50, batch_size: int = 16,
            time_limit_s: float | None = None, validation_datasets: list[dict[str, Any]] | None = None,
            max_images: int | None = None, registry_dir: str | None = None,
            train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`validation_datasets`: [{"layout", "root", "split"}]; default (sample) = the sample eval set's selection split.
    """
    logger = get_run_logger()
    registry_path = str(Path(registry_dir or default_registry_dir()).resolve())
    built = build_cc4m(source=source, build_dir=build_dir, config=with_transient_retries(config), sample=sample,
                       sample_dir=sample_dir, sample_rows=sample_rows)
    changes = changes_since_last_retrain(registry_path, built["build_dir"])
    logger.info("build changes since the previous retrain: %s", json.dumps(changes, sort_keys=True))
    if validation_datasets is None:
        if not built["sample"]:
            raise ValueError("retrain needs validation_datasets (a checkpoint-selection split, not the eval split)")
        validation_datasets = [{"layout": "sample", "root": built["sample"]["eval_dir"],
                                "split": SAMPLE_VALIDATION_SPLIT, "name": "sample-validation"}]

    champion = champion_task(registry_path)
    # Fine-tuning from a champion is a stage-2 run (EMA teacher, cross-image loss); the first model is stage 1.
    stage = 2 if champion else 1
    trained = pretrain(build_dir=built["build_dir"], preset=preset, stage=stage, steps=steps, batch_size=batch_size,
                       init_checkpoint=champion["checkpoint"] if champion else None, time_limit_s=time_limit_s,
                       registry_dir=registry_path, parent_id=champion["entry_id"] if champion else None,
                       train_overrides=train_overrides,
                       out_dir=str(Path(built["build_dir"]).parent / "train" / f"retrain-{_run_stamp()}"))
    evidence = evidence_task(trained["checkpoint"], champion["checkpoint"] if champion else None,
                             validation_datasets[0], max_images)
    promoted = promote_task(registry_path, trained["entry_id"], evidence)
    logger.info("candidate %s %s=%.4f: %s; intervals %s", trained["entry_id"], PROMOTION_METRIC,
                evidence["candidate_mIoU"], "PROMOTED" if promoted else "kept the champion",
                json.dumps({k: [round(v["low"], 4), round(v["high"], 4)] for k, v in evidence["comparisons"].items()}))
    remember_retrain(registry_path, built["build_dir"])
    champion_now = ModelRegistry(registry_path).champion()
    return {"build": built["manifest"], "changes": changes, "candidate": trained["entry_id"],
            "checkpoint": trained["checkpoint"], PROMOTION_METRIC: evidence["candidate_mIoU"],
            "evidence": evidence, "promoted": promoted,
            "champion": champion_now.entry_id if champion_now else None}


def _run_stamp() -> str:
    # A fresh folder per retrain: the trainer resumes from an existing out_dir, which must never be an older run's.
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")

