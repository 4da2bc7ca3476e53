"""``cc4m eval`` (wired in flows/cli.py): load a checkpoint, evaluate it on one dataset, print and write mIoU."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import nn

from ovseg_core.evaluation.datasets import DATASET_LAYOUTS, DatasetLayoutError, load_dataset
from ovseg_core.evaluation.evaluate import METRICS_FILE, evaluate, protocol_sizes
from ovseg_core.evaluation.overlay import atomic_write_bytes
from ovseg_core.models.checkpoint import load_model_from_checkpoint
from ovseg_core.zero_shot.templates import TEMPLATE_SETS, get_templates


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cc4m eval``. Size-like flags take 0 to mean "off"."""
    p.add_argument("--checkpoint", required=True, help="model checkpoint (ovseg_core.models.checkpoint format)")
    p.add_argument("--dataset-layout", required=True, choices=sorted(DATASET_LAYOUTS))
    p.add_argument("--data-root", required=True, help="dataset folder in the chosen layout")
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=None, help="write metrics.json, per_class_iou.csv and overlays/ here")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument(
        "--templates",
        default="single",
        choices=sorted(TEMPLATE_SETS),
        help="prompt set; the paper uses 'single' (\"a photo of a {}.\") for segmentation",
    )
    p.add_argument("--bg-thresh", type=float, default=None, help="default: the dataset's protocol value")
    p.add_argument("--topk", type=int, default=5, help="classes kept by the image-level ranking; 0 = all")
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding-window size; 0 = whole image in one pass; default 2 x the model's image size",
    )
    p.add_argument("--stride", type=int, default=None, help="window stride; default the model's image size")
    p.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="resize the short side first; 0 = keep size; default 2 x the model's image size",
    )
    p.add_argument(
        "--assignment",
        choices=["hard", "soft"],
        default="hard",
        help="hard = argmax group per pixel (paper); soft = weight groups by soft assignment",
    )
    p.add_argument(
        "--refine",
        choices=["none", "pamr"],
        default="none",
        help="none = the paper's protocol; pamr = refine the scores along image edges (ovseg_core.zero_shot.refine)",
    )
    p.add_argument("--n-overlays", type=int, default=4)
    p.add_argument("--device", default=None, help="e.g. cpu or cuda; default: where the checkpoint loads")


def _load_model(checkpoint: str) -> nn.Module:
    return load_model_from_checkpoint(checkpoint)


def cli_eval(args: argparse.Namespace) -> int:
    """``cc4m eval``: load a checkpoint, evaluate it on one dataset, print mIoU; 0 on success, 2 on bad input."""
    try:
        dataset = load_dataset(args.dataset_layout, args.data_root, split=args.split)
    except (DatasetLayoutError, ValueError) as err:
        print(f"cc4m eval: {err}", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).is_file():
        print(f"cc4m eval: checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 2
    model = _load_model(args.checkpoint)
    auto = protocol_sizes(int(model.image_size))
    window = auto["window"] if args.window is None else (args.window or None)
    stride = auto["stride"] if args.stride is None else args.stride
    short_side = auto["short_side"] if args.short_side is None else (args.short_side or None)
    out = Path(args.out) if args.out else None
    result = evaluate(
        model,
        dataset,
        templates=get_templates(args.templates),
        bg_thresh=args.bg_thresh,
        topk=args.topk or None,
        window=window,
        stride=min(stride, window) if window else None,
        short_side=short_side,
        assignment=args.assignment,
        refine=args.refine,
        max_images=args.max_images,
        out_dir=out,
        n_overlays=args.n_overlays,
        device=args.device,
    )
    result["checkpoint"] = str(args.checkpoint)
    if out is not None:
        atomic_write_bytes(out / METRICS_FILE, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    miou = result["mIoU"]
    print(
        f"{dataset.name} {args.split}: mIoU {miou * 100:.2f} over {result['n_images']} images "
        f"({result['n_classes_scored']} classes scored), pixel acc {result['pixel_acc'] * 100:.2f}"
        if miou is not None
        else f"{dataset.name}: no class could be scored"
    )
    for name, iou in result["per_class"].items():
        print(f"  {name:<24} {'-' if iou is None else f'{iou * 100:.2f}'}")
    if out is not None:
        print(f"wrote {out / METRICS_FILE}")
    return 0
