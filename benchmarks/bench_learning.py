"""Learning evidence: does pretraining on a CC4M build make the model segment (zero-shot) better than chance?

CPU mode (default): train the `tiny` preset on a build (the embedded sample's) for a wall-clock budget with THE sample
recipe (`ovseg_core.train.config.sample_recipe`, the same one the demo's pretrain flow uses; optional short stage 2
with --stage2-fraction), then score zero-shot mIoU on the sample's VOC-layout eval set (layout "sample") for
  (a) the trained model,
  (b) the SAME model untrained (same preset, overrides and init seed: train() seeds cfg.seed before building it),
  (c) predicting background everywhere,
all with the SAME evaluator settings. Those settings (bg_thresh, topk, hard/soft assignment, test size) and, with
stage 2, the checkpoint are chosen on the SELECTION split (ImageSets/Segmentation/train.txt of the eval folder,
`ovseg_core.evaluation.selection.select_eval_settings`); the test split (val.txt) is evaluated once per model afterwards.
Writes the JSON (config, loss curves per step, validation history, selection scores, per-class IoU, pixel accuracy)
and a PNG of the curves next to it.

    python benchmarks/bench_learning.py --build DIR --eval-root DIR --minutes 4 --fresh-eval-seed S --seed K
        # -> benchmarks/results/learning-seedK-<UTC time>.json (the demo's budget and recipe are the defaults)

On a shared CPU prefer a fixed STEP budget (`--steps N [--steps2 M]`): wall-clock budgets give other runs other
lengths when other jobs load the machine. `--model-override mec_weight=0` makes the ablation rows (ITC only);
`--steps2` adds stage 2 (+ cross-image mask), and every checkpoint (stage 1, stage 2) is scored on the test split and
the fresh set with its own selected settings and bootstrap intervals (`per_checkpoint_scores`).

"learned" needs, against both baselines, a 95% paired-bootstrap interval (test images resampled) of the mIoU lead
that lies above 0. --fresh-eval-seed also renders and scores a second eval set that tuning never looked at.

GPU mode (--gpu-throughput): images/s and MFU of one vit_s stage-1 training step at batch 256 in bf16 (synthetic
tensors, no data loading); skipped with a message when CUDA is not available (never run on the 2-core CI machine).
benchmarks/bench_gpu.py is the fuller check (real loader, torchrun, vit_s and vit_b).
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

from benchmarks.common import default_output, stamp
from manifests.fileio import write_text_atomic

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report MFU as null.
LEARNED_MARGIN = 0.01
# The demo's training budget (cc4m demo --minutes default): the benchmark's default, so it measures what the demo does.
DEMO_MINUTES = 4.0
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def atomic_write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


# ------------------------------------------------------------------------------------------------ learning (CPU)
def evaluate_model(model: torch.nn.Module, dataset: Any, settings: dict[str, Any],
                   max_images: int | None) -> dict[str, Any]:
    from ovseg_core.evaluation.evaluate import evaluate

    per_image: list[np.ndarray] = []
    res = evaluate(model.eval(), dataset, max_images=max_images, n_overlays=0, per_image_confusion=per_image,
                   **settings)
    return {"mIoU": res["mIoU"], "pixel_acc": res["pixel_acc"], "n_images": res["n_images"],
            "n_classes_scored": res["n_classes_scored"], "settings": res["settings"], "seconds": res["seconds"],
            "per_class": res["per_class"], "per_image_confusion": np.stack(per_image)}


def all_background(dataset: Any, max_images: int | None) -> dict[str, Any]:
    """Scores of predicting label 0 everywhere (same confusion-matrix metric as the evaluator)."""
    from ovseg_core.evaluation.metrics import scores_of
    from ovseg_core.evaluation.promotion import background_confusions

    per_image = background_confusions(dataset, max_images)
    scores = scores_of(per_image.sum(axis=0))
    per_class = {name: (None if np.isnan(v) else float(v)) for name, v in zip(dataset.classnames, scores.per_class_iou)}
    return {"mIoU": float(scores.miou), "pixel_acc": float(scores.pixel_acc), "n_images": len(per_image),
            "n_classes_scored": int(np.count_nonzero(~np.isnan(scores.per_class_iou))), "per_class": per_class,
            "per_image_confusion": per_image}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """["mec_weight=0", "entity_prompt_weight=1.0"] -> {"mec_weight": 0.0, ...} (values parsed as JSON when they parse)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model-override expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def json_ready(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "per_image_confusion"}


