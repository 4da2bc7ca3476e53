"""Flow `retrain` (scheduled weekly in flows/prefect.yaml): rebuild CC4M incrementally, fine-tune from the champion,
measure on the VALIDATION split, promote only if strictly better.

    build-cc4m (same build_dir: idempotent stages only add what is new)
      -> pretrain (init_checkpoint = champion's checkpoint, parent = champion; stage 1 from scratch if no champion)
      -> evaluate on the validation datasets (checkpoint SELECTION split, never the held-out evaluation split)
      -> ModelRegistry.promote_if_better(candidate, "val_mIoU")  (rule: manifests.registry.decide_promotion)
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.build import build_cc4m
from flows.evaluate import evaluate
from flows.pretrain import pretrain
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


@task(name="promote-if-better", cache_policy=None)
def promote_task(registry_dir: str, entry_id: str, metric: str) -> bool:
    return ModelRegistry(registry_dir).promote_if_better(entry_id, metric, higher_is_better=True)


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
    changes = json.loads(Path(built["manifest"]).read_text()).get("changes", {})
    logger.info("build changes since the previous build: %s", json.dumps(changes, sort_keys=True))
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
    validated = evaluate(checkpoint=trained["checkpoint"], datasets=validation_datasets, max_images=max_images,
                         registry_dir=registry_path, entry_id=trained["entry_id"], metric_prefix="val",
                         out_dir=str(Path(trained["out_dir"]) / "validation"))
    promoted = promote_task(registry_path, trained["entry_id"], PROMOTION_METRIC)
    logger.info("candidate %s %s=%.4f vs champion %s: %s", trained["entry_id"], PROMOTION_METRIC, validated["mIoU"],
                champion["entry_id"] if champion else None, "PROMOTED" if promoted else "kept the champion")
    champion_now = ModelRegistry(registry_path).champion()
    return {"build": built["manifest"], "build_changes": changes, "candidate": trained["entry_id"],
            "checkpoint": trained["checkpoint"],
            PROMOTION_METRIC: validated["mIoU"], "promoted": promoted,
            "champion": champion_now.entry_id if champion_now else None}


def _run_stamp() -> str:
    # A fresh folder per retrain: the trainer resumes from an existing out_dir, which must never be an older run's.
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")

