"""`train(cfg) -> TrainResult`: one pretraining stage, single process or under torchrun (DDP).

out_dir layout:
    train_config.json        the TrainConfig as run
    run.json                 the resolved run plan (ovseg_core.train.recipe.run_plan: what --dry-run prints)
    visual_init.json         the image-encoder init's load report (when a visual_init was applied)
    log.jsonl                one JSON line per optimizer step (step, lr, loss terms, grad_norm, step_s, data_s = wait
                             for the loader; every
                             log_every steps also samples_per_s and eta_s), and one {"val": {...}} line per validation
    progress.json            the latest `Progress` (rewritten every log_every steps; what a supervisor can poll)
    checkpoints/last.pt      latest state (resume point), written every save_every steps and at the end
    checkpoints/best.pt      best so far by cfg.checkpoint_selection: held-out ITC (the build's held-out split) or
                             VOC val mIoU (the release's protocol, which chooses on the test set)
    result.json              the TrainResult summary
"""
from __future__ import annotations

import json
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
from ovseg_core.evaluation.datasets import load_dataset
from ovseg_core.evaluation.evaluate import evaluate as evaluate_miou
from ovseg_core.models.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    has_teacher,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    set_rng_state,
)
from ovseg_core.models.visual_init import VISUAL_INIT_REPORT, apply_visual_init, load_init_state
from ovseg_core.train import distributed as D
from ovseg_core.train.compiled import build_train_step
from ovseg_core.train.config import TrainConfig
from ovseg_core.train.memory import check_fits
from ovseg_core.train.optim import CosineWarmupSchedule, build_optimizer, scaled_lrs
from ovseg_core.train.precision import autocast, configure_precision
from ovseg_core.train.recipe import per_device_batch, run_plan, save_run_plan, total_steps
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


