"""GPU readiness: train `vit_s` and `vit_b` in bf16 with the real loader, under torchrun, eager vs compiled.

Runs = presets x batch sizes x compile modes (`--compile-modes off on`: ovseg_core.train.compiled), plus, per
preset, one run with the GPU-decode input path (`--gpu-decode-runs`: JPEG bytes decoded on the GPU, light
augmentation) whose loader stall is the number to read. Each run also counts the CUDA kernels of one training step
(benchmarks/bench_step.count_kernels on a synthetic batch of the same size and mode).

For each preset the launcher runs `torchrun --nproc_per_node=<gpus> benchmarks/bench_gpu.py --worker ...`, which
calls `ovseg_core.train.loop.train` (nccl, bf16 autocast, DataLoader workers over a webdataset build) and reports:
  - images/s (global batch x steps / wall time of the timed steps, data loading included);
  - MFU: FLOPs per step counted (torch.utils.flop_counter's formulas, per rank) on 2 real training steps, divided by the step time and
    the named dense bf16 peak of the GPU (PEAK_BF16; unknown GPUs report null);
  - peak GPU memory (torch.cuda.max_memory_allocated);
  - loader stall fraction: the share of the step time spent waiting for the next batch (log.jsonl `data_s`);
  - that the loss falls (mean of the first vs the last 20 steps).
The build is synthetic (photo-like 500x375 JPEGs, benchmarks/bench_loader.make_throughput_build), rendered once into
a temp folder. vit_b runs with the bundled MiniLM text encoder unless --vit-b-text names a local bert-base-uncased
(nothing is downloaded). Budget: default sizes take ~5-7 min on one H100/H200-class GPU; `--max-seconds` caps each
preset's training (time_limit_s), so the whole run stays under 8 minutes.

CPU smoke test of the same code path (gloo, tiny preset, a handful of steps; no MFU):
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --presets tiny --steps 4 --batch-size 8 --nproc 2 \
        --build-samples 64 --out /tmp/gpu_smoke.json
Training FLOPs per image without a GPU (CPU, synthetic inputs):
    .venv/bin/python benchmarks/bench_gpu.py --count-flops-only
On a GPU, one preset per command (each run is capped by --max-seconds, compile time included; 5 runs per preset,
~8-10 minutes; not yet run: no GPU was lent to the session that wrote it):
    .venv/bin/python benchmarks/bench_gpu.py --presets vit_s --steps 80 --max-seconds 90
    .venv/bin/python benchmarks/bench_gpu.py --presets vit_b --steps 80 --max-seconds 90
CPU smoke of the launcher, both compile modes' wiring and the GPU-decode run (tiny, gloo, a few steps):
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --presets tiny --batch-sizes 8 --compile-modes off \
        --steps 3 --nproc 1 --num-workers 0 --build-samples 64 --gpu-decode-runs --out /tmp/gpu_smoke.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' spec sheets (without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_for(device_name: str) -> tuple[str | None, float | None]:
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return key, value
    return None, None


class FlopCount:
    """Count FLOPs of every op with a formula in torch.utils.flop_counter's registry (matmul, conv, attention).

    FlopCounterMode itself also tracks modules with autograd hooks, which fails inside the model's no_grad blocks
    ("Expected gradient function to be set"); counting at the dispatch level needs no hooks.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.flops += formula(*args, **kwargs, out_val=out)
                return out

        self.flops = 0
        self.mode = _Mode()

    def __enter__(self) -> Self:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


