"""Flow `pretrain`: train OVSegmentor on a CC4M build and register the checkpoint in the model registry.

devices == 1 and nodes == 1: in-process (CPU, or one GPU). More: `torchrun --nnodes N --nproc_per_node D
-m ovseg_core.train.cli --config <out_dir>/train_config.json` as a subprocess; the flow waits and fails on a
non-zero exit.
For nodes > 1 run the same deployment once per node with `node_rank` and a shared `master_addr`/`master_port`.
Progress: a Prefect progress artifact (key "pretrain-progress") follows the run: in-process through train()'s
`progress` callback, under torchrun by polling the progress.json that rank 0 rewrites every log_every steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from manifests.fileio import sha256_file
from manifests.layout import BuildLayout
from manifests.registry import ModelRegistry, default_registry_dir


def point_latest(run: Path, link: Path) -> None:
    """`link` -> `run`, replaced atomically: a stable name for the newest keyed run folder (what a deployment's
    default checkpoint path can name)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)  # relative: the train folder can move with its build
    os.replace(tmp, link)


def _manifest_sha256(build_dir: str) -> str | None:
    path = BuildLayout(build_dir).manifest
    return sha256_file(path) if path.exists() else None


def summarize_training(result: dict[str, Any]) -> dict[str, Any]:
    """TrainResult.to_dict() -> the checkpoint to hand on (best on validation, else last) and flat numeric metrics:
    the last validation record (val_itc, val_i2t_top1, ...), best_val_itc, final train loss, steps, seconds."""
    metrics: dict[str, float] = {}
    if result.get("val_history"):
        metrics.update({k: v for k, v in result["val_history"][-1].items() if k.startswith("val_")})
    if result.get("best_val_itc") is not None:
        metrics["best_val_itc"] = result["best_val_itc"]
    if result.get("losses"):
        metrics["final_loss"] = result["losses"][-1]["loss"]
    metrics.update({"final_step": result["final_step"], "seconds": round(result["seconds"], 1)})
    return {"checkpoint": result.get("best_checkpoint") or result["last_checkpoint"], "metrics": metrics,
            "stopped_by_time_limit": result.get("stopped_by_time_limit", False)}


def progress_text(p: dict[str, Any]) -> str:
    eta = round(p["eta_s"])
    return (f"step {p['step']}/{p['total_steps']}, loss {p['loss']:.4f}, {p['samples_per_s']:.1f} samples/s, "
            f"ETA {eta // 3600:d}:{eta // 60 % 60:02d}:{eta % 60:02d}")


class ProgressArtifact:
    """One Prefect progress artifact per training run, updated from Progress records (dicts or objects)."""

    def __init__(self, description: str) -> None:
        self.artifact_id = create_progress_artifact(progress=0.0, key="pretrain-progress", description=description)
        self.last: dict[str, Any] | None = None

    def __call__(self, progress: Any) -> None:
        p = progress if isinstance(progress, dict) else {
            k: getattr(progress, k) for k in ("step", "total_steps", "loss", "samples_per_s", "eta_s")}
        self.last = p
        update_progress_artifact(self.artifact_id, progress=100.0 * p["step"] / max(1, p["total_steps"]),
                                 description=progress_text(p))
        get_run_logger().info("pretrain %s", progress_text(p))


def follow_progress_file(path: Path, report: ProgressArtifact, last_step: int | None) -> int | None:
    """Report progress.json if it moved on since `last_step`; returns the step reported."""
    try:
        p = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-rename
        return last_step
    if p.get("step") != last_step:
        report(p)
        return p.get("step")
    return last_step


@task(name="train-in-process", cache_policy=None)
def train_in_process(train_config: dict[str, Any]) -> dict[str, Any]:
    from ovseg_core.train.config import TrainConfig
    from ovseg_core.train.loop import train

    report = ProgressArtifact(f"pretrain {train_config.get('preset')} stage {train_config.get('stage')}")
    return summarize_training(train(TrainConfig.from_dict(train_config), progress=report).to_dict())


def torchrun_command(config_path: Path, devices: int, nodes: int, node_rank: int, master_addr: str,
                     master_port: int) -> list[str]:
    from ovseg_core.train.cli import torchrun_command as command  # lazily: torch is heavy

    return command(config_path, devices, nodes, node_rank, master_addr, master_port)


