"""Learning evidence: does pretraining on a CC4M build make the model segment (zero-shot) better than chance?

CPU mode (default): train the `tiny` preset on a build (the embedded sample's) under a wall-clock budget (stage 1,
then a short stage 2 from stage 1's best checkpoint), then score zero-shot mIoU on the sample's VOC-layout eval set
(ovseg_core.evaluation, layout "sample") for
  (a) the trained model (stage 2 and stage 1),
  (b) the SAME model untrained (same preset, same init seed: train() seeds cfg.seed right before building the model),
  (c) predicting background everywhere.
Writes the JSON (loss curves included) and a PNG of the curves next to it. Nothing is tuned on the eval set:
checkpoints are selected on the build's held-out split (val ITC loss).

    python benchmarks/bench_learning.py --build DIR --eval-root DIR --minutes 10 --out benchmarks/results/learning.json

GPU mode (--gpu-throughput): images/s and MFU of one vit_s stage-1 training step at batch 256 in bf16 (synthetic
tensors, no data loading); skipped with a message when CUDA is not available.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Must precede `import torch`: with OpenMP's default active waiting, 2 threads on 2 busy cores ran a tiny-model step
# 10x slower (21 s vs 2.1 s wall, measured) than with passive waiting; with the cores idle it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report MFU as null.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ learning (CPU)
def evaluate_model(model: torch.nn.Module, dataset: Any, max_images: int | None) -> dict[str, Any]:
    from ovseg_core.evaluation.evaluate import evaluate, protocol_sizes

    sizes = protocol_sizes(int(model.image_size))
    res = evaluate(model.eval(), dataset, max_images=max_images, **sizes)
    return {"mIoU": res["mIoU"], "pixel_acc": res["pixel_acc"], "n_images": res["n_images"],
            "n_classes_scored": res["n_classes_scored"], "settings": res["settings"], "seconds": res["seconds"],
            "per_class": res["per_class"]}


def all_background_miou(dataset: Any, max_images: int | None) -> dict[str, Any]:
    from ovseg_core.evaluation.metrics import ConfusionMatrix

    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    matrix = ConfusionMatrix(dataset.num_classes)
    for i in range(n):
        label = np.asarray(dataset[i].label)
        matrix.update(np.zeros_like(label), label)
    scores = matrix.compute()
    return {"mIoU": float(scores.miou), "pixel_acc": float(scores.pixel_acc), "n_images": n}


def curves(losses: list[dict[str, float]], stage: int, offset: int) -> list[dict[str, float]]:
    keys = ("step", "lr", "loss", "itc", "mec", "mask", "time_s")
    return [{"stage": stage, "global_step": r["step"] + offset, **{k: r[k] for k in keys if k in r}} for r in losses]


def plot_curves(points: list[dict[str, float]], val: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axv) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [p["global_step"] for p in points]
    for key in ("loss", "itc", "mec", "mask"):
        ys = [p.get(key) for p in points]
        if any(y for y in ys):
            # moving average: single steps at batch 16-32 are noisy
            w = max(1, len(ys) // 50)
            smooth = np.convolve(np.asarray(ys, dtype=float), np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, label=key)
    stage2 = [p["global_step"] for p in points if p["stage"] == 2]
    if stage2:
        ax.axvline(stage2[0], color="grey", ls="--", lw=1, label="stage 2 starts")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.legend()
    if val:
        axv.plot([v["global_step"] for v in val], [v["val_itc"] for v in val], "o-", label="val ITC loss")
        ax2 = axv.twinx()
        ax2.plot([v["global_step"] for v in val], [v["val_i2t_top1"] for v in val], "s-", color="C1",
                 label="val image->text top-1")
        ax2.set_ylabel("top-1")
        axv.set_xlabel("step")
        axv.set_ylabel("val ITC (held-out split of the build)")
        axv.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_learning(args: argparse.Namespace) -> dict[str, Any]:
    from ovseg_core import create_model
    from ovseg_core.data.cc4m import BuildReader
    from ovseg_core.evaluation.datasets import load_dataset
    from ovseg_core.train.checkpoint import load_model_from_checkpoint
    from ovseg_core.train.config import TrainConfig
    from ovseg_core.train.loop import train

    started = time.time()
    torch.set_num_threads(args.threads)
    reader = BuildReader(args.build)  # fails clearly on a missing/empty build
    dataset = load_dataset("sample", args.eval_root, split=args.eval_split)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_learning_"))
    budget = args.minutes * 60.0
    common = {"build_dir": str(reader.root), "preset": args.preset, "batch_size": args.batch_size, "seed": args.seed,
              "scale_lr": False, "max_text_len": args.max_text_len, "threads": args.threads,
              "val_percent": args.val_percent, "num_workers": args.num_workers, "log_every": 25, "save_every": 0,
              "device": "cpu", "resume": False}
    # 1) probe the step time (counted in the budget) to size a schedule that completes its cosine within budget
    probe = train(TrainConfig.for_stage(1, out_dir=str(work / "probe"), steps=3, augment=args.augment,
                                        base_lr=args.lr, warmup_lr=args.lr / 10, min_lr=args.lr / 10, val_percent=0.0,
                                        **{k: v for k, v in common.items() if k != "val_percent"}))
    step_s = max(probe.mean_step_s, 1e-3)
    remaining = budget - (time.time() - started)
    s1_budget = max(60.0, remaining * (1 - args.stage2_fraction))  # a slow probe must not leave stage 1 nothing
    # validation + checkpoint overhead: ~5 % of a step per step, plus the final validation
    steps1 = max(10, int(s1_budget / (step_s * 1.10)))
    eval_every = max(10, steps1 // 8)
    s1 = train(TrainConfig.for_stage(
        1, out_dir=str(work / "stage1"), steps=steps1, augment=args.augment, base_lr=args.lr,
        warmup_lr=args.lr / 100, min_lr=args.lr / 10, warmup_steps=max(1, steps1 // 15), eval_every=eval_every,
        time_limit_s=s1_budget, **common))
    stage1_ckpt = s1.best_checkpoint or s1.last_checkpoint
    s2 = None
    remaining = budget - (time.time() - started)
    if args.stage2_fraction > 0 and remaining > 30:
        # measured on the tiny preset: a stage-2 step (frozen text encoder, + teacher on the partner) costs about
        # 0.5-1x a stage-1 step; plan for 1x plus the validation overhead, the time limit guards the rest
        steps2 = max(5, int(remaining / (step_s * 1.15)))
        s2 = train(TrainConfig.for_stage(
            2, out_dir=str(work / "stage2"), steps=steps2, init_checkpoint=stage1_ckpt, augment="crop"
            if args.augment in ("crop", "none") else "light", base_lr=args.lr2, warmup_lr=args.lr2,
            min_lr=args.lr2 / 10, eval_every=max(5, steps2 // 4), time_limit_s=remaining, **common))
    train_seconds = time.time() - started

    final_ckpt = (s2.best_checkpoint or s2.last_checkpoint) if s2 else stage1_ckpt
    results: dict[str, Any] = {}
    results["trained"] = evaluate_model(load_model_from_checkpoint(final_ckpt), dataset, args.max_eval_images)
    if s2:
        results["trained_stage1_only"] = evaluate_model(load_model_from_checkpoint(stage1_ckpt), dataset,
                                                        args.max_eval_images)
    torch.manual_seed(args.seed)  # exactly what train() does before building the model: same initial weights
    results["untrained_same_init"] = evaluate_model(create_model(args.preset), dataset, args.max_eval_images)
    results["all_background"] = all_background_miou(dataset, args.max_eval_images)

    points = curves(s1.losses, 1, 0) + (curves(s2.losses, 2, s1.final_step) if s2 else [])
    val = [{"stage": 1, "global_step": v["step"], **v} for v in s1.val_history]
    if s2:
        val += [{"stage": 2, **v, "global_step": v["step"] + s1.final_step} for v in s2.val_history]
    png = Path(args.out).with_suffix(".png")
    plot_curves(points, val, png)

    def summary(r: Any) -> dict[str, Any]:
        first = np.mean([p["loss"] for p in r.losses[:20]]) if r.losses else None
        last = np.mean([p["loss"] for p in r.losses[-20:]]) if r.losses else None
        return {"steps": r.final_step, "planned_steps": r.total_steps, "stopped_by_time_limit": r.stopped_by_time_limit,
                "seconds": round(r.seconds, 1), "mean_step_s": round(r.mean_step_s, 4),
                "loss_first20_mean": first, "loss_last20_mean": last, "best_val_itc": r.best_val_itc,
                "checkpoint": r.best_checkpoint or r.last_checkpoint, "out_dir": r.out_dir}

    from manifests.version import code_version

    trained, untrained = results["trained"]["mIoU"], results["untrained_same_init"]["mIoU"]
    return {
        "benchmark": "learning",
        "code_version": code_version(),
        "build": str(reader.root),
        "build_manifest_sha256": reader.manifest_sha256(),
        "build_samples": reader.num_samples(),
        "eval_root": str(args.eval_root),
        "eval_split": args.eval_split,
        "device": f"cpu x {args.threads} threads",
        "budget_minutes": args.minutes,
        "train_wall_seconds": round(train_seconds, 1),
        "settings": {"preset": args.preset, "batch_size": args.batch_size, "lr_stage1": args.lr, "lr_stage2": args.lr2,
                     "augment": args.augment, "seed": args.seed, "val_percent": args.val_percent,
                     "max_text_len": args.max_text_len, "probe_step_s": round(step_s, 4)},
        "stage1": summary(s1),
        "stage2": summary(s2) if s2 else None,
        "miou": {k: v["mIoU"] for k, v in results.items()},
        "eval": results,
        # deltas, not a verdict: on ~80 eval images a difference of a few 0.001 mIoU is noise
        "miou_delta_trained_vs_untrained": (trained - untrained) if None not in (trained, untrained) else None,
        "miou_delta_trained_vs_background": ((trained - results["all_background"]["mIoU"])
                                             if trained is not None else None),
        "curves": points,
        "val_history": val,
        "plot": str(png),
        "notes": [
            ("mIoU on the embedded sample's rendered eval set (layout 'sample'); the build's own held-out split "
             "(val ITC) selected checkpoints, never the eval set."),
            "LRs are NOT the paper's batch-scaled values (too small at batch <= 32 to learn in minutes): see settings.",
            "untrained_same_init uses the same preset and torch seed as training, hence the same initial weights.",
        ],
    }


# ------------------------------------------------------------------------------------------------ throughput (GPU)
def run_gpu_throughput(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        msg = "skipped: CUDA is not available (GPU throughput mode needs a GPU)"
        print(msg)
        return {"benchmark": "gpu_throughput", "skipped": msg}
    from torch.utils.flop_counter import FlopCounterMode

    from ovseg_core import create_model
    from ovseg_core.train.config import TrainConfig
    from ovseg_core.train.optim import build_optimizer

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = create_model(args.gpu_preset).to(device).train()
    opt = build_optimizer(model, TrainConfig(build_dir="-", out_dir="-", steps=1))
    b, size, length = args.gpu_batch, int(model.image_size), args.max_text_len
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1000, 20000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    batch = {"image": torch.randn(b, 3, size, size, generator=g), "input_ids": ids, "attention_mask": mask,
             "question_ids": ids.clone(), "question_mask": mask, "answer_ids": ids[:, :12].clone(),
             "answer_mask": mask[:, :12].clone(), "has_entity": torch.ones(b, dtype=torch.bool)}
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.forward_train(batch, 1)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
        opt.step()

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.gpu_iters):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.gpu_iters
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = {"benchmark": "gpu_throughput", "device": name, "preset": args.gpu_preset, "batch_size": b,
           "dtype": "bf16 autocast", "step_s": dt, "images_per_s": b / dt, "flops_per_step": flops,
           "achieved_tflops": flops / dt / 1e12, "peak_bf16_tflops": peak / 1e12 if peak else None,
           "mfu": flops / dt / peak if peak else None, "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
           "notes": "stage-1 step (ITC + MEC), synthetic tensors, no data loading; FLOPs from "
                    "torch.utils.flop_counter (matmul/conv/attention), peak = dense bf16 tensor-core spec"}
    print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", help="build folder to train on (the embedded sample's build)")
    p.add_argument("--eval-root", help="the sample's VOC-layout evaluation set (layout 'sample')")
    p.add_argument("--eval-split", default="val")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for training (both stages)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "learning.json"))
    p.add_argument("--work-dir", help="where the runs go (default: a fresh temp folder)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="stage-1 peak lr (not batch-scaled)")
    p.add_argument("--lr2", type=float, default=1e-4, help="stage-2 lr (not batch-scaled)")
    p.add_argument("--augment", default="crop", choices=("deit", "light", "crop", "none"),
                   help="stage-1 augmentation; 'crop' keeps colours (the synthetic classes' signal)")
    p.add_argument("--stage2-fraction", type=float, default=0.2, help="share of the budget for stage 2 (0 = off)")
    p.add_argument("--val-percent", type=float, default=5.0)
    p.add_argument("--max-text-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-eval-images", type=int, default=None)
    p.add_argument("--gpu-throughput", action="store_true", help="measure vit_s images/s and MFU on CUDA instead")
    p.add_argument("--gpu-preset", default="vit_s")
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--gpu-iters", type=int, default=10)
    args = p.parse_args(argv)
    if args.gpu_throughput:
        result = run_gpu_throughput(args)
        out = Path(args.out) if args.out != p.get_default("out") else REPO_ROOT / "benchmarks/results/gpu_throughput.json"
        atomic_write_json(out, result)
        return 0
    if not args.build or not args.eval_root:
        p.error("--build and --eval-root are required (or use --gpu-throughput)")
    result = run_learning(args)
    atomic_write_json(Path(args.out), result)
    keys = ("miou", "miou_delta_trained_vs_untrained", "stage1", "stage2")
    print(json.dumps({k: result[k] for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
