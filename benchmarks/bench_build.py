"""Whole build vs raw img2dataset, on the embedded sample served by the local image server.

(a) `curation.build.run_build` into a fresh folder: ingest, parse (spaCy), select, download (img2dataset in a
    subprocess), verify, dedup, index, reshard, manifest, report.
(b) the `img2dataset` command itself on the same selected URLs (the urls.parquet of (a)) with the same settings
    (processes, threads, image size, resize mode, shard size, timeout, proxy).
Repetitions alternate a, b, a, b, ... so drift on the noisy 2-core box hits both alike; medians and their ratio go to
benchmarks/results/build.json. Target: ratio <= 1.10 (the curation around the download costs at most 10 %).

    .venv/bin/python benchmarks/bench_build.py [--rows 4000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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

from curation.build import run_build
from curation.config import BuildConfig
from curation.download import DownloadConfig
from curation.sample import SampleImageServer, make_sample
from curation.verify import VerifyConfig
from manifests.version import code_version

RESULTS = REPO / "benchmarks" / "results" / "build.json"


def raw_img2dataset(urls: Path, out: Path, dl: DownloadConfig) -> float:
    """The img2dataset CLI, as a user would run it, with the build's download settings."""
    cmd = [
        str(Path(sys.executable).with_name("img2dataset")), "--url_list", str(urls), "--output_folder", str(out),
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
    parser.add_argument("--rows", type=int, default=4000, help="sample rows (the bundled file has 4000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

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
            shutil.copyfile(build_dir / "staging" / "urls.parquet", urls)
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
        "code_version": code_version(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_build_s", "median_raw_img2dataset_s", "ratio", "meets_target")}))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":  # img2dataset's spawn pool needs the guard (the build runs it in a subprocess anyway)
    sys.exit(main())