@task(name="train-torchrun", cache_policy=None)
def train_torchrun(train_config: dict[str, Any], devices: int, nodes: int, node_rank: int, master_addr: str,
                   master_port: int, poll_s: float = 5.0) -> dict[str, Any]:
    out_dir = Path(train_config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "train_config.json"
    config_path.write_text(json.dumps(train_config, indent=2, sort_keys=True))
    cmd = torchrun_command(config_path, devices, nodes, node_rank, master_addr, master_port)
    get_run_logger().info("launching %s", " ".join(cmd))
    report = ProgressArtifact(f"pretrain {train_config.get('preset')} stage {train_config.get('stage')} (torchrun)")
    progress_file, last_step = out_dir / "progress.json", None
    progress_file.unlink(missing_ok=True)  # a previous run's file must not be reported as this one's
    with open(out_dir / "torchrun.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        while proc.poll() is None:
            time.sleep(poll_s)
            last_step = follow_progress_file(progress_file, report, last_step)
    follow_progress_file(progress_file, report, last_step)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}; see {out_dir / 'torchrun.log'}")
    if node_rank != 0:  # only the first node's rank 0 writes result.json and the checkpoints
        return {"checkpoint": None, "metrics": {}}
    return summarize_training(json.loads((out_dir / "result.json").read_text()))


@task(name="register-checkpoint", cache_policy=None)
def register_task(registry_dir: str, checkpoint: str, preset: str, stage: int, steps: int, build_dir: str,
                  metrics: dict[str, Any], parent_id: str | None, parent_checkpoint: str | None) -> str:
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    entry = ModelRegistry(registry_dir).register(
        checkpoint, preset=preset, stage=stage, steps=steps, build_manifest_sha256=_manifest_sha256(build_dir),
        metrics=numeric, parent_id=parent_id, parent_checkpoint=parent_checkpoint)
    return entry.entry_id


def _train_config(recipe: str | None, stage: int, build_path: Path, out_path: Path, *, preset: str, steps: int,
                  batch_size: int, world_size: int, global_batch: int | None, visual_init: str | None,
                  init_checkpoint: str | None, time_limit_s: float | None, train_overrides: dict[str, Any]) -> Any:
    """The TrainConfig of one pretrain run: the `paper` recipe, the `sample` recipe, or (None) the stage preset."""
    from ovseg_core.train.config import TrainConfig

    if recipe == "paper":
        from ovseg_core.train.recipe import paper_config

        return paper_config(stage, str(build_path), str(out_path), world_size=world_size, global_batch=global_batch,
                            visual_init=visual_init, preset=preset, init_checkpoint=init_checkpoint,
                            time_limit_s=time_limit_s, **train_overrides)
    if recipe == "sample":
        from ovseg_core.train.config import sample_recipe

        return sample_recipe(build_path, out_path, minutes=(time_limit_s or 240.0) / 60.0,
                             **{"init_checkpoint": init_checkpoint, **train_overrides})
    if recipe is None:
        return TrainConfig.for_stage(stage, build_dir=str(build_path), out_dir=str(out_path), preset=preset,
                                     steps=steps, batch_size=batch_size, init_checkpoint=init_checkpoint,
                                     time_limit_s=time_limit_s, **train_overrides)
    raise ValueError(f"unknown recipe {recipe!r} (known: 'paper', 'sample')")


@flow(name="pretrain", persist_result=True)
def pretrain(build_dir: str = ".cc4m-runs/sample/cc4m", out_dir: str | None = None, preset: str = "tiny",
             stage: int = 1, steps: int = 50, batch_size: int = 16, devices: int = 1, nodes: int = 1,
             node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 29500,
             init_checkpoint: str | None = None, time_limit_s: float | None = None,
             train_overrides: dict[str, Any] | None = None, registry_dir: str | None = None,
             parent_id: str | None = None, recipe: str | None = None, global_batch: int | None = None,
             visual_init: str | None = None) -> dict[str, Any]:
    """Train `preset` for `steps` steps (stage 1, or 2 from `init_checkpoint`) on the build in `build_dir`
    (a folder with manifest.json; a manifest path is accepted too). `train_overrides` are extra TrainConfig fields.
    The checkpoint is registered in `registry_dir` (default: $CC4M_REGISTRY or .cc4m-runs/registry).
    `recipe="sample"` uses ovseg_core.train.config.sample_recipe (the CPU recipe of the learning benchmark) for a
    run of `time_limit_s` (default 4 minutes); `steps`, `batch_size` and `stage` then come from the recipe.
    `recipe="paper"`: ovseg_core.train.recipe.paper_config for `stage` on devices x nodes GPUs (epochs, global batch
    and lrs from the recipe; `global_batch` and `visual_init` as `cc4m train --global-batch / --visual-init`;
    `steps` and `batch_size` are ignored, a shorter run passes train_overrides={"steps": N})."""
    logger = get_run_logger()
    build_path = Path(build_dir).resolve()
    if build_path.is_file():  # a manifest.json path
        build_path = build_path.parent
    # Checked here, before a torchrun is started for it; the run folder is keyed by the build's manifest, so a rebuilt
    # build starts a new run instead of resuming one trained on the old data.
    from ovseg_core.data.cc4m import check_build  # lazily, like the rest of ovseg_core here (torch is heavy)

    check_build(build_path)
    key = f"{recipe + '-' if recipe == 'paper' else ''}{preset}-stage{stage}-{_manifest_sha256(str(build_path))[:12]}"
    out_path = Path(out_dir).resolve() if out_dir else build_path.parent / "train" / key
    cfg = _train_config(recipe, stage, build_path, out_path, preset=preset, steps=steps, batch_size=batch_size,
                        world_size=devices * nodes, global_batch=global_batch, visual_init=visual_init,
                        init_checkpoint=init_checkpoint, time_limit_s=time_limit_s,
                        train_overrides=train_overrides or {})
    if devices * nodes > 1:
        result = train_torchrun(cfg.to_dict(), devices, nodes, node_rank, master_addr, master_port)
    else:
        result = train_in_process(cfg.to_dict())
    logger.info("checkpoint %s, metrics %s", result["checkpoint"], json.dumps(result["metrics"], default=str))
    if not out_dir:
        point_latest(out_path, out_path.parent / f"{preset}-stage{stage}-latest")
    if result["checkpoint"] is None:  # a non-zero node_rank of a multi-node run: node 0 registers
        return {"checkpoint": None, "metrics": {}, "out_dir": str(out_path), "entry_id": None}
    entry_id = register_task(str(Path(registry_dir or default_registry_dir()).resolve()), result["checkpoint"],
                             preset, stage, int(result["metrics"].get("final_step", steps)), str(build_path),
                             result["metrics"], parent_id, init_checkpoint)
    create_table_artifact(
        key="pretrain-metrics", description=f"pretrain {preset} stage {stage}: {result['checkpoint']}",
        table=[{"metric": k, "value": v} for k, v in sorted(result["metrics"].items())
               if isinstance(v, (int, float)) and not isinstance(v, bool)])
    return {"checkpoint": result["checkpoint"], "metrics": result["metrics"], "out_dir": str(out_path),
            "entry_id": entry_id}


@flow(name="pretrain", persist_result=True)
def pretrain_paper(build_dir: str, gpus_per_node: int = 8, nodes: int = 1, node_rank: int = 0,
                   master_addr: str = "127.0.0.1", master_port: int = 29500,
                   datasets: list[dict[str, Any]] | None = None, preset: str = "vit_b",
                   visual_init: str | None = None, global_batch: int | None = None,
                   stage_overrides: dict[str, Any] | None = None, max_images: int | None = None,
                   registry_dir: str | None = None) -> dict[str, Any]:
    """Deployment `pretrain/paper`: the released CC4M run. Stage 1 of the `paper` recipe, then stage 2 from the
    checkpoint stage 1 selected (best on its checkpoint_selection metric), then zero-shot evaluation of stage 2's
    selected checkpoint on `datasets` ([{"layout", "root"[, "split", "name"]}], e.g. VOC/Context/COCO-Object roots).

    GPUs: gpus_per_node x nodes (torchrun when more than one; a multi-node run starts this deployment once per node
    with its node_rank). visual_init: None = DINO ViT-B/16 (timm), "none" = from scratch, or a local file.
    stage_overrides: TrainConfig fields for both stages (a short test run: {"steps": 3, "device": "cpu", ...})."""
    logger = get_run_logger()
    common = {"build_dir": build_dir, "preset": preset, "devices": gpus_per_node, "nodes": nodes,
              "node_rank": node_rank, "master_addr": master_addr, "master_port": master_port, "recipe": "paper",
              "registry_dir": registry_dir, "train_overrides": stage_overrides}
    first = pretrain(stage=1, visual_init=visual_init,
                     global_batch=_stage_batch(global_batch, 1), **common)
    if first["checkpoint"] is None:  # a node other than node 0: node 0 chains the stages and evaluates
        return {"stage1": first, "stage2": None, "evaluation": None}
    logger.info("stage 1 selected %s; stage 2 starts from it", first["checkpoint"])
    second = pretrain(stage=2, init_checkpoint=first["checkpoint"], parent_id=first["entry_id"],
                      global_batch=_stage_batch(global_batch, 2), **common)
    evaluation = None
    if datasets and second["checkpoint"]:
        from flows.evaluate import evaluate

        evaluation = evaluate(checkpoint=second["checkpoint"], datasets=datasets, max_images=max_images,
                              registry_dir=str(Path(registry_dir or default_registry_dir()).resolve()),
                              entry_id=second["entry_id"], out_dir=str(Path(second["out_dir"]) / "eval"))
    return {"stage1": first, "stage2": second, "evaluation": evaluation}


def _stage_batch(global_batch: int | None, stage: int) -> int | None:
    """--global-batch N means stage 1 at N and stage 2 at N/2 (the recipe's 2048 -> 1024 ratio)."""
    if global_batch is None:
        return None
    return global_batch if stage == 1 else max(1, global_batch // 2)
