"""Where one GPU training step's time goes: a companion to bench_gpu.py when its MFU is low.

Synthetic batches already on the GPU (no loader), bf16 autocast, AdamW, the same forward_train as training. For each
preset and batch size it times forward, backward and optimizer separately (CUDA-synchronized) and the whole step
without intermediate synchronisation, so one can tell a GPU-bound step (time grows with the batch) from a
launch/CPU-bound one (time flat in the batch). Then torch.profiler lists the ops with the most GPU time and the CPU
time spent launching them, for one batch size.

    python3 benchmarks/profile_gpu_step.py # -> benchmarks/results/gpu-profile-<time>.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_batch(model: Any, batch: int, device: Any) -> dict[str, Any]:
    import torch

    captions = ["a photo of a dog on a sofa next to a cat and a bowl", "two people ride a bus past a red car"]
    tok = model.tokenize((captions * batch)[:batch], max_length=32)
    out = {"image": torch.randn(batch, 3, model.image_size, model.image_size), "input_ids": tok["input_ids"],
           "attention_mask": tok["attention_mask"], "question_ids": tok["input_ids"],
           "question_mask": tok["attention_mask"], "answer_ids": tok["input_ids"][:, :8],
           "answer_mask": tok["attention_mask"][:, :8], "has_entity": torch.ones(batch, dtype=torch.bool)}
    return {k: v.to(device) for k, v in out.items()}


def time_phases(model: Any, optimizer: Any, batch: dict[str, Any], steps: int) -> dict[str, float]:
    import torch

    phases: dict[str, list[float]] = {"forward_s": [], "backward_s": [], "optimizer_s": [], "step_s": []}
    for i in range(steps + steps):
        timed_phases = i < steps  # first half: synchronise between phases; second half: one sync per step
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.forward_train(batch, 1)["loss"]
        if timed_phases:
            _sync()
            t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if timed_phases:
            _sync()
            t2 = time.perf_counter()
        optimizer.step()
        _sync()
        t3 = time.perf_counter()
        if timed_phases:
            phases["forward_s"].append(t1 - t0)
            phases["backward_s"].append(t2 - t1)
            phases["optimizer_s"].append(t3 - t2)
        else:
            phases["step_s"].append(t3 - t0)
    return {k: statistics.median(v) for k, v in phases.items()}


def profile_ops(model: Any, optimizer: Any, batch: dict[str, Any], top: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.forward_train(batch, 1)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync()
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        rows.append({"op": e.key, "calls_per_step": e.count / 3, "gpu_ms_per_step": device_us / 3e3,
                     "cpu_ms_per_step": e.self_cpu_time_total / 3e3})
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 3
    by_gpu = sorted(rows, key=lambda r: -r["gpu_ms_per_step"])[:top]
    by_cpu = sorted(rows, key=lambda r: -r["cpu_ms_per_step"])[:top]
    return {"gpu_kernels_per_step": kernels, "by_gpu_time": by_gpu, "by_cpu_time": by_cpu}


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.common import stamp, write_result
    from ovseg_core import create_model
    from ovseg_core.config import MINILM_TEXT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["vit_s", "vit_b"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile-batch", type=int, default=128)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script, no meaningful numbers")
    p.add_argument("--out", default=None, help="default: a new results/gpu-profile-<time>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    result: dict[str, Any] = {**stamp(),
                              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "presets": {}}
    for preset in args.presets:
        model = create_model(preset, text_model=MINILM_TEXT_MODEL).to(device).train()
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        entry: dict[str, Any] = {"by_batch": {}}
        for b in args.batch_sizes:
            batch = synthetic_batch(model, b, device)
            time_phases(model, optimizer, batch, 3)  # warm-up (cuDNN/cuBLAS heuristics, allocator)
            phases = time_phases(model, optimizer, batch, args.steps)
            entry["by_batch"][str(b)] = {**phases, "images_per_s": b / phases["step_s"]}
            print(preset, b, json.dumps(entry["by_batch"][str(b)]), flush=True)
        entry["ops"] = profile_ops(model, optimizer, synthetic_batch(model, args.profile_batch, device), args.top)
        result["presets"][preset] = entry
        del model, optimizer
        torch.cuda.empty_cache()
    write_result("gpu-profile", result, args.out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