# ------------------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> int:
    """One torchrun rank: measure FLOPs on 2 steps, then train args.steps steps; rank 0 writes the JSON."""
    import torch

    from ovseg_core.config import MINILM_TEXT_MODEL
    from ovseg_core.train import distributed as D
    from ovseg_core.train.config import TrainConfig
    from ovseg_core.train.loop import train

    cuda = args.device == "cuda"
    overrides: list[list[Any]] = []
    if args.preset == "vit_b":
        overrides.append(["text_model", args.vit_b_text or MINILM_TEXT_MODEL])
    out = Path(args.run_dir)
    base = {"build_dir": args.build, "preset": args.preset, "stage": 1, "batch_size": args.batch_size,
            "base_lr": 5e-4, "warmup_lr": 5e-6, "min_lr": 5e-5, "warmup_steps": 10, "scale_lr": False,
            "augment": "light" if args.gpu_decode else "deit", "device": args.device,
            "num_workers": args.num_workers, "val_percent": 0.0, "eval_every": 0, "save_every": 0, "log_every": 25,
            "resume": False, "max_text_len": 32, "model_overrides": overrides, "shuffle_buffer": 1024,
            "compile": args.compile, "gpu_decode": args.gpu_decode}
    # 1) FLOPs of real training steps (flop_counter counts matmuls, convolutions and attention), eager: the
    # dispatch-level counter does not see inside compiled kernels, and the math is the same
    with FlopCount() as counter:
        train(TrainConfig(**{**base, "compile": "off"}, out_dir=str(out / "flops"), steps=2))
    flops_per_step = counter.flops / 2
    # 2) the timed run
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = train(TrainConfig(**base, out_dir=str(out / "train"), steps=args.steps, time_limit_s=args.max_seconds))
    wall = time.time() - t0
    info = D.current_info()
    if info.is_main:
        records = result.losses
        skip = min(10, max(0, len(records) - 1))  # warm-up steps (cudnn/autotune, loader start) are not timed
        timed = records[skip:]
        span = timed[-1]["time_s"] - records[skip - 1]["time_s"] if skip else wall
        images_per_s = len(timed) * args.batch_size / span
        step_s = span / len(timed)
        data_wait = sum(r.get("data_s", 0.0) for r in timed)
        device_name = torch.cuda.get_device_name() if cuda else "cpu"
        peak_name, peak = peak_for(device_name) if cuda else (None, None)
        world = info.world_size
        first = statistics.mean(r["loss"] for r in records[:20])
        last = statistics.mean(r["loss"] for r in records[-20:])
        report = {
            "preset": args.preset, "device": device_name, "world_size": world, "global_batch": args.batch_size,
            "dtype": "bf16 autocast" if cuda else "fp32 (cpu)", "steps": result.final_step,
            "stopped_by_time_limit": result.stopped_by_time_limit, "timed_steps": len(timed),
            "images_per_s": images_per_s, "step_s": step_s, "flops_per_step": flops_per_step,
            "flops_per_image": flops_per_step / (args.batch_size / world),
            "achieved_tflops_per_gpu": flops_per_step / step_s / 1e12,
            "peak_name": peak_name, "peak_bf16_tflops": peak / 1e12 if peak else None,
            "mfu": flops_per_step / step_s / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "loader_stall_fraction": data_wait / span, "num_workers": args.num_workers,
            "loss_first20_mean": first, "loss_last20_mean": last, "loss_falls": last < first,
            "text_model": dict(overrides).get("text_model", "preset default"), "wall_s": wall,
            "compile": args.compile, "gpu_decode": args.gpu_decode, "augment": base["augment"],
            "kernels_per_step": step_kernels(args, overrides, world)}
        Path(args.worker_out).write_text(json.dumps(report, indent=1))
    D.cleanup()
    return 0