@torch.no_grad()
def validate(model: nn.Module, loader: Any, device: torch.device, precision: str = "bf16") -> dict[str, float]:
    """ITC loss (fixed temperature) and top-1 retrieval accuracy over the whole held-out split."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    try:
        for batch in loader:
            batch = _to_device(trim_text_padding(batch), device)
            with autocast(precision, device):
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



class TrainingRun:
    """One stage, as steps: `build()` (process, model, data, optimizer, resume), then `run()` loops over `step()`,
    with `evaluate()` and `save()` every eval_every / save_every steps and once at the end.

    `forward_and_losses(batch) -> {"loss", "itc", ...}` is the one slot for the forward + losses of a batch (the
    DDP-wrapped model under the precision's autocast); a compiled variant replaces this attribute.
    """

    def __init__(self, cfg: TrainConfig, model_factory: ModelFactory | None = None,
                 progress: ProgressCallback | None = None) -> None:
        self.cfg, self.model_factory, self.progress_callback = cfg, model_factory or _default_factory, progress
        self.wall_start = time.time()
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.best_val: float | None = None
        self.text_cache: FrozenTextCache | None = None
        self.log_file: Any = None
        self.step_times: list[float] = []
        self.visual_init_report: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------- build
    def build(self) -> TrainingRun:
        self._setup_process()
        self._open_build()
        self._build_model()
        self._build_optimizer()
        self._build_data()
        self._wrap()
        return self

    def _setup_process(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = D.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.info = D.init_distributed(self.device)
        self.per_rank_batch = per_device_batch(cfg.batch_size, self.info.world_size)
        configure_precision(cfg.precision, self.device)
        if self.info.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_json(self.out_dir / "train_config.json")
        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's at wrap time).
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

    def _open_build(self) -> None:
        cfg = self.cfg
        self.reader = BuildReader(cfg.build_dir, shard_base_url=cfg.shard_base_url)
        # the contract first: a build without a valid manifest is refused, with the reason
        check_build(cfg.build_dir, shards_here=cfg.shard_base_url is None)
        self.manifest_sha = self.reader.manifest_sha256()
        self.train_count = len(self.reader.split_ids("train", cfg.val_percent))
        if self.train_count < self.per_rank_batch:
            raise ValueError(f"only {self.train_count} training samples for a per-rank batch of {self.per_rank_batch}")
        self.total_steps = total_steps(cfg, self.train_count)
        steps_per_epoch = self.train_count / cfg.batch_size
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else round(cfg.warmup_epochs * steps_per_epoch))

    def _build_model(self) -> None:
        cfg = self.cfg
        self.last_path = latest_checkpoint(self.out_dir) if cfg.resume else None
        from_weights = bool(cfg.init_checkpoint) or self.last_path is not None
        init_spec = None if from_weights or cfg.visual_init in (None, "none") else cfg.visual_init
        init_state = load_init_state(init_spec) if init_spec else None  # unreachable init: stop before anything
        model = self.model_factory(cfg.preset, **cfg.model_create_kwargs)
        if init_state is not None:
            self.visual_init_report = apply_visual_init(model.visual, init_spec, state=init_state)
            if self.info.is_main:
                write_text_atomic(self.out_dir / VISUAL_INIT_REPORT, json.dumps(self.visual_init_report, indent=1))
        if cfg.init_checkpoint:
            load_model_state(model, load_checkpoint(cfg.init_checkpoint))
        if cfg.stage == 2:
            model.freeze_text_encoder(cfg.frozen_text_mode)
            if not has_teacher(model):
                # EMA teacher starts as a copy of the (stage-1) image encoder; an init checkpoint that already has
                # one (a stage-2 checkpoint) keeps its saved teacher.
                model.init_momentum_teacher()
        if self.device.type == "cuda":
            check_fits(model.cfg, self.per_rank_batch, cfg.stage, cfg.precision, self.device, cfg.max_text_len)
        self.model = model.to(self.device)
        if self.info.is_main:
            save_run_plan(run_plan(cfg, self.info.world_size, self.train_count, model.cfg), self.out_dir)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = CosineWarmupSchedule(self.optimizer, self.total_steps, self.warmup_steps, scaled_lrs(cfg))
        self.start_step, self.resume_rng = 0, None
        if self.last_path is None:
            return
        ckpt = load_checkpoint(self.last_path)
        if ckpt["train_config"].get("stage") != cfg.stage or ckpt["train_config"].get("preset") != cfg.preset:
            raise ValueError(f"{self.last_path} is from another run (stage/preset differ); use a fresh out_dir")
        if ckpt.get("build_manifest_sha256") != self.manifest_sha:
            # A rebuilt build (new data) must never silently continue a run trained on the old one.
            raise ValueError(f"{self.last_path} was trained on build manifest {ckpt.get('build_manifest_sha256')}, "
                             f"but {cfg.build_dir} now has manifest {self.manifest_sha}: use a fresh out_dir "
                             f"(or --no-resume)")
        load_model_state(self.model, ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.start_step = int(ckpt["step"])
        self.best_val = ckpt["extra"].get("best_val", ckpt["extra"].get("best_val_itc"))
        self.resume_rng = ckpt["rng"]

    def _build_data(self) -> None:
        cfg, reader, model = self.cfg, self.reader, self.model
        tokenizer, image_size = model.tokenizer, int(model.image_size)
        augment = build_train_transform(image_size, cfg.augment, cfg.interpolation)
        self.processor = SampleProcessor(
            reader, tokenizer, cfg.max_text_len, augment, stage=cfg.stage,
            partner_transform=build_train_transform(image_size, cfg.augment, cfg.interpolation),
            val_percent=cfg.val_percent, entity_classes=tuple(getattr(model, "entity_classes", ())),
            batch_text=True, device_decode=cfg.gpu_decode,
        )
        repeat_factors = None
        if cfg.repeat_threshold is not None:
            rows = reader.meta_rows(reader.split_ids("train", cfg.val_percent))
            repeat_factors = class_repeat_factors({int(r["sample_id"]): r["entities"] or [] for r in rows},
                                                  cfg.repeat_threshold)
        self.stream = CC4MTrainStream(
            reader, self.processor, seed=cfg.seed, rank=self.info.rank, world_size=self.info.world_size,
            val_percent=cfg.val_percent, shuffle_buffer=cfg.shuffle_buffer, shards_in_flight=cfg.shards_in_flight,
            partner_source=cfg.partner_source, batch_size=self.per_rank_batch, skip_batches=self.start_step,
            repeat_factors=repeat_factors,
        )
        self.loader = make_train_loader(self.stream, self.per_rank_batch, cfg.num_workers,
                                        pin_memory=self.device.type == "cuda")
        self.val_loader = None
        val_ids = reader.split_ids("val", cfg.val_percent)[: cfg.val_max_samples]
        if self.info.is_main and val_ids:
            val_processor = SampleProcessor(reader, tokenizer, cfg.max_text_len, build_eval_transform(image_size),
                                            stage=1, batch_text=True)
            self.val_loader = make_val_loader(CC4MMapDataset(reader, val_processor, val_ids, seed=cfg.seed),
                                              cfg.val_batch_size)
        self.selection_dataset = None
        if self.info.is_main and cfg.checkpoint_selection == "voc-val-miou":
            self.selection_dataset = load_dataset(cfg.selection_layout, cfg.selection_root, split="val")

    def _wrap(self) -> None:
        cfg, model = self.cfg, self.model
        text_encoder = getattr(model, "text", None)
        if (cfg.cache_frozen_text and cfg.frozen_text_mode == "eval" and isinstance(text_encoder, nn.Module)
                and is_frozen(text_encoder)):
            self.text_cache = FrozenTextCache(text_encoder).install()
        self.ddp_model = D.wrap_ddp(TrainStep(model), self.device, self.info)
        self.ddp_model.train()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # bn_stats="release": the text projector's statistics run over the padded token states, so keep the padding
        trim = (lambda b: b) if cfg.bn_stats == "release" else trim_text_padding
        # gpu_decode: the batch holds JPEG bytes + crop draws, decoded here on the training device
        self.prepare_batch = lambda b: decode_on_device(trim(b), self.device)
        self.train_step = build_train_step(self.ddp_model, cfg.compile, self.device, self.info.world_size)
        self.forward_and_losses = self._forward_and_losses

    # -------------------------------------------------------------------------------------------------- step
    def _forward_and_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast(self.cfg.precision, self.device):
            return self.train_step(batch, self.cfg.stage)

    def step(self, step: int, raw_batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step on `raw_batch`; returns its log record (losses, lr, grad norm, timings)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = _to_device(self.prepare_batch(raw_batch), self.device)
        lr = self.scheduler.get_last_lr()
        out = self.forward_and_losses(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {_scalars(out)}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip))
                     if cfg.grad_clip else float("nan"))
        self.optimizer.step()
        self.scheduler.step()
        if cfg.stage == 2:
            self.model.momentum_update(cfg.momentum)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        self.step_times.append(step_s)
        return {"step": step + 1, "lr": lr, **_scalars(out), "grad_norm": grad_norm, "step_s": step_s}

    # ------------------------------------------------------------------------------------ evaluate and save
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out ITC (always) and, under checkpoint_selection="voc-val-miou", VOC val mIoU; main rank only."""
        metrics = validate(self.model, self.val_loader, self.device, self.cfg.precision) if self.val_loader else {}
        if self.selection_dataset is not None:
            res = evaluate_miou(self.model, self.selection_dataset, max_images=self.cfg.selection_max_images or None,
                                n_overlays=0)
            metrics["val_miou"] = float(res["mIoU"] or 0.0)
            self.model.train()
        if metrics and self.log_file is not None:
            metrics = {"step": step, **metrics}
            self.result.val_history.append(metrics)
            self.log_file.write(json.dumps({"val": metrics}) + "\n")
            self.log_file.flush()
            print(f"[train] step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        return metrics

    def _improved(self, metrics: dict[str, float]) -> bool:
        if self.cfg.checkpoint_selection == "voc-val-miou":
            key, better = "val_miou", (lambda new, old: new > old)
        else:
            key, better = "val_itc", (lambda new, old: new < old)
        if key not in metrics or not (self.best_val is None or better(metrics[key], self.best_val)):
            return False
        self.best_val = metrics[key]
        return True

    def save(self, step: int, metrics: dict[str, float]) -> None:
        """last.pt every time; best.pt when the selection metric improved (or, without validation, once)."""
        if not self.info.is_main:
            return
        improved = self._improved(metrics)
        best_path, last_ckpt = self.ckpt_dir / BEST_NAME, self.ckpt_dir / LAST_NAME
        extra = {"best_val": self.best_val, "checkpoint_selection": self.cfg.checkpoint_selection,
                 "visual_init": _init_summary(self.visual_init_report)}
        save_checkpoint(last_ckpt, model=self.model, step=step, train_config=self.cfg.to_dict(),
                        optimizer=self.optimizer, scheduler=self.scheduler, metrics=metrics,
                        build_manifest_sha256=self.manifest_sha, extra=extra)
        if improved or (not best_path.exists() and self.val_loader is None and self.selection_dataset is None):
            with atomic_path(best_path) as tmp:
                shutil.copyfile(last_ckpt, tmp)

    # --------------------------------------------------------------------------------------------------- run
    def _report(self, step: int, force: bool = False) -> dict[str, float]:
        if not self.info.is_main or not self.result.losses:
            return {}
        p = self.meter.report(step, self.result.losses[-1]["loss"], force=force)
        if p is None:
            return {}
        _write_progress(self.out_dir / "progress.json", p)
        if self.cfg.log_every:
            print(f"[train] {p.line()} lr={self.scheduler.get_last_lr():.3g}", flush=True)
        if self.progress_callback is not None:
            self.progress_callback(p)
        return {"samples_per_s": p.samples_per_s, "eta_s": p.eta_s}

    def _log(self, record: dict[str, Any]) -> None:
        self.result.losses.append(record)
        record.update(self._report(record["step"], force=record["step"] == self.total_steps))
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            every = self.cfg.log_every
            if every and (record["step"] % every == 0 or record["step"] == self.start_step + 1):
                self.log_file.flush()

    def _between_steps(self, step: int) -> bool:
        """Evaluate/save when due; returns True when the time limit (on any rank) says stop."""
        cfg = self.cfg
        out_of_time = cfg.time_limit_s is not None and time.time() - self.wall_start > cfg.time_limit_s
        stop = D.any_rank(out_of_time, self.device)
        if step < self.total_steps and not stop:
            metrics = self.evaluate(step) if cfg.eval_every and step % cfg.eval_every == 0 else None
            if metrics is not None or (cfg.save_every and step % cfg.save_every == 0):
                self.save(step, metrics or {})
                D.barrier()
        return stop

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.result = TrainResult(out_dir=str(self.out_dir), stage=cfg.stage, total_steps=self.total_steps,
                                  start_step=self.start_step, final_step=self.start_step, best_val_itc=None)
        self.meter = ProgressMeter(self.total_steps, self.start_step, cfg.batch_size, cfg.log_every or 10)
        if self.info.is_main:
            self.log_file = open(self.out_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        data_iter = iter(self.loader)  # draws the DataLoader's base seed from the global RNG: restore RNG after it
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)
        if self.info.rank:  # rank 0's RNG state is the one saved; other ranks get their own dropout/Gumbel stream
            torch.manual_seed(cfg.seed * 1000 + self.info.rank + self.start_step)
        step = self.start_step
        try:
            while step < self.total_steps:
                t_data = time.perf_counter()
                raw = next(data_iter)
                data_s = time.perf_counter() - t_data  # the time the step waited for the loader
                record = self.step(step, raw)
                step = record["step"]
                self._log({**record, "data_s": data_s, "time_s": time.time() - self.wall_start})
                if self._between_steps(step):
                    self.result.stopped_by_time_limit = True
                    break
            if self.meter.last_step != step:  # stopped early by the time limit: report where it stopped
                self._report(step, force=True)
            self.save(step, self.evaluate(step))
            D.barrier()
        finally:
            self._close(data_iter)
        return self._finish(step)

    def _close(self, data_iter: Any) -> None:
        if self.log_file is not None:
            self.log_file.close()
        if self.text_cache is not None:
            self.text_cache.uninstall()
        del data_iter

    def _finish(self, step: int) -> TrainResult:
        result = self.result
        best_path = self.ckpt_dir / BEST_NAME
        result.final_step = step
        result.best_val_itc = self.best_val if self.cfg.checkpoint_selection == "heldout-itc" else None
        result.last_checkpoint = str(self.ckpt_dir / LAST_NAME)
        result.best_checkpoint = str(best_path) if best_path.exists() else None
        result.seconds = time.time() - self.wall_start
        timed = self.step_times[1:] or self.step_times  # the first step includes lazy initialisation
        result.mean_step_s = float(sum(timed) / len(timed)) if timed else 0.0
        result.data_counters = {**self.stream.counters, **self.processor.counters,  # main process only
                                **(self.text_cache.stats() if self.text_cache else {})}
        if self.info.is_main:
            (self.out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        return result


def _init_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {"source": report["source"], "loaded": len(report["loaded"]), "new": len(report["new"]),
            "unused": len(report["unused"])}


def train(cfg: TrainConfig, model_factory: ModelFactory | None = None,
          progress: ProgressCallback | None = None) -> TrainResult:
    """Run one stage as configured; resumes from out_dir/checkpoints/last.pt when cfg.resume and it exists.

    `progress(Progress)` is called on the main rank every cfg.log_every steps and at the end (e.g. the pretrain
    flow updates a Prefect progress artifact from it: ovseg_core itself knows nothing of Prefect).
    """
    return TrainingRun(cfg, model_factory, progress).build().run()
