"""Stage 1 of the `paper` recipe on a GPU: vit_b, per-GPU batch 256, ~200 steps on a synthetic build.

Reports images/s (timed steps, data loading included), peak GPU memory against ovseg_core.train.memory's estimate
(the number that refuses too-big batches), and whether the loss falls (mean of the first vs the last 20 steps).
It runs the recipe as `cc4m train --recipe paper` would (ovseg_core.train.recipe.paper_config: tf32, the release's
BatchNorm statistics, logit-scale decay, bilinear DeiT augmentation), with three substitutions, all recorded:
  - the global batch is 256 x GPUs (the recipe's 2048 on 8 GPUs; --global-batch rescales the lrs as always);
  - the DINO init is a random-weight file of DINO ViT-B/16's layout (no network on the GPU machine): the mapping,
    the load report and the refusal path run, the weights are not DINO's;
  - the text encoder is the bundled MiniLM unless --text names a local bert-base-uncased folder.
The build is synthetic (benchmarks/bench_loader.make_throughput_build, photo-like JPEGs), rendered once.

Status: written for issue 17 item 9; NOT RUN in the session that wrote it (no GPU was lent). CPU smoke test of the
same code path:
    .venv/bin/python benchmarks/bench_paper_gpu.py --device cpu --preset tiny --steps 3 --per-gpu-batch 4 \
        --build-samples 64 --out /tmp/paper_gpu_smoke.json
On one GPU (about 5 minutes on an H100):
    .venv/bin/python benchmarks/bench_paper_gpu.py        # -> benchmarks/results/paper_gpu-<stamp>.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# timm ViT shapes of the DINO-shaped stand-in init, per preset
INIT_SHAPES = {"vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16, "img_size": 224},
               "tiny": {"embed_dim": 192, "depth": 4, "num_heads": 4, "patch_size": 8, "img_size": 64}}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from benchmarks.bench_loader import make_throughput_build
    from ovseg_core.config import MINILM_TEXT_MODEL
    from ovseg_core.models.visual_init import save_dino_shaped_checkpoint
    from ovseg_core.train.loop import train
    from ovseg_core.train.memory import estimate_train_memory_gib
    from ovseg_core.train.recipe import paper_config

    cuda = args.device == "cuda"
    build = make_throughput_build(work / "build", args.build_samples, per_shard=max(16, args.build_samples // 16))
    init = save_dino_shaped_checkpoint(work / "dino_shaped.pt", **INIT_SHAPES[args.preset])
    text = args.text or MINILM_TEXT_MODEL
    cfg = paper_config(1, str(build), str(work / "run"), world_size=1, global_batch=args.per_gpu_batch,
                       visual_init=str(init), preset=args.preset, steps=args.steps, device=args.device,
                       num_workers=args.num_workers, val_percent=0.0, save_every=0, log_every=25, resume=False,
                       time_limit_s=args.max_seconds, model_overrides=(("text_model", text),))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = train(cfg)
    wall = time.time() - t0
    records = result.losses
    skip = min(10, max(0, len(records) - 1))  # warm-up steps (autotune, loader start) are not timed
    timed = records[skip:]
    span = timed[-1]["time_s"] - records[skip - 1]["time_s"] if skip else wall
    first, last = (statistics.mean(r["loss"] for r in part) for part in (records[:20], records[-20:]))
    from ovseg_core.models._registry import get_model_config

    estimate = estimate_train_memory_gib(get_model_config(args.preset, text_model=text), args.per_gpu_batch, 1,
                                         cfg.precision)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "preset": args.preset, "text_model": text,
        "per_gpu_batch": args.per_gpu_batch, "steps": result.final_step, "timed_steps": len(timed),
        "stopped_by_time_limit": result.stopped_by_time_limit, "precision": cfg.precision,
        "images_per_s": len(timed) * args.per_gpu_batch / span, "step_s": span / len(timed),
        "loader_stall_fraction": sum(r.get("data_s", 0.0) for r in timed) / span,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "memory_estimate_gib": estimate, "loss_first20_mean": first, "loss_last20_mean": last,
        "loss_falls": last < first, "wall_s": wall,
        "run_plan": json.loads((work / "run" / "run.json").read_text()),
        "visual_init_report": {k: (len(v) if isinstance(v, list) else v) for k, v in
                               json.loads((work / "run" / "visual_init.json").read_text()).items()},
        "substitutions": ["random-weight DINO-shaped init", f"text model {text}",
                          f"global batch {args.per_gpu_batch} on 1 GPU"],
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--preset", choices=tuple(INIT_SHAPES), default="vit_b")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--per-gpu-batch", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=12)
    p.add_argument("--build-samples", type=int, default=4096)
    p.add_argument("--max-seconds", type=float, default=420.0, help="training time cap")
    p.add_argument("--text", help="local folder of bert-base-uncased (default: the bundled MiniLM)")
    p.add_argument("--out", help="result JSON (default: benchmarks/results/paper_gpu-<stamp>.json)")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: CUDA is not available (--device cpu --preset tiny for the smoke test)")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_paper_gpu_") as tmp:
        result = {"args": vars(args), **run(args, Path(tmp))}
    path = write_result("paper_gpu", result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("run_plan", "args")}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