def step_kernels(args: argparse.Namespace, overrides: list[list[Any]], world: int) -> dict[str, int] | None:
    """Kernels of one training step of a fresh model in the run's compile mode, on a synthetic per-rank batch."""
    import torch

    from benchmarks.bench_step import count_kernels, one_step, synthetic_batch
    from ovseg_core import create_model
    from ovseg_core.train.compiled import build_train_step

    device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    model = create_model(args.preset, **dict(overrides)).to(device).train()
    step = build_train_step(model, args.compile, device, world_size=1)
    batch = synthetic_batch(model, max(1, args.batch_size // world), 32, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        for _ in range(3):  # compile, record CUDA graphs, warm up
            one_step(model, step, batch)
        return count_kernels(model, step, batch, device)


def count_flops(args: argparse.Namespace) -> int:
    """FLOPs of one stage-1 training step (forward + backward) per image, counted on CPU with synthetic inputs: the
    numbers an MFU or a loader-sizing estimate needs when no GPU is at hand (no timing here)."""
    import torch

    from benchmarks.common import stamp
    from ovseg_core import create_model
    from ovseg_core.config import MINILM_TEXT_MODEL

    torch.manual_seed(0)
    out: dict[str, Any] = {"benchmark": "gpu_flops_cpu_count", **stamp(), "batch": 2, "text_len": 32,
                           "text_model": "bundled MiniLM-L6 (vit_b's bert-base-uncased is not available offline)",
                           "train_gflops_per_image": {}}
    for preset in args.presets:
        model = create_model(preset, text_model=args.vit_b_text or MINILM_TEXT_MODEL).train()
        tok = model.tokenize(["a photo of a dog on a sofa next to a cat and a bowl"] * 2, max_length=32)
        batch = {"image": torch.randn(2, 3, model.image_size, model.image_size), "input_ids": tok["input_ids"],
                 "attention_mask": tok["attention_mask"], "question_ids": tok["input_ids"],
                 "question_mask": tok["attention_mask"], "answer_ids": tok["input_ids"][:, :8],
                 "answer_mask": tok["attention_mask"][:, :8], "has_entity": torch.ones(2, dtype=torch.bool)}
        with FlopCount() as counter:
            model.forward_train(batch, 1)["loss"].backward()
        out["train_gflops_per_image"][preset] = counter.flops / 2 / 1e9
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------- launcher
def planned_runs(args: argparse.Namespace) -> list[tuple[str, str, int, str, bool]]:
    """(name, preset, global batch, compile mode, gpu decode) of every run, in order."""
    runs = [(f"{p}/b{b}/compile-{m}", p, b, m, False)
            for p in args.presets for b in args.batch_sizes for m in args.compile_modes]
    if args.gpu_decode_runs:
        mode = args.compile_modes[-1]
        runs += [(f"{p}/b{args.batch_sizes[0]}/compile-{mode}/gpu-decode", p, args.batch_sizes[0], mode, True)
                 for p in args.presets]
    return runs


def launch(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.bench_loader import make_throughput_build
    from benchmarks.common import stamp

    if args.device == "cuda" and not torch.cuda.is_available():
        msg = "skipped: CUDA is not available (run with --device cpu for the CPU smoke test)"
        print(msg)
        Path(args.out).write_text(json.dumps({"benchmark": "gpu", "skipped": msg, **stamp()}, indent=1))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    t0 = time.time()
    build = make_throughput_build(work / "build", args.build_samples, per_shard=max(16, args.build_samples // 16))
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 1)
    results: dict[str, Any] = {"benchmark": "gpu", **stamp(), "build_seconds": round(time.time() - t0, 1),
                               "nproc": nproc, "presets": {}}
    for name, preset, batch, mode, gpu_decode in planned_runs(args):
        worker_out = work / f"{name.replace('/', '_')}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", "--preset", preset, "--build", str(build),
               "--run-dir", str(work / name.replace("/", "_")), "--worker-out", str(worker_out), "--device",
               args.device, "--steps", str(args.steps), "--batch-size", str(batch), "--num-workers",
               str(args.num_workers), "--max-seconds", str(args.max_seconds), "--compile", mode]
        cmd += ["--gpu-decode"] if gpu_decode else []
        if args.vit_b_text:
            cmd += ["--vit-b-text", args.vit_b_text]
        print("[bench_gpu] " + " ".join(cmd), flush=True)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, check=False, timeout=args.max_seconds + 240)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        results["presets"][name] = (json.loads(worker_out.read_text()) if code == 0 and worker_out.exists()
                                    else {"failed": f"torchrun exited with {code}"})
        print(json.dumps(results["presets"][name], indent=1), flush=True)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(results, indent=1))
    results["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all("failed" not in r for r in results["presets"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["vit_s", "vit_b"])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--nproc", type=int, default=0, help="ranks (default: all visible GPUs; 1 on CPU)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128, help=argparse.SUPPRESS)  # worker: this run's batch
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256], help="GLOBAL batches to run")
    p.add_argument("--compile-modes", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--gpu-decode-runs", action="store_true", default=True,
                   help="also one run per preset with the GPU-decode input path (default on)")
    p.add_argument("--no-gpu-decode-runs", dest="gpu_decode_runs", action="store_false")
    p.add_argument("--compile", choices=("off", "on"), default="off", help=argparse.SUPPRESS)
    p.add_argument("--gpu-decode", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    p.add_argument("--max-seconds", type=float, default=150.0, help="training time cap per preset")
    p.add_argument("--build-samples", type=int, default=1024)
    p.add_argument("--vit-b-text", help="local folder of bert-base-uncased for vit_b (default: bundled MiniLM)")
    p.add_argument("--out", default=None, help="default: a new results/gpu-<time>.json")
    p.add_argument("--count-flops-only", action="store_true",
                   help="on CPU: count the training FLOPs per image of each preset and stop (no timing)")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from benchmarks.common import default_output

    args.out = args.out or str(default_output("gpu"))
    if args.count_flops_only:
        return count_flops(args)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    sys.exit(main())
