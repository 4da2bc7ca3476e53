"""`train(cfg) -> TrainResult`: one pretraining stage, single process or under torchrun (DDP).

out_dir layout:
    train_config.json        the TrainConfig as run
    log.jsonl                one JSON line per optimizer step (step, lr, loss terms, grad_norm, step_s, data_s = wait
                             for the loader; every
                             log_every steps also samples_per_s and eta_s), and one {"val": {...}} line per validation
    progress.json            the latest `Progress` (rewritten every log_every steps; what a supervisor can poll)
    checkpoints/last.pt      latest state (resume point), written every save_every steps and at the end
    checkpoints/best.pt      best validation ITC loss so far (the held-out split of the build, never the eval set)
    result.json              the TrainResult summary
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from manifests.fileio import atomic_path, write_text_atomic
from ovseg_core.data.cc4m import BuildReader, check_build
from ovseg_core.data.device_decode import decode_on_device
from ovseg_core.data.loader import (
    CC4MMapDataset,
    CC4MTrainStream,
    SampleProcessor,
    class_repeat_factors,
    make_train_loader,
    make_val_loader,
    trim_text_padding,
)
from ovseg_core.data.transforms import build_eval_transform, build_train_transform
from ovseg_core.train import distributed as D
from ovseg_core.train.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    has_teacher,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    set_rng_state,
)
from ovseg_core.train.compiled import COMPILE_CHOICES, build_train_step
from ovseg_core.train.config import TrainConfig
from ovseg_core.train.optim import CosineWarmupSchedule, build_optimizer, scaled_lrs
from ovseg_core.train.text_cache import FrozenTextCache, is_frozen

VAL_TEMPERATURE = 0.07  # fixed, so that val ITC is comparable across checkpoints whatever the learned scale
ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class Progress:
    """What a running stage reports every `log_every` steps (and once at the end), on the main rank only.

    samples_per_s: global samples per wall-clock second since the previous report (data loading included).
    eta_s: remaining steps at that rate.
    """

    step: int
    total_steps: int
    loss: float
    samples_per_s: float
    eta_s: float
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 1.0

    def line(self) -> str:
        eta = round(self.eta_s)
        return (f"step {self.step}/{self.total_steps} loss={self.loss:.4f} {self.samples_per_s:.1f} samples/s "
                f"ETA {eta // 3600:d}:{eta // 60 % 60:02d}:{eta % 60:02d}")


ProgressCallback = Callable[[Progress], None]


class ProgressMeter:
    """Rate and ETA over the steps since the last report; `report` returns None between reports."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, every: int) -> None:
        self.total, self.batch, self.every = total_steps, batch_size, max(1, every)
        self.start = self.last_t = time.perf_counter()
        self.last_step = self.first_step = start_step

    def report(self, step: int, loss: float, force: bool = False) -> Progress | None:
        if not force and step % self.every and step != self.first_step + 1:
            return None
        now = time.perf_counter()
        steps = max(1, step - self.last_step)
        rate = steps / max(now - self.last_t, 1e-9)  # steps per second
        self.last_t, self.last_step = now, step
        return Progress(step=step, total_steps=self.total, loss=float(loss), samples_per_s=rate * self.batch,
                        eta_s=max(0, self.total - step) / rate, elapsed_s=now - self.start)