def score_against_baselines(trained: torch.nn.Module, untrained: torch.nn.Module, dataset: Any,
                            settings: dict[str, Any], max_images: int | None, seed: int,
                            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trained model, the same model untrained and all-background on one test set with the same settings, and
    the paired-bootstrap interval of the trained model's mIoU lead over each baseline."""
    from ovseg_core.evaluation.metrics import paired_bootstrap_miou_delta

    results = {"trained": evaluate_model(trained, dataset, settings, max_images),
               "untrained_same_init": evaluate_model(untrained, dataset, settings, max_images),
               "all_background": all_background(dataset, max_images)}
    intervals = {f"trained_vs_{name}": paired_bootstrap_miou_delta(results["trained"]["per_image_confusion"],
                                                                   results[name]["per_image_confusion"], seed=seed)
                 for name in ("untrained_same_init", "all_background")}
    return results, intervals


def curves(losses: list[dict[str, float]], stage: int, offset: int) -> list[dict[str, float]]:
    keys = ("step", "lr", "loss", "itc", "mec", "mask", "entity", "grad_norm", "time_s")
    return [{"stage": stage, "global_step": r["step"] + offset, **{k: r[k] for k in keys if k in r}} for r in losses]


def plot_curves(points: list[dict[str, float]], val: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axv) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [p["global_step"] for p in points]
    for key in ("loss", "itc", "mec", "mask", "entity"):
        ys = [p.get(key) for p in points]
        if any(y for y in ys):
            # moving average: single steps at batch 32 are noisy
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
        ax2.set_ylabel("image->text top-1 (orange)")
        axv.set_xlabel("step")
        axv.set_ylabel("val ITC (held-out split of the build)")
        axv.legend(loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info(threads: int) -> dict[str, Any]:
    import platform

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def refine_candidates(text: str) -> tuple[str, ...]:
    """'none,pamr' -> ('none', 'pamr'): the refinements the selection split chooses among; unknown ones refused."""
    from ovseg_core.zero_shot.refine import REFINE_MODES

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in REFINE_MODES]
    if not modes or unknown:
        raise ValueError(f"--refine takes a comma list of {REFINE_MODES}, got {text!r}")
    return modes


def run_learning(args: argparse.Namespace) -> dict[str, Any]:
    from ovseg_core import create_model
    from ovseg_core.data.cc4m import BuildReader
    from ovseg_core.evaluation.datasets import load_dataset
    from ovseg_core.evaluation.evaluate import protocol_sizes
    from ovseg_core.evaluation.selection import select_eval_settings
    from ovseg_core.models.checkpoint import load_model_from_checkpoint
    from ovseg_core.train.config import SAMPLE_STEP_SECONDS, TrainConfig, sample_recipe
    from ovseg_core.train.loop import train

    machine = machine_info(args.threads)
    eval_candidates = {"refine": refine_candidates(args.refine)}  # checked before any training
    started = time.time()
    torch.set_num_threads(args.threads)
    reader = BuildReader(args.build)  # fails clearly on a missing/empty build
    test_set = load_dataset("sample", args.eval_root, split=args.eval_split)
    selection_set = load_dataset("sample", args.eval_root, split=args.selection_split)
    if args.selection_split == args.eval_split:
        raise ValueError("the selection split must differ from the evaluation split")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_learning_"))
    budget = args.minutes * 60.0
    overrides: dict[str, Any] = {"seed": args.seed, "threads": args.threads, "resume": False}
    if args.lr is not None:
        overrides.update(base_lr=args.lr, warmup_lr=args.lr / 100, min_lr=args.lr / 10)
    if args.steps is not None:
        # A fixed STEP budget: comparable runs whatever else loads the shared CPU (wall-clock budgets are not).
        step_s = None
        recipe = sample_recipe(reader.root, work / "stage1", **{**overrides, "steps": args.steps,
                                                                "warmup_steps": max(1, args.steps // 15),
                                                                "time_limit_s": None})
    else:
        # probe the step time (counted in the budget) to size a cosine schedule that completes within the budget
        probe_cfg = sample_recipe(reader.root, work / "probe", minutes=1.0,
                                  **{**overrides, "steps": 4, "val_percent": 0.0, "time_limit_s": None})
        probe = train(probe_cfg)
        # The probe's steps all miss the frozen-text cache (every text is new), so it overestimates a cached step
        # ~2x: plan with the recipe's measured step time unless the probe shows a slower machine than that.
        step_s = max(1e-3, min(probe.mean_step_s, SAMPLE_STEP_SECONDS) if probe_cfg.cache_frozen_text
                     else probe.mean_step_s)
        remaining = budget - (time.time() - started)
        s1_budget = max(60.0, remaining * (1 - args.stage2_fraction))
        # data loading + validation + checkpoint overhead: measured ~8 % of the step time
        recipe = sample_recipe(reader.root, work / "stage1", minutes=s1_budget / 60, step_seconds=step_s * 1.08,
                               **overrides)
    model_overrides = dict(recipe.model_overrides)
    model_overrides.update(parse_overrides(args.model_override))
    s1_cfg = TrainConfig.from_dict({**recipe.to_dict(), "eval_every": max(10, recipe.steps // 8),
                                    "model_overrides": [list(kv) for kv in sorted(model_overrides.items())]})
    s1 = train(s1_cfg)
    stage1_ckpt = s1.last_checkpoint
    s2 = None
    remaining = budget - (time.time() - started)
    if args.steps2 or (args.steps is None and args.stage2_fraction > 0 and remaining > 30):
        # a stage-2 step (frozen text, + EMA teacher on the partner) costs about one stage-1 step on the tiny preset
        steps2 = args.steps2 or max(5, int(remaining / (step_s * 1.15)))
        s2_cfg = TrainConfig.for_stage(2, **{
            **{k: v for k, v in s1_cfg.to_dict().items() if k not in ("stage", "base_lr", "warmup_lr", "min_lr",
                                                                        "warmup_epochs", "warmup_steps")},
            "out_dir": str(work / "stage2"), "steps": steps2, "init_checkpoint": stage1_ckpt,
            "base_lr": args.lr2, "warmup_lr": args.lr2, "min_lr": args.lr2 / 10, "eval_every": max(5, steps2 // 4),
            "time_limit_s": None if args.steps2 else remaining,
            "model_overrides": [list(kv) for kv in s1_cfg.model_overrides]})
        s2 = train(s2_cfg)
    train_seconds = time.time() - started

    # 2) choose the checkpoint and the evaluator settings on the SELECTION split (never on the test split)
    candidates = {"stage1": stage1_ckpt}
    if s2:
        candidates["stage2"] = s2.last_checkpoint
    selections = {name: select_eval_settings(load_model_from_checkpoint(path), selection_set, eval_candidates,
                                             max_images=args.max_selection_images)
                  for name, path in candidates.items()}
    chosen_name = max(selections, key=lambda n: selections[n]["selection_mIoU"])
    chosen = selections[chosen_name]["chosen"]
    trained = load_model_from_checkpoint(candidates[chosen_name])
    torch.manual_seed(args.seed)  # exactly what train() does before building the model: same initial weights
    untrained = create_model(args.preset, **dict(s1_cfg.model_overrides))
    untrained_selection = (None if args.lean else
                           select_eval_settings(untrained, selection_set, eval_candidates,
                                                max_images=args.max_selection_images))
    protocol = {**protocol_sizes(int(trained.image_size)), "bg_thresh": None, "topk": 5, "assignment": "hard"}

    # 3) the test split, once per model and setting
    # Paired bootstrap over the test images: is the trained model's lead larger than the test set's noise?
    results, intervals = score_against_baselines(trained, untrained, test_set, chosen, args.max_eval_images,
                                                 args.seed)
    supplementary = {} if args.lean else {
        "untrained_with_its_own_selected_settings": evaluate_model(
            untrained, test_set, untrained_selection["chosen"], args.max_eval_images),
        "trained_paper_protocol_settings": evaluate_model(trained, test_set, protocol, args.max_eval_images),
        "untrained_paper_protocol_settings": evaluate_model(untrained, test_set, protocol, args.max_eval_images),
    }
    fresh, fresh_set = None, None
    if args.fresh_eval_seed is not None:
        # A second eval set rendered with another seed (same classes, same size), which no experiment looked at
        # while the recipe was tuned: same models, same chosen settings, same bootstrap.
        from curation.io import read_json
        from curation.sample import make_eval_set

        params = read_json(Path(args.eval_root) / "eval.json")["params"]
        fresh_root = make_eval_set(work / f"fresh_eval_seed{args.fresh_eval_seed}", n_images=params["n_images"],
                                   image_size=params["image_size"], seed=args.fresh_eval_seed, n_selection=0,
                                   classes=list(test_set.classnames[1:])).root
        fresh_set = load_dataset("sample", fresh_root, split="val")
        fresh_results, fresh_intervals = score_against_baselines(trained, untrained, fresh_set, chosen,
                                                                 args.max_eval_images, args.seed)
        fresh = {"eval_root": str(fresh_root), "render_seed": args.fresh_eval_seed,
                 "world": read_json(Path(fresh_root) / "eval.json").get("world"),
                 "miou": {k: v["mIoU"] for k, v in fresh_results.items()}, "bootstrap_95": fresh_intervals,
                 "eval": {k: json_ready(v) for k, v in fresh_results.items()}}
    # Ablation rows: every checkpoint (stage 1, stage 2) on the test split and the fresh set, each with the settings
    # chosen for it on the selection split, against the same baselines.
    per_checkpoint = {}
    for name, path in candidates.items():
        model = trained if name == chosen_name else load_model_from_checkpoint(path)
        row = {"settings": selections[name]["chosen"]}
        for set_name, dataset in (("test", test_set), ("fresh", fresh_set)):
            if dataset is None:
                continue
            if name == chosen_name:  # already scored above, with the same settings
                res, ivs = (results, intervals) if set_name == "test" else (fresh_results, fresh_intervals)
            else:
                res, ivs = score_against_baselines(model, untrained, dataset, selections[name]["chosen"],
                                                   args.max_eval_images, args.seed)
            row[set_name] = {"miou": res["trained"]["mIoU"], "untrained_miou": res["untrained_same_init"]["mIoU"],
                             "background_miou": res["all_background"]["mIoU"], "bootstrap_95": ivs}
        per_checkpoint[name] = row
    if s2 and not args.lean:
        other = "stage1" if chosen_name == "stage2" else "stage2"
        supplementary[f"trained_{other}_with_its_selected_settings"] = evaluate_model(
            load_model_from_checkpoint(candidates[other]), test_set, selections[other]["chosen"], args.max_eval_images)

    points = curves(s1.losses, 1, 0) + (curves(s2.losses, 2, s1.final_step) if s2 else [])
    val = [{"stage": 1, **v, "global_step": v["step"]} for v in s1.val_history]
    if s2:
        val += [{"stage": 2, **v, "global_step": v["step"] + s1.final_step} for v in s2.val_history]
    png = Path(args.out).with_suffix(".png")
    miou = {k: results[k]["mIoU"] for k in results}
    plot_curves(points, val, png, title=f"tiny on the sample, {train_seconds / 60:.1f} min: val mIoU trained "
                f"{miou['trained']:.3f} / untrained {miou['untrained_same_init']:.3f} / background "
                f"{miou['all_background']:.3f}")

    def summary(r: Any, cfg: TrainConfig) -> dict[str, Any]:
        first = float(np.mean([p["loss"] for p in r.losses[:20]])) if r.losses else None
        last = float(np.mean([p["loss"] for p in r.losses[-20:]])) if r.losses else None
        return {"config": cfg.to_dict(), "steps": r.final_step, "planned_steps": r.total_steps,
                "stopped_by_time_limit": r.stopped_by_time_limit, "seconds": round(r.seconds, 1),
                "mean_step_s": round(r.mean_step_s, 4), "loss_first20_mean": first, "loss_last20_mean": last,
                "best_val_itc": r.best_val_itc, "final_val": r.val_history[-1] if r.val_history else None,
                "first_val": r.val_history[0] if r.val_history else None, "checkpoint": r.last_checkpoint,
                "data_counters": r.data_counters}

    from manifests.version import code_version

    trained_miou, untrained_miou, bg_miou = miou["trained"], miou["untrained_same_init"], miou["all_background"]
    learned = all(iv["low"] > 0 for iv in intervals.values()) and (
        trained_miou - max(untrained_miou, bg_miou) >= LEARNED_MARGIN)
    return {
        "benchmark": "learning",
        "code_version": code_version(),
        "build": str(reader.root),
        "build_manifest_sha256": reader.manifest_sha256(),
        "build_samples": reader.num_samples(),
        "eval_root": str(args.eval_root),
        "eval_split": args.eval_split,
        "selection_split": args.selection_split,
        "machine": machine,
        "device": f"cpu x {args.threads} threads",
        "budget_minutes": args.minutes,
        "train_wall_seconds": round(train_seconds, 1),
        "recipe": "ovseg_core.train.config.sample_recipe",
        "probe_step_s": round(step_s, 4) if step_s is not None else None,
        "stage1": summary(s1, s1_cfg),
        "stage2": summary(s2, s2_cfg) if s2 else None,
        "selection": {"chosen_checkpoint": chosen_name, "chosen_settings": chosen, "per_checkpoint": selections,
                      "untrained": untrained_selection},
        "miou": miou,
        "pixel_acc": {k: results[k]["pixel_acc"] for k in results},
        "eval": {k: json_ready(v) for k, v in results.items()},
        "supplementary_eval": {k: {kk: v[kk] for kk in ("mIoU", "pixel_acc", "settings")} for k, v in
                               supplementary.items()},
        "bootstrap_95": intervals,
        "fresh_eval": fresh,
        "per_checkpoint_scores": per_checkpoint,
        "model_overrides": dict(s1_cfg.model_overrides),
        "step_budget": {"stage1": args.steps, "stage2": args.steps2},
        "miou_delta_trained_vs_untrained": trained_miou - untrained_miou,
        "miou_delta_trained_vs_background": trained_miou - bg_miou,
        # "Clearly above" both baselines: the 95% paired-bootstrap interval of the mIoU lead (test images resampled)
        # excludes 0 for each, and the lead is at least LEARNED_MARGIN.
        "learned": bool(learned),
        "learned_criterion": (f"for both baselines the 95% paired-bootstrap interval of (trained - baseline) mIoU "
                              f"is above 0, and trained - max(baselines) >= {LEARNED_MARGIN}"),
        "curves": points,
        "val_history": val,
        "plot": str(png),
        "notes": [
            ("mIoU on the embedded sample's rendered eval set (layout 'sample', split val.txt). The checkpoint and the "
             "evaluator settings (bg_thresh, topk, assignment, test size) were chosen on the SELECTION split "
             "(train.txt of the same folder); val.txt was evaluated only after that, once per model."),
            ("untrained_same_init: same preset, overrides and torch seed as training, hence the same initial weights; "
             "scored with the trained model's selected settings (supplementary: with its own selected settings)."),
            "LRs are NOT the paper's batch-scaled values (too small at batch 32 to learn in minutes): see stage1.config.",
            ("The sample's eval set scores the classes drawn in >= 15 of the sample's servable training images (its "
             "eval.json lists them, like VOC's 20 frequent classes); rarer classes cannot be learned from ~1,300 "
             "images. See eval.*.per_class."),
        ],
    }


# ------------------------------------------------------------------------------------------------ throughput (GPU)
def run_gpu_throughput(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        msg = "skipped: CUDA is not available (GPU throughput mode needs a GPU)"
        print(msg)
        return {"benchmark": "gpu_throughput", "skipped": msg}
    from benchmarks.bench_gpu import FlopCount  # FlopCounterMode's module hooks fail in the model's no_grad parts
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
    with FlopCount() as counter:
        step()
    flops = counter.flops
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
    p.add_argument("--eval-split", default="val", help="the test split (val.txt); evaluated once per model")
    p.add_argument("--selection-split", default="train",
                   help="split that picks the checkpoint and the evaluator settings (train.txt of the eval folder)")
    p.add_argument("--fresh-eval-seed", type=int, default=None,
                   help="also render a second eval set (same classes and size) with this seed and score it the same way")
    p.add_argument("--minutes", type=float, default=DEMO_MINUTES,
                   help="wall-clock budget for training (both stages); ignored with --steps")
    p.add_argument("--steps", type=int, help="fixed stage-1 step budget (comparable under a shared CPU)")
    p.add_argument("--steps2", type=int, help="fixed stage-2 step budget (0/absent: no stage 2 with --steps)")
    p.add_argument("--lean", action="store_true",
                   help="skip the supplementary evaluations (untrained with its own settings, paper protocol)")
    p.add_argument("--model-override", action="append", metavar="KEY=VALUE",
                   help="change a model setting of the recipe, e.g. mec_weight=0 (ablation rows)")
    p.add_argument("--out", default=None,
                   help="result JSON (default: a new benchmarks/results/learning-seed<K>-<UTC time>.json, never "
                        "overwritten)")
    p.add_argument("--work-dir", help="where the runs go (default: a fresh temp folder)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--lr", type=float, default=None, help="stage-1 peak lr (default: the recipe's; not batch-scaled)")
    p.add_argument("--lr2", type=float, default=1e-4, help="stage-2 lr (not batch-scaled)")
    p.add_argument("--stage2-fraction", type=float, default=0.0, help="share of the budget for stage 2 (0 = off)")
    p.add_argument("--refine", default="none,pamr",
                   help="refinements the selection split may choose from (the demo's: none,pamr; 'none' = the paper)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-eval-images", type=int, default=None, help="smoke tests only: score the first N test images")
    p.add_argument("--max-selection-images", type=int, default=None, help="smoke tests only")
    p.add_argument("--gpu-throughput", action="store_true", help="measure vit_s images/s and MFU on CUDA instead")
    p.add_argument("--gpu-preset", default="vit_s")
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--max-text-len", type=int, default=32, help="GPU mode: synthetic text length")
    p.add_argument("--gpu-iters", type=int, default=10)
    args = p.parse_args(argv)
    if args.gpu_throughput:
        result = run_gpu_throughput(args)
        out = Path(args.out) if args.out else default_output("gpu_throughput")
        atomic_write_json(out, result)
        return 0
    if not args.build or not args.eval_root:
        p.error("--build and --eval-root are required (or use --gpu-throughput)")
    args.out = str(args.out or default_output(f"learning-seed{args.seed}"))  # the plot goes next to it
    started = stamp()  # the code that trains is the code at the start: a commit during a long run must not relabel it
    result = run_learning(args)
    atomic_write_json(Path(args.out), {**result, **started})
    keys = ("miou", "pixel_acc", "miou_delta_trained_vs_untrained", "miou_delta_trained_vs_background", "learned",
            "train_wall_seconds")
    print(json.dumps({**{k: result[k] for k in keys}, "selection": result["selection"]["chosen_settings"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
