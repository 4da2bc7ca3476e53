"""Whole build vs raw img2dataset, on the embedded sample served by the local image server.

(a) `curation.build.run_build` into a fresh folder: ingest, parse (spaCy), select, download (img2dataset in a
    subprocess), verify, dedup, index, reshard, manifest, report.
(b) the `img2dataset` command itself on the same selected URLs (the urls.parquet of (a)) with the same settings
    (processes, threads, image size, resize mode, shard size, timeout, proxy).
Repetitions alternate a, b, a, b, ... so drift on the noisy 2-core box hits both alike; medians and their ratio go to
benchmarks/results/build-sample-<time>.json. Target: ratio <= 1.10 (the curation around the download costs at most 10 %).

`--mode fast` (results/build-fast-<time>.json) measures the guarded download itself: >= 10,000 distinct JPEGs (320x240,
rendered once) served by a fast local server in its own process, no slow or failing URLs. Each repetition runs the
pair (a) and (b) back to back, in alternating order (a,b / b,a / ...), and the result is the median of the paired
ratios a/b with their spread, for the whole build and for the download stage alone; the stages after the download
are reported as seconds per 1,000 written images. The build allows 127.0.0.1/32 (download.allowed_networks), as an
operator would open an internal mirror.

Both sides are timed as whole processes (interpreter start and imports included): the build runs as a child
process (`--child-build`), img2dataset as its CLI. Two raw baselines: img2dataset from the project's venv (which
holds CUDA torch, which img2dataset imports through webdataset), and img2dataset from its own minimal venv
(`benchmarks/.venvs/img2dataset-<pinned>`: `python -m venv` + `pip install img2dataset==<pinned>` and its
dependencies, no torch; made by `--make-raw-venv`). Each repetition runs the three in rotating order; both ratios
are reported (`ratio_build_vs_raw` against the project venv, `ratio_build_vs_raw_minimal_venv`).

    .venv/bin/python benchmarks/bench_build.py [--rows 4000] [--repeats 3]
    .venv/bin/python benchmarks/bench_build.py --mode fast --images 10000 --repeats 3
    .venv/bin/python benchmarks/bench_build.py --make-raw-venv     # once: the minimal img2dataset venv
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmarks.common import default_output, stamp
from curation.build import run_build
from curation.config import BuildConfig
from curation.download import DownloadConfig
from curation.io import write_bytes_atomic
from curation.sample import SampleImageServer, make_sample
from curation.verify import VerifyConfig
from manifests.layout import BuildLayout
from manifests.stages import STAGE_NAMES

AFTER_DOWNLOAD = STAGE_NAMES[STAGE_NAMES.index("download") + 1:]  # the stages of the plan after the download


SUPPORTED_IMG2DATASET = "1.47.0"  # curation.download_worker.SUPPORTED_IMG2DATASET (not imported: it loads img2dataset)
RAW_VENV = REPO / "benchmarks" / ".venvs" / f"img2dataset-{SUPPORTED_IMG2DATASET}"


def make_raw_venv(venv: Path = RAW_VENV) -> Path:
    """A minimal venv with img2dataset (pinned) and its dependencies only, from the package registry."""
    if not (venv / "bin" / "img2dataset").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={SUPPORTED_IMG2DATASET}"],
                       check=True)
    torch = subprocess.run([str(venv / "bin" / "python"), "-c", ("import importlib.util as u; "
                            "print(u.find_spec('torch') is not None)")], capture_output=True, text=True, check=True)
    print(f"{venv}: img2dataset {SUPPORTED_IMG2DATASET}, torch installed: {torch.stdout.strip()}")
    return venv


def raw_img2dataset(urls: Path, out: Path, dl: DownloadConfig, venv: Path | None = None) -> float:
    """The img2dataset CLI, as a user would run it, with the build's download settings (from the project's venv, or
    from `venv`)."""
    exe = venv / "bin" / "img2dataset" if venv else Path(sys.executable).with_name("img2dataset")
    cmd = [
        str(exe), "--url_list", str(urls), "--output_folder", str(out),
        "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
        "--save_additional_columns", "[sample_id]", "--output_format", "webdataset", "--enable_wandb", "False",
        "--image_size", str(dl.image_size), "--resize_mode", dl.resize_mode,
        "--processes_count", str(dl.processes_count), "--thread_count", str(dl.thread_count),
        "--timeout", str(dl.timeout), "--retries", str(dl.retries),
        "--number_sample_per_shard", str(dl.number_sample_per_shard), "--encode_quality", str(dl.encode_quality),
        "--distributor", dl.distributor,
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "http_proxy": dl.http_proxy or "",
           "HTTP_PROXY": dl.http_proxy or ""}
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("sample", "fast"), default="sample")
    parser.add_argument("--images", type=int, default=10_000, help="fast mode: distinct images served")
    parser.add_argument("--serve-images", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=4000, help="sample rows (the bundled file has 4000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="default: a new results/build-sample-<time>.json (build-fast-… with --mode fast)")
    parser.add_argument("--make-raw-venv", action="store_true", help="make the minimal img2dataset venv and stop")
    parser.add_argument("--raw-venv", type=Path, default=RAW_VENV, help="fast mode: the minimal img2dataset venv")
    parser.add_argument("--child-build", nargs=3, metavar=("SOURCE", "BUILD_DIR", "OUT_JSON"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_raw_venv:
        make_raw_venv(args.raw_venv)
        return 0
    if args.child_build:
        return child_build(*args.child_build)
    if args.serve_images:
        return serve_images(args.serve_images, args.port_file)
    if args.mode == "fast":
        return fast_main(args)

    work = args.work or Path(tempfile.mkdtemp(prefix="cc4m-bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sample = make_sample(work / "sample", n_rows=args.rows)
    sample_seconds = time.perf_counter() - t0
    builds, raws, details = [], [], []
    # Slow-failure rows wait out the timeout in both variants alike; 2 s keeps that short.
    with SampleImageServer(sample.root, slow_seconds=3.0) as server:
        dl = DownloadConfig(image_size=args.image_size, processes_count=args.processes, thread_count=args.threads,
                            timeout=2, number_sample_per_shard=1000, http_proxy=server.proxy_url)
        for rep in range(args.repeats):
            build_dir = work / f"build-{rep}"
            shutil.rmtree(build_dir, ignore_errors=True)
            cfg = BuildConfig(source=str(sample.source_tsv), build_dir=str(build_dir), download=dl,
                              verify=VerifyConfig(min_success_rate=0.5))
            results: dict = {}
            start = time.perf_counter()
            manifest = run_build(cfg, results=results)
            builds.append(time.perf_counter() - start)
            counts = json.loads(manifest.read_text())["counts"]

            raw_dir = work / f"raw-{rep}"
            shutil.rmtree(raw_dir, ignore_errors=True)
            urls = work / "urls.parquet"
            shutil.copyfile(BuildLayout(build_dir).staging_dir / "urls.parquet", urls)
            raws.append(raw_img2dataset(urls, raw_dir, dl))
            details.append({"build_s": round(builds[-1], 3), "raw_img2dataset_s": round(raws[-1], 3),
                            "stage_seconds": results["seconds"], "selected": counts["select"]["selected"],
                            "success": counts["download"]["success"], "written": counts["reshard"]["written"]})
            print(f"rep {rep}: build {builds[-1]:.2f}s  raw img2dataset {raws[-1]:.2f}s  stages {results['seconds']}")
            shutil.rmtree(build_dir, ignore_errors=True)
            shutil.rmtree(raw_dir, ignore_errors=True)

    median_build, median_raw = statistics.median(builds), statistics.median(raws)
    result = {
        "benchmark": "build_vs_raw_img2dataset",
        "what": "(a) run_build on the embedded sample, fresh folder, all stages; (b) img2dataset CLI on the same "
                "selected URLs with the same settings; alternating repetitions, medians",
        "rows": args.rows, "repeats": args.repeats,
        "settings": {"processes_count": args.processes, "thread_count": args.threads, "image_size": args.image_size,
                     "resize_mode": dl.resize_mode, "number_sample_per_shard": dl.number_sample_per_shard,
                     "timeout": dl.timeout},
        "median_build_s": round(median_build, 3), "median_raw_img2dataset_s": round(median_raw, 3),
        "ratio": round(median_build / median_raw, 3), "target_ratio": 1.10,
        "meets_target": median_build / median_raw <= 1.10,
        "runs": details, "sample_render_s": round(sample_seconds, 3),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **stamp(),
    }
    out = args.out or default_output("build-sample")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_build_s", "median_raw_img2dataset_s", "ratio", "meets_target")}))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------------------------------ fast mode
def render_images(folder: Path, n: int) -> None:
    """n distinct 320x240 JPEGs (random shapes and colours per image), rendered once and reused."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"{i}.jpg"
        if path.exists():
            continue
        rng = random.Random(i)
        img = Image.new("RGB", (320, 240), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x, y = rng.randrange(300), rng.randrange(220)
            box = (x, y, x + rng.randrange(20, 160), y + rng.randrange(20, 120))
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        write_bytes_atomic(path, buf.getvalue())  # an interrupted render must not leave a partial image behind


def serve_images(folder: Path, port_file: Path) -> int:
    """The fast server (own process): GET /img/<i>.jpg from memory, until SIGTERM."""
    import signal
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    images = {f"/img/{p.name}": p.read_bytes() for p in folder.glob("*.jpg")}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    port_file.write_text(str(server.server_address[1]))
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    server.server_close()
    return 0


def fast_main(args: argparse.Namespace) -> int:
    from manifests.vocabulary import load_vocabulary

    stamped = stamp()  # at the start: the code this process imported, not what the tree holds at the end
    work = args.work or Path(tempfile.mkdtemp(prefix="cc4m-bench-fast-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    render_images(work / "images", args.images)
    render_s = time.perf_counter() - t0
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve-images", str(work / "images"), "--port-file",
                               str(port_file)])
    try:
        while not port_file.exists():
            if server.poll() is not None:
                raise RuntimeError("image server died")
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port_file.read_text().strip()}"
        words = [w for w in load_vocabulary().surface_words if w.isalpha()][:40]
        source = work / "source.tsv"
        source.write_text("".join(f"{base}/img/{i}.jpg\ta {words[i % len(words)]} in picture number {i}\n"
                                  for i in range(args.images)))
        dl = DownloadConfig(image_size=args.image_size, processes_count=args.processes, thread_count=args.threads,
                            timeout=10, number_sample_per_shard=1000, allowed_networks=("127.0.0.1/32",))
        minimal = args.raw_venv if (args.raw_venv / "bin" / "img2dataset").exists() else None
        if minimal is None:
            print(f"no minimal img2dataset venv at {args.raw_venv} (--make-raw-venv): that baseline is skipped")
        pairs = [_fast_repetition(rep, work, source, dl, minimal) for rep in range(args.repeats)]
    finally:
        server.terminate()
        server.wait(timeout=30)

    def summary(key: str) -> dict:
        values = sorted(p[key] for p in pairs)
        return {"median": round(statistics.median(values), 4), "min": values[0], "max": values[-1],
                "all": [p[key] for p in pairs]}

    after = [sum(p["stage_seconds"][s] for s in AFTER_DOWNLOAD) / p["written"] * 1000 for p in pairs]
    result = {
        "benchmark": "build_vs_raw_img2dataset_fast_local",
        "what": "(a) run_build (guarded fetch, caps, imaging decoder, all stages) and (b) the img2dataset CLI on the "
                "same selected URLs and settings, from a fast local server of distinct 320x240 JPEGs; pairs run back "
                "to back in alternating order; ratios a/b per pair, median and spread",
        "images": args.images, "repeats": args.repeats,
        "settings": {"processes_count": args.processes, "thread_count": args.threads, "image_size": args.image_size,
                     "resize_mode": dl.resize_mode, "number_sample_per_shard": dl.number_sample_per_shard,
                     "timeout": dl.timeout},
        "timing": "whole processes: the build as a child process, img2dataset as its CLI",
        "ratio_build_vs_raw": summary("ratio_build"), "ratio_download_stage_vs_raw": summary("ratio_download_stage"),
        "raw_minimal_venv": str(minimal) if minimal else None,
        **({"ratio_build_vs_raw_minimal_venv": summary("ratio_build_minimal"),
            "ratio_download_stage_vs_raw_minimal_venv": summary("ratio_download_stage_minimal")} if minimal else {}),
        "target_ratio": 1.10,
        "meets_target": statistics.median(p["ratio_build"] for p in pairs) <= 1.10,
        "after_download_s_per_1000_images": {"median": round(statistics.median(after), 3),
                                             "all": [round(a, 3) for a in after], "stages": list(AFTER_DOWNLOAD)},
        "pairs": pairs, "render_s": round(render_s, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_end": os.getloadavg()},
        **stamped,
    }
    out = args.out or default_output("build-fast")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("ratio_build_vs_raw", "ratio_download_stage_vs_raw",
                                                 "ratio_build_vs_raw_minimal_venv", "after_download_s_per_1000_images",
                                                 "meets_target")}))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _fast_repetition(rep: int, work: Path, source: Path, dl: DownloadConfig, minimal: Path | None) -> dict:
    """One repetition: the build and the raw baselines, in an order rotated by `rep`."""
    variants = ["build", "raw", *(["raw_minimal"] if minimal else [])]
    order = variants[rep % len(variants):] + variants[:rep % len(variants)]
    pair: dict = {"order": order}
    for variant in order:
        if variant == "build":
            pair.update(_fast_build(work, source, dl))
            continue
        urls = work / "urls.parquet"
        if not urls.exists():  # the raw runs need the build's selected URLs: make them once
            _fast_build(work, source, dl)
        raw_dir = work / "raw"
        shutil.rmtree(raw_dir, ignore_errors=True)
        venv = minimal if variant == "raw_minimal" else None
        pair[f"{variant}_img2dataset_s"] = round(raw_img2dataset(urls, raw_dir, dl, venv), 3)
        shutil.rmtree(raw_dir, ignore_errors=True)
    for suffix, key in (("", "raw_img2dataset_s"), ("_minimal", "raw_minimal_img2dataset_s")):
        if key in pair:
            pair[f"ratio_build{suffix}"] = round(pair["build_s"] / pair[key], 4)
            pair[f"ratio_download_stage{suffix}"] = round(pair["stage_seconds"]["download"] / pair[key], 4)
    print(json.dumps({k: v for k, v in pair.items() if k != "stage_seconds"}), flush=True)
    return pair


