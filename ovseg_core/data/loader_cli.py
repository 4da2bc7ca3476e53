"""`cc4m loader`: iterate the training input pipeline of one stage in this process, with no training, and print
what it costs per sample (what a user sizes DataLoader workers with).

The pipeline is the one `ovseg_core.train.loop.train` builds: CC4MTrainStream over the build's shards (shuffle
buffer, stage-2 partners), SampleProcessor (JPEG draft decode + the stage's augmentation, MEC text plans), batched
tokenization in the collate; with --gpu-decode the loader ships JPEG bytes and crop draws and the batch is decoded
by `decode_on_device` (on CUDA when available, else on this CPU: that time is reported apart, not in the loader's
CPU cost).

    cc4m loader --build DIR --stage 1 --samples 512 [--gpu-decode] --json
prints {"samples_per_s": ..., "cpu_s_per_sample": ..., ...}: samples per wall second and CPU seconds of this
process per sample, over the samples after the first batch (the shuffle buffer's first fill is set-up).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from ovseg_core.data.cc4m import BuildReader
from ovseg_core.data.device_decode import decode_on_device
from ovseg_core.data.loader import CC4MTrainStream, SampleProcessor, make_train_loader, trim_text_padding
from ovseg_core.data.transforms import AUGMENTATIONS, build_train_transform


def add_loader_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", required=True, help="build folder (shards/, meta/, index/)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--samples", type=int, default=512, help="samples timed (after the first batch)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="ship JPEG bytes; decode + crop on the device (CUDA if available, else reported apart)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a short line)")
    p.add_argument("--preset", default="tiny", help="model preset: its image size and tokenizer")
    p.add_argument("--augment", choices=AUGMENTATIONS,
                   help="default: the stage's (stage 1 deit, stage 2 light; light with --gpu-decode)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-text-len", type=int, default=77)
    p.add_argument("--shuffle-buffer", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses one)")
    p.add_argument("--seed", type=int, default=0)


def _tokenizer_and_size(preset: str) -> tuple[Any, int]:
    from transformers import AutoTokenizer

    from ovseg_core.models import get_model_config
    from ovseg_core.models.text import resolve_text_model

    cfg = get_model_config(preset)
    path = resolve_text_model(cfg.text_model)
    return AutoTokenizer.from_pretrained(path, local_files_only=True), int(cfg.image_size)


def default_augment(stage: int, gpu_decode: bool) -> str:
    return "light" if gpu_decode or stage == 2 else "deit"


def measure_loader(args: argparse.Namespace) -> dict[str, Any]:
    """Iterate args.samples samples (+ one warm-up batch) of the stage's pipeline; returns the cost summary."""
    if args.samples <= 0 or args.batch_size <= 0:
        raise ValueError("--samples and --batch-size must be positive")
    torch.set_num_threads(args.threads)
    augment = args.augment or default_augment(args.stage, args.gpu_decode)
    tokenizer, image_size = _tokenizer_and_size(args.preset)
    reader = BuildReader(args.build)
    processor = SampleProcessor(
        reader, tokenizer, args.max_text_len, build_train_transform(image_size, augment), stage=args.stage,
        partner_transform=build_train_transform(image_size, augment), batch_text=True,
        device_decode=args.gpu_decode)
    stream = CC4MTrainStream(reader, processor, seed=args.seed, shuffle_buffer=args.shuffle_buffer,
                             batch_size=args.batch_size)
    batches = iter(make_train_loader(stream, args.batch_size))
    device = torch.device("cuda" if args.gpu_decode and torch.cuda.is_available() else "cpu")
    next(batches)  # the shuffle buffer's first fill
    n, decode_s = 0, 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while n < args.samples:
        batch = trim_text_padding(next(batches))
        n += len(batch["sample_id"])
        if args.gpu_decode:  # the device's work: timed apart and taken out of the loader's CPU cost
            t, c = time.perf_counter(), time.process_time()
            decode_on_device(batch, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            decode_s += time.perf_counter() - t
            cpu0 += time.process_time() - c
    wall, cpu = time.perf_counter() - wall0 - decode_s, time.process_time() - cpu0
    return {"build": str(args.build), "stage": args.stage, "preset": args.preset, "image_size": image_size,
            "augment": augment, "gpu_decode": args.gpu_decode, "samples": n, "batch_size": args.batch_size,
            "samples_per_s": n / wall, "cpu_s_per_sample": cpu / n,
            "device_decode_s_per_sample": decode_s / n if args.gpu_decode else None,
            "device": str(device) if args.gpu_decode else None,
            "counters": {**stream.counters, **processor.counters}}


def cli_loader(args: argparse.Namespace) -> int:
    result = measure_loader(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"stage {result['stage']} ({result['augment']}{', gpu decode' if args.gpu_decode else ''}): "
              f"{result['samples_per_s']:.1f} samples/s, {1000 * result['cpu_s_per_sample']:.2f} CPU-ms/sample")
    return 0
