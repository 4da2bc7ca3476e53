"""Cheap to check: rerunning a finished build, and a copy of it, against the build itself (issue 10, item 9).

One fresh `cc4m build` of >= 10,000 distinct images from a fast local server (benchmarks/bench_build.py's fast
mode: rendered 320x240 JPEGs, no failing URLs), timed as a whole process. Then, alternating which goes first:
  (r) `cc4m build` again into the same folder;
  (c) `cp -r` of the finished build to a new folder (not timed), then `cc4m build` into the copy.
Each is a whole process (imports included), as a user or the weekly flow runs it. Every rerun must leave every
file as it was (bytes and mtimes; the build lock's holder record aside): that is checked, not assumed. Result:
rerun seconds / build seconds per repetition, median and spread, against the target 0.03, with the rerun's own
per-stage seconds -> benchmarks/results/rerun-<time>.json.

    .venv/bin/python benchmarks/bench_rerun.py [--images 10000] [--repeats 3]
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

from benchmarks.bench_build import render_images
from benchmarks.common import stamp, write_result
from curation.lock import LOCK_NAME
from manifests.layout import BuildLayout
from manifests.vocabulary import load_vocabulary

TARGET = 0.03


def build_command(source: Path, out: Path, args: argparse.Namespace) -> list[str]:
    settings = {"download.allowed_networks": ["127.0.0.1/32"], "download.processes_count": args.processes,
                "download.thread_count": args.threads, "download.image_size": args.image_size,
                "download.timeout": 10, "verify.min_success_rate": 0.99}
    sets = [f"--set={k}={json.dumps(v)}" for k, v in settings.items()]
    return [sys.executable, "-m", "flows.cli", "build", "--source", str(source), "--out", str(out), *sets]


def timed_build(source: Path, out: Path, args: argparse.Namespace) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run(build_command(source, out, args), cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"cc4m build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("stage seconds: "))
    return seconds, json.loads(line.removeprefix("stage seconds: "))


def files_state(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, hash(p.read_bytes()))
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "bench_build.py"), "--serve-images",
                               str(work / "images"), "--port-file", str(port_file)])
    while not port_file.exists():
        if server.poll() is not None:
            raise RuntimeError("image server died")
        time.sleep(0.1)
    return server, f"http://127.0.0.1:{port_file.read_text().strip()}"


def rerun(kind: str, build: Path, work: Path, source: Path, rep: int, args: argparse.Namespace) -> dict:
    target = build
    if kind == "copy":
        target = work / f"copy-{rep}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(build, target)  # new mtimes, inodes and folder
    before = files_state(target)
    seconds, stages = timed_build(source, target, args)
    changed = sorted(k for k, v in files_state(target).items() if before.get(k) != v)
    missing = sorted(set(before) - set(files_state(target)))
    if kind == "copy":
        shutil.rmtree(target, ignore_errors=True)
    return {"seconds": round(seconds, 3), "stage_seconds": stages, "files_changed": changed + missing}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="default: a new results/rerun-<time>.json")
    args = p.parse_args(argv)
    stamped = stamp()  # at the start: the code this process imported
    work = args.work or Path(tempfile.mkdtemp(prefix="cc4m-bench-rerun-"))
    work.mkdir(parents=True, exist_ok=True)
    render_images(work / "images", args.images)
    server, base = start_server(work)
    try:
        words = [w for w in load_vocabulary().surface_words if w.isalpha()][:40]
        source = work / "source.tsv"
        source.write_text("".join(f"{base}/img/{i}.jpg\ta {words[i % len(words)]} in picture number {i}\n"
                                  for i in range(args.images)))
        build = work / "build"
        shutil.rmtree(build, ignore_errors=True)
        build_s, build_stages = timed_build(source, build, args)
        manifest = json.loads(BuildLayout(build).manifest.read_text())
        reps = []
        for rep in range(args.repeats):
            order = ("same", "copy") if rep % 2 == 0 else ("copy", "same")
            pair = {"order": list(order), **{k: rerun(k, build, work, source, rep, args) for k in order}}
            reps.append(pair)
            print(json.dumps({k: pair[k]["seconds"] for k in order}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def ratios(kind: str) -> dict:
        values = [r[kind]["seconds"] / build_s for r in reps]
        return {"median": round(statistics.median(values), 5), "min": round(min(values), 5),
                "max": round(max(values), 5), "all": [round(v, 5) for v in values]}

    result = {
        "benchmark": "rerun_of_a_finished_build",
        "what": "whole-process `cc4m build` of a finished build (same folder) and of a `cp -r` copy, over the fresh "
                "build's whole-process time; every rerun must change no file",
        "images": args.images, "written": manifest["counts"]["reshard"]["written"], "build_s": round(build_s, 3),
        "build_stage_seconds": build_stages, "target_ratio": TARGET,
        "ratio_rerun_same_folder": ratios("same"), "ratio_rerun_copy": ratios("copy"),
        "meets_target": max(ratios("same")["max"], ratios("copy")["max"]) <= TARGET,
        "no_file_changed": all(not r[k]["files_changed"] for r in reps for k in ("same", "copy")),
        "repetitions": reps,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_end": os.getloadavg()},
        **stamped,
    }
    write_result("rerun", result, args.out)
    print(json.dumps({k: result[k] for k in ("build_s", "ratio_rerun_same_folder", "ratio_rerun_copy",
                                             "meets_target", "no_file_changed")}))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
