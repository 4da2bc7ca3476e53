"""Work per training step, eager vs compiled: kernels (dispatched ops) per step and step time against batch size.

One step = forward + losses + backward of `OVSegmentor.forward_train` (stage 1), on synthetic inputs, through
`ovseg_core.train.compiled.build_train_step` (compile "off" vs "on"). Counted with torch.profiler, the same rule
for both: every profiled event with no child event ("leaf") is one kernel launch: an aten op that ran its own
kernel in eager, an extern aten call (matmul, convolution, attention) or one fused inductor kernel in the compiled
step (inductor's CPU kernels are recorded with TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1, set below). View-only
ops (view, reshape of a contiguous tensor, transpose, ...) launch nothing and are counted apart. On CUDA the
count is the profiler's CUDA kernel events instead (what the GPU actually launched).

CPU here: the default is the `tiny` preset, fp32, 1 thread, which is slow in absolute terms; the ratios are the
point. Cold inductor compiles take minutes per batch size on a loaded 2-core box: `--compiled-batches` picks
which batch sizes also run compiled.

    .venv/bin/python benchmarks/bench_step.py [--batches 4 8 16 32] [--compiled-batches 8 16] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE", "1")  # before torch._inductor is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import write_result

VIEW_OPS = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::transpose", "aten::t", "aten::permute",
            "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::as_strided",
            "aten::alias", "aten::detach", "aten::lift_fresh", "aten::split", "aten::unbind", "aten::narrow",
            "aten::chunk", "aten::flatten", "aten::contiguous", "aten::expand_as", "aten::view_as",
            "aten::empty", "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::is_nonzero",
            "aten::item", "aten::_local_scalar_dense", "aten::result_type", "aten::to", "aten::_to_copy_noop"}


def synthetic_batch(model: Any, batch: int, text_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    captions = ["a photo of a dog on a sofa next to a cat and a bowl of fruit"] * batch
    tok = model.tokenizer(captions, padding="max_length", truncation=True, max_length=text_len, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    out = {"image": torch.randn(batch, 3, model.image_size, model.image_size, generator=g),
           "input_ids": ids, "attention_mask": mask, "question_ids": ids, "question_mask": mask,
           "answer_ids": ids[:, :16], "answer_mask": mask[:, :16],
           "has_entity": torch.arange(batch) % 4 != 3}
    return {k: v.to(device) for k, v in out.items()}


def one_step(model: Any, step: Any, batch: dict[str, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    step(batch, 1)["loss"].backward()


def count_kernels(model: Any, step: Any, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, int]:
    """Leaf profiler events of one (warm) step: kernel launches, and view-only ops apart (see module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        one_step(model, step, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        return {"kernels": len(kernels)}
    has_child = {id(e) for e in events if e.cpu_children}
    leaves = [e for e in events if id(e) not in has_child and e.device_type == torch.autograd.DeviceType.CPU]
    views = [e for e in leaves if e.name in VIEW_OPS]
    fused = [e for e in leaves if "cpp_fused" in e.name or e.name.startswith("graph_")]
    work = [e for e in leaves if e.name not in VIEW_OPS and (e.name.startswith("aten::") or e in fused)]
    return {"kernels": len(work), "fused_inductor_kernels": len(fused), "view_ops": len(views)}


def time_steps(model: Any, step: Any, batch: dict[str, torch.Tensor], reps: int,
               device: torch.device) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of `reps` steps (on a shared CPU box the CPU seconds are the robust number)."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        one_step(model, step, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ovseg_core import create_model
    from ovseg_core.train.compiled import build_train_step

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.preset).to(device).train()
    rows: list[dict[str, Any]] = []
    for batch_size in args.batches:
        batch = synthetic_batch(model, batch_size, args.text_len, device)
        modes = ["off", "on"] if batch_size in args.compiled_batches else ["off"]
        for mode in modes:
            step = build_train_step(model, mode, device)
            t0 = time.perf_counter()
            one_step(model, step, batch)  # compiles (mode on) and warms up
            one_step(model, step, batch)
            first_s = time.perf_counter() - t0
            counts = count_kernels(model, step, batch, device)
            times, cpu = time_steps(model, step, batch, args.reps, device)
            key = "step_s_median" if device.type == "cuda" else "step_cpu_s_median"
            row = {"batch": batch_size, "compile": mode, **counts, "step_s_median": statistics.median(times),
                   "step_cpu_s_median": statistics.median(cpu), "step_s": [round(t, 4) for t in times],
                   "step_cpu_s": [round(t, 4) for t in cpu], "first_two_steps_s": round(first_s, 1)}
            row["images_per_s"] = batch_size / row[key]
            rows.append(row)
            print(row, flush=True)
    return {"preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
            "text_len": args.text_len, "rows": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """compiled / eager kernels and step time, per batch size with both."""
    out = {}
    for r in rows:
        if r["compile"] != "on":
            continue
        eager = next(e for e in rows if e["batch"] == r["batch"] and e["compile"] == "off")
        out[str(r["batch"])] = {"kernels_compiled_over_eager": r["kernels"] / eager["kernels"],
                                "step_time_compiled_over_eager": r["step_s_median"] / eager["step_s_median"],
                                "step_cpu_compiled_over_eager": r["step_cpu_s_median"] / eager["step_cpu_s_median"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--compiled-batches", type=int, nargs="*", default=[8, 16])
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="default: benchmarks/results/step-<time>.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = write_result("step", {"args": vars(args), **run(args)}, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