def child_build(source: str, build_dir: str, out_json: str) -> int:
    """`--child-build`: one whole build in this (fresh) process; its stage seconds and counts to out_json. The
    download settings come from CC4M_BENCH_DOWNLOAD (JSON)."""
    dl = DownloadConfig(**json.loads(os.environ["CC4M_BENCH_DOWNLOAD"]))
    cfg = BuildConfig(source=source, build_dir=build_dir, download=dl, verify=VerifyConfig(min_success_rate=0.99))
    results: dict = {}
    manifest = run_build(cfg, results=results)
    counts = json.loads(manifest.read_text())["counts"]
    Path(out_json).write_text(json.dumps({
        "stage_seconds": results["seconds"], "selected": counts["select"]["selected"],
        "success": counts["download"]["success"], "written": counts["reshard"]["written"]}))
    return 0


def _fast_build(work: Path, source: Path, dl: DownloadConfig) -> dict:
    """The whole build as a process of its own, timed from its start to its exit."""
    build_dir = work / "build"
    shutil.rmtree(build_dir, ignore_errors=True)
    out_json = work / "child-build.json"
    env = {**os.environ, "CC4M_BENCH_DOWNLOAD": json.dumps(dl.to_dict())}
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child-build", str(source), str(build_dir), str(out_json)], env=env,
                   check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    shutil.copyfile(BuildLayout(build_dir).staging_dir / "urls.parquet", work / "urls.parquet")
    shutil.rmtree(build_dir, ignore_errors=True)
    return {"build_s": round(seconds, 3), **json.loads(out_json.read_text())}


if __name__ == "__main__":  # img2dataset's spawn pool needs the guard (the build runs it in a subprocess anyway)
    sys.exit(main())