@dataclass
class TrainResult:
    out_dir: str
    stage: int
    total_steps: int
    start_step: int
    final_step: int
    losses: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: str | None = None
    best_val_itc: float | None = None
    last_checkpoint: str | None = None
    seconds: float = 0.0
    mean_step_s: float = 0.0
    stopped_by_time_limit: bool = False
    data_counters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainStep(nn.Module):
    """Routes DDP's forward to forward_train, so DDP's gradient sync hooks see every training step."""

    def __init__(self, ovseg: nn.Module) -> None:
        super().__init__()
        self.ovseg = ovseg

    def forward(self, batch: dict[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
        return self.ovseg.forward_train(batch, stage)


def _default_factory(name: str, **overrides: Any) -> nn.Module:
    from ovseg_core import create_model

    return create_model(name, **overrides)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 on CUDA only: CPU bf16 autocast is slow on most CPUs and changes numerics of the tests' reference runs.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def validate(model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    """ITC loss (fixed temperature) and top-1 retrieval accuracy over the whole held-out split."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    try:
        for batch in loader:
            batch = _to_device(trim_text_padding(batch), device)
            with _autocast(device):
                img = model.encode_image(batch["image"])
                img = getattr(img, "image_emb", img)
                txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
            images.append(F.normalize(img.float(), dim=-1))
            texts.append(F.normalize(txt.float(), dim=-1))
    finally:
        model.train(was_training)
    if not images:
        return {}
    img, txt = torch.cat(images), torch.cat(texts)
    logits = img @ txt.t() / VAL_TEMPERATURE
    target = torch.arange(len(img), device=logits.device)
    itc = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    return {
        "val_itc": float(itc),
        "val_i2t_top1": float((logits.argmax(1) == target).float().mean()),
        "val_t2i_top1": float((logits.argmax(0) == target).float().mean()),
        "val_samples": float(len(img)),
    }


def _scalars(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def _write_progress(path: Path, progress: Progress) -> None:
    write_text_atomic(path, json.dumps(asdict(progress)))


def train(cfg: TrainConfig, model_factory: ModelFactory | None = None,
          progress: ProgressCallback | None = None) -> TrainResult:
    """Run one stage as configured; resumes from out_dir/checkpoints/last.pt when cfg.resume and it exists.

    `progress(Progress)` is called on the main rank every cfg.log_every steps and at the end (e.g. the pretrain
    flow updates a Prefect progress artifact from it: ovseg_core itself knows nothing of Prefect).
    """
    wall_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = D.init_distributed(device)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"global batch {cfg.batch_size} is not divisible by world size {info.world_size}")
    per_rank_batch = cfg.batch_size // info.world_size
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_json(out_dir / "train_config.json")

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's at wrap time).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    last_path = latest_checkpoint(out_dir) if cfg.resume else None
    model_kwargs = dict(cfg.model_kwargs)
    if (cfg.init_checkpoint or last_path is not None) and model_kwargs.get("visual_init") is not None:
        model_kwargs["visual_init"] = None  # the checkpoint's weights replace the init: do not need its file
    model = (model_factory or _default_factory)(cfg.preset, **model_kwargs)
    if cfg.init_checkpoint:
        load_model_state(model, load_checkpoint(cfg.init_checkpoint))
    if cfg.stage == 2:
        model.freeze_text_encoder()
        if not has_teacher(model):
            # EMA teacher starts as a copy of the (stage-1) image encoder; an init checkpoint that already has one
            # (a stage-2 checkpoint) keeps its saved teacher.
            model.init_momentum_teacher()
    model.to(device)

    reader = BuildReader(cfg.build_dir, shard_base_url=cfg.shard_base_url)
    check_build(cfg.build_dir, shards_here=cfg.shard_base_url is None)  # the contract first: a build without a valid manifest is refused, with the reason
    manifest_sha = reader.manifest_sha256()
    train_count = len(reader.split_ids("train", cfg.val_percent))
    if train_count < per_rank_batch:
        raise ValueError(f"only {train_count} training samples for a per-rank batch of {per_rank_batch}")
    steps_per_epoch = train_count / cfg.batch_size
    total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)

    optimizer = build_optimizer(model, cfg)
    scheduler = CosineWarmupSchedule(optimizer, total_steps, warmup_steps, scaled_lrs(cfg))
    start_step, best_val = 0, None
    if last_path is not None:
        ckpt = load_checkpoint(last_path)
        if ckpt["train_config"].get("stage") != cfg.stage or ckpt["train_config"].get("preset") != cfg.preset:
            raise ValueError(f"{last_path} is from another run (stage/preset differ); use a fresh out_dir")
        if ckpt.get("build_manifest_sha256") != manifest_sha:
            # A rebuilt build (new data) must never silently continue a run trained on the old one.
            raise ValueError(f"{last_path} was trained on build manifest {ckpt.get('build_manifest_sha256')}, but "
                             f"{cfg.build_dir} now has manifest {manifest_sha}: use a fresh out_dir (or --no-resume)")
        load_model_state(model, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_step = int(ckpt["step"])
        best_val = ckpt["extra"].get("best_val_itc")
        resume_rng = ckpt["rng"]
    else:
        resume_rng = None

    tokenizer, image_size = model.tokenizer, int(model.image_size)
    processor = SampleProcessor(
        reader, tokenizer, cfg.max_text_len, build_train_transform(image_size, cfg.augment), stage=cfg.stage,
        partner_transform=build_train_transform(image_size, cfg.augment), val_percent=cfg.val_percent,
        entity_classes=tuple(getattr(model, "entity_classes", ())), batch_text=True, device_decode=cfg.gpu_decode,
    )
    repeat_factors = None
    if cfg.repeat_threshold is not None:
        rows = reader.meta_rows(reader.split_ids("train", cfg.val_percent))
        repeat_factors = class_repeat_factors({int(r["sample_id"]): r["entities"] or [] for r in rows},
                                              cfg.repeat_threshold)
    stream = CC4MTrainStream(
        reader, processor, seed=cfg.seed, rank=info.rank, world_size=info.world_size, val_percent=cfg.val_percent,
        shuffle_buffer=cfg.shuffle_buffer, shards_in_flight=cfg.shards_in_flight, partner_source=cfg.partner_source,
        batch_size=per_rank_batch, skip_batches=start_step,
        repeat_factors=repeat_factors,
    )
    loader = make_train_loader(stream, per_rank_batch, cfg.num_workers, pin_memory=device.type == "cuda")
    val_loader = None
    val_ids = reader.split_ids("val", cfg.val_percent)[: cfg.val_max_samples]
    if info.is_main and val_ids:
        val_processor = SampleProcessor(reader, tokenizer, cfg.max_text_len, build_eval_transform(image_size), stage=1,
                                        batch_text=True)
        val_loader = make_val_loader(CC4MMapDataset(reader, val_processor, val_ids, seed=cfg.seed), cfg.val_batch_size)

    text_cache = None
    text_encoder = getattr(model, "text", None)
    if cfg.cache_frozen_text and isinstance(text_encoder, nn.Module) and is_frozen(text_encoder):
        text_cache = FrozenTextCache(text_encoder).install()
    ddp_model = D.wrap_ddp(TrainStep(model), device, info)
    ddp_model.train()
    train_step = build_train_step(ddp_model, cfg.compile, device, info.world_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult(out_dir=str(out_dir), stage=cfg.stage, total_steps=total_steps, start_step=start_step,
                         final_step=start_step, best_val_itc=best_val)
    best_path, last_ckpt = ckpt_dir / BEST_NAME, ckpt_dir / LAST_NAME
    log_file = open(out_dir / "log.jsonl", "a", encoding="utf-8") if info.is_main else None  # noqa: SIM115

    def checkpoint(step: int, metrics: dict[str, float]) -> None:
        nonlocal best_val
        if not info.is_main:
            return
        improved = "val_itc" in metrics and (best_val is None or metrics["val_itc"] < best_val)
        if improved:
            best_val = metrics["val_itc"]
        save_checkpoint(last_ckpt, model=model, step=step, train_config=cfg.to_dict(), optimizer=optimizer,
                        scheduler=scheduler, metrics=metrics, build_manifest_sha256=manifest_sha,
                        extra={"best_val_itc": best_val})
        if improved or (not best_path.exists() and val_loader is None):
            with atomic_path(best_path) as tmp:
                shutil.copyfile(last_ckpt, tmp)

    def run_validation(step: int) -> dict[str, float]:
        metrics = validate(model, val_loader, device) if val_loader is not None else {}
        if metrics and log_file is not None:
            metrics = {"step": step, **metrics}
            result.val_history.append(metrics)
            log_file.write(json.dumps({"val": metrics}) + "\n")
            log_file.flush()
            print(f"[train] step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        return metrics

    step, step_times = start_step, []
    meter = ProgressMeter(total_steps, start_step, cfg.batch_size, cfg.log_every or 10)

    def report(force: bool = False) -> dict[str, float]:
        if not info.is_main or not result.losses:
            return {}
        p = meter.report(step, result.losses[-1]["loss"], force=force)
        if p is None:
            return {}
        _write_progress(out_dir / "progress.json", p)
        if cfg.log_every:
            print(f"[train] {p.line()} lr={scheduler.get_last_lr():.3g}", flush=True)
        if progress is not None:
            progress(p)
        return {"samples_per_s": p.samples_per_s, "eta_s": p.eta_s}

    data_iter = iter(loader)  # draws the DataLoader's base seed from the global RNG: restore RNG state after it
    if resume_rng is not None:
        set_rng_state(resume_rng)
    if info.rank:  # rank 0's RNG state is the one saved; other ranks get their own dropout/Gumbel noise stream
        torch.manual_seed(cfg.seed * 1000 + info.rank + start_step)
    try:
        while step < total_steps:
            t_data = time.perf_counter()
            batch = _to_device(decode_on_device(trim_text_padding(next(data_iter)), device), device)
            t0 = time.perf_counter()  # t0 - t_data: time the step waited for the loader
            lr = scheduler.get_last_lr()
            with _autocast(device):
                out = train_step(batch, cfg.stage)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: {_scalars(out)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
                         if cfg.grad_clip else float("nan"))
            optimizer.step()
            scheduler.step()
            if cfg.stage == 2:
                model.momentum_update(cfg.momentum)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s = time.perf_counter() - t0
            step_times.append(step_s)
            record = {"step": step, "lr": lr, **_scalars(out), "grad_norm": grad_norm, "step_s": step_s,
                      "data_s": t0 - t_data,
                      "time_s": time.time() - wall_start}
            result.losses.append(record)
            record.update(report(force=step == total_steps))
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                if cfg.log_every and (step % cfg.log_every == 0 or step == start_step + 1):
                    log_file.flush()
            out_of_time = cfg.time_limit_s is not None and time.time() - wall_start > cfg.time_limit_s
            stop = D.any_rank(out_of_time, device)
            if step < total_steps and not stop:
                metrics = run_validation(step) if cfg.eval_every and step % cfg.eval_every == 0 else None
                if metrics is not None or (cfg.save_every and step % cfg.save_every == 0):
                    checkpoint(step, metrics or {})
                    D.barrier()
            if stop:
                result.stopped_by_time_limit = True
                break
        if meter.last_step != step:  # stopped early by the time limit: report where it stopped
            report(force=True)
        metrics = run_validation(step)
        checkpoint(step, metrics)
        D.barrier()
    finally:
        if log_file is not None:
            log_file.close()
        if text_cache is not None:
            text_cache.uninstall()
        del data_iter
    result.final_step = step
    result.best_val_itc = best_val
    result.last_checkpoint = str(last_ckpt)
    result.best_checkpoint = str(best_path) if best_path.exists() else None
    result.seconds = time.time() - wall_start
    # the first step includes lazy initialisation; leave it out of the per-step time
    timed = step_times[1:] or step_times
    result.mean_step_s = float(sum(timed) / len(timed)) if timed else 0.0
    # main process only (workers keep their own)
    result.data_counters = {**stream.counters, **processor.counters, **(text_cache.stats() if text_cache else {})}
    if info.is_main:
        (out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


# ---------------------------------------------------------------- CLI (wired into `cc4m train` by the lead)
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", required=True, help="build folder (shards/, meta/, index/)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl); resumes if it has last.pt")
    p.add_argument("--preset", default="tiny", help="model preset: tiny, vit_s, vit_b")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2))
    p.add_argument("--recipe", choices=("paper", "sample"), default="paper",
                   help="paper = the stage preset (--steps/--epochs required); sample = the CPU recipe for the embedded "
                        "sample (ovseg_core.train.config.sample_recipe, sized by --minutes; stage 1 only)")
    p.add_argument("--minutes", type=float, default=10.0, help="--recipe sample: wall-clock training budget")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=float)
    p.add_argument("--repeat-threshold", type=float, help="repeat-factor sampling over caption classes (e.g. 0.1)")
    p.add_argument("--cache-frozen-text", action="store_true", help="encode each text once when the text is frozen")
    p.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch size (split over torchrun ranks)")
    p.add_argument("--lr", type=float, help="base lr (default: the stage preset)")
    p.add_argument("--warmup-lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--no-lr-scaling", action="store_true", help="do not scale lrs by global batch / 4096")
    p.add_argument("--augment", choices=("deit", "light", "crop", "none"), help="default: the stage preset")
    p.add_argument("--init-checkpoint", help="stage 2: the stage-1 checkpoint to start from")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-percent", type=float, default=2.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-text-len", type=int, default=77)
    p.add_argument("--shard-base-url", help="read shards from this http(s)/fsspec folder (meta and index stay local)")
    p.add_argument("--partner-source", choices=("buffer", "locator"), default="buffer",
                   help="stage-2 partners from the shuffle buffer (locator fallback) or always via the locator")
    p.add_argument("--shuffle-buffer", type=int, default=4096)
    p.add_argument("--shards-in-flight", type=int, default=16)
    p.add_argument("--time-limit", type=float, help="stop (and checkpoint) after this many seconds")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--gpu-decode", action="store_true",
                   help="decode and crop JPEGs on the training device (light/crop augmentations)")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="torch.compile the forward + losses (auto: on CUDA only)")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    if getattr(args, "recipe", "paper") == "sample":
        from ovseg_core.train.config import sample_recipe

        if args.stage != 1:
            raise ValueError("--recipe sample is a stage-1 recipe")
        extra = {k: v for k, v in {"steps": args.steps, "epochs": args.epochs, "base_lr": args.lr,
                                     "seed": args.seed, "device": args.device, "threads": args.threads,
                                     "eval_every": args.eval_every, "resume": not args.no_resume}.items()
                 if v is not None}
        return sample_recipe(args.build, args.out, minutes=args.minutes, **extra)
    if args.steps is None and args.epochs is None:
        raise ValueError("give --steps or --epochs (or --recipe sample)")
    explicit = {
        "base_lr": args.lr, "warmup_lr": args.warmup_lr, "min_lr": args.min_lr, "augment": args.augment,
        "warmup_steps": args.warmup_steps,
    }
    return TrainConfig.for_stage(
        args.stage, build_dir=args.build, out_dir=args.out, preset=args.preset, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, scale_lr=not args.no_lr_scaling, init_checkpoint=args.init_checkpoint,
        device=args.device, num_workers=args.num_workers, threads=args.threads, seed=args.seed,
        val_percent=args.val_percent, eval_every=args.eval_every, save_every=args.save_every,
        log_every=args.log_every, max_text_len=args.max_text_len, time_limit_s=args.time_limit,
        resume=not args.no_resume, repeat_threshold=args.repeat_threshold, cache_frozen_text=args.cache_frozen_text,
        shard_base_url=args.shard_base_url, partner_source=args.partner_source, shuffle_buffer=args.shuffle_buffer,
        shards_in_flight=args.shards_in_flight, compile=getattr(args, "compile", "auto"),
        gpu_decode=getattr(args, "gpu_decode", False),
        **{k: v for k, v in explicit.items() if v is not None},
    )


def cli_train(args: argparse.Namespace) -> int:
    result = train(train_config_from_args(args))
    if D.current_info().is_main:
        summary = {k: v for k, v in result.to_dict().items() if k not in ("losses",)}
        summary["final_loss"] = result.losses[-1]["loss"] if result.losses else None
        print(json.dumps(summary, indent=1))
    D.cleanup()
    return 0
