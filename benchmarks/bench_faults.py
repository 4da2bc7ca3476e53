"""Crash safety, shown: SIGKILL a build at the worst moments, rerun it to completion, and compare it byte for byte
with a clean build of the same sample.

Each trial starts a build in a child process laid out like `cc4m build --sample` (the sample's image proxy runs in
the build's own process, img2dataset in a subprocess of it) in a fresh session, then kills it one of three ways:

- failpoint: CC4M_FAILPOINT_WRITE=N makes the build SIGKILL itself half-way through its N-th atomic write
  (manifests.fileio); N is spread over every stage's writes, as a clean run logged them;
- group: SIGKILL to the whole process group at a random moment (a node going away);
- main: SIGKILL to the main process only at a random moment (what the kernel's OOM killer does); children live on.

Then it reruns the same build (same folder, same settings, a new proxy port) until it finishes, and compares the
shards, meta, index, kept/duplicates and the manifest (which is byte-reproducible) with the clean build. It also
records processes of the killed build still alive after the kill (orphans) and whether the rerun needed more than
one attempt. Every trial must show its kill happened (the build ended with -9, or the failpoint's half-written
temporary is there); a trial whose build finished or failed before the kill fails the benchmark. Each trial records
the stage running at the kill: the failpoint's stage, or for a timed kill the stage of the last write the killed
build completed (its CC4M_WRITE_LOG) and that write. Results: benchmarks/results/faults-<time>.json.

    .venv/bin/python benchmarks/bench_faults.py [--trials 21] [--rows 300] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmarks.common import default_output
from manifests.fileio import FAILPOINT_ENV, WRITE_LOG_ENV, write_json_atomic
from manifests.layout import BuildLayout
from manifests.version import code_version

STAGE_OF_PATH = (  # first match wins: which stage wrote a file, by its place in the build folder
    ("ingest/", "ingest"), ("rejects/", "ingest"), ("captions/", "parse"), ("selected/", "select"),
    ("staging/", "download"), ("downloads.parquet", "download"), ("duplicates.parquet", "dedup"),
    ("kept.parquet", "dedup"), ("index/locator", "reshard"), ("index/", "index"), ("shards/", "reshard"),
    ("meta/", "reshard"), ("manifest.json", "manifest"), ("run.json", "manifest"), ("report/", "report"),
    ("config.json", "prepare"),
)


def make_small_sample(sample_dir: Path | str, rows: int):
    from curation.sample.make import make_sample

    return make_sample(sample_dir, n_rows=rows, image_size=64, eval_images=1, eval_selection_images=0)


def child_main(sample_dir: str, out: str) -> int:
    """One build of the sample, as `cc4m build --sample` runs it (proxy in this process)."""
    from curation.build import run_build
    from curation.config import BuildConfig
    from curation.sample import SampleImageServer

    rows = json.loads((Path(sample_dir) / "sample.json").read_text())["n_rows"]  # as the parent rendered it
    info = make_small_sample(sample_dir, rows)  # already rendered by the parent: returns at once
    with SampleImageServer(info.root, slow_seconds=1.0) as server:
        server.start()
        cfg = BuildConfig.from_dict({
            "source": str(info.source_tsv), "build_dir": out,
            "download": {"image_size": 64, "thread_count": 16, "timeout": 3, "number_sample_per_shard": 40,
                         "http_proxy": server.proxy_url},
            "shard": {"samples_per_shard": 32},
        })
        run_build(cfg)
    return 0


def _child_cmd(sample_dir: Path, out: Path) -> list[str]:
    # The sample's size is not passed: make_small_sample finds the one the parent rendered (its info file).
    return [sys.executable, str(Path(__file__).resolve()), "--child", str(sample_dir), str(out)]


def _run_child(sample_dir: Path, out: Path, env: dict[str, str], timeout: float) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run(_child_cmd(sample_dir, out), env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, start_new_session=True, check=False)
    return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr)[-1500:]


def _stage_of(path: str, build: Path) -> str:
    rel = Path(path).relative_to(build).as_posix() if path.startswith(str(build)) else path
    return next((stage for prefix, stage in STAGE_OF_PATH if rel.startswith(prefix)), "other")


def snapshot(build: Path) -> dict[str, bytes]:
    layout = BuildLayout(build)
    files = [*layout.shards(), *layout.parts(layout.meta_dir), layout.locator, layout.partners, layout.entity_index,
             layout.cooccurrence, layout.kept, layout.duplicates, layout.manifest]
    return {p.relative_to(build).as_posix(): p.read_bytes() for p in files if p.exists()}


def _group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies, dead but not yet reaped, are not counted)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,pgid=,stat="], capture_output=True, text=True, check=False).stdout
    rows = (line.split() for line in out.splitlines())
    return [int(pid) for pid, group, stat in rows if int(group) == pgid and not stat.startswith("Z")]


def _failpoint_fired(out: Path, target: str) -> bool:
    """The failpoint's write was cut half-way: its temporary (curation.io's `.<name>.*.tmp`) is left next to it."""
    final = out / target
    return any(final.parent.glob(f".{final.name}.*.tmp"))


def _stage_at_kill(out: Path, write_log: Path) -> dict[str, Any]:
    """The stage of the last write the killed build completed (the one it was in, or the one before it)."""
    writes = write_log.read_text().splitlines() if write_log.exists() else []
    if not writes:
        return {"stage": "prepare", "last_write": None, "writes_before_kill": 0}
    return {"stage": _stage_of(writes[-1], out), "last_write": Path(writes[-1]).relative_to(out).as_posix()
            if writes[-1].startswith(str(out)) else writes[-1], "writes_before_kill": len(writes)}


def _kill_at(sample_dir: Path, out: Path, env: dict[str, str], mode: str, at_s: float | None) -> dict[str, Any]:
    """Start the build, kill it as `mode` says, and report how it ended and what outlived it."""
    proc = subprocess.Popen(_child_cmd(sample_dir, out), env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pgid = proc.pid
    if at_s is not None:
        try:
            proc.wait(timeout=at_s)
        except subprocess.TimeoutExpired:
            if mode == "group":
                os.killpg(pgid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=600)
    time.sleep(1.0)  # let orphans show themselves
    orphans = _group_members(pgid)
    # Orphans are part of what we measure; then they are stopped, so the rerun meets the folder as a user would
    # after killing the whole job (a stuck orphan would otherwise write into the rerun's folder forever).
    orphans_alive_s = 0.0
    if orphans:
        deadline = time.monotonic() + 120
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        orphans_alive_s = round(120 - max(0.0, deadline - time.monotonic()), 1)
        for pid in _group_members(pgid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return {"killed_rc": rc, "orphans_after_kill": len(orphans), "orphans_alive_s": orphans_alive_s}


def _failpoint_write(k: int, writes: list[str], build: Path) -> int:
    """The k-th failpoint: stages in turn (in the order they write), and within a stage first its middle write,
    then its first, then its last."""
    stages = list(dict.fromkeys(_stage_of(w, build) for w in writes))
    stage = stages[k % len(stages)]
    positions = [j for j, w in enumerate(writes) if _stage_of(w, build) == stage]
    pick = (len(positions) // 2, 0, len(positions) - 1)[(k // len(stages)) % 3]
    return positions[pick] + 1


def _trial(i: int, mode: str, sample_dir: Path, work: Path, reference: dict[str, bytes], clean_s: float,
           writes: list[str], clean_build: Path, rng: random.Random) -> dict[str, Any]:
    out = work / f"trial-{i:02d}"
    env = {**os.environ}
    record: dict[str, Any] = {"trial": i, "mode": mode}
    if mode == "failpoint":
        n = _failpoint_write(i // 3, writes, clean_build)
        env[FAILPOINT_ENV] = str(n)
        target = Path(writes[n - 1]).relative_to(clean_build).as_posix()
        record.update(write=n, of_writes=len(writes), stage=_stage_of(writes[n - 1], clean_build), target=target)
        record.update(_kill_at(sample_dir, out, env, mode, at_s=None))
        record["killed"] = record["killed_rc"] == -signal.SIGKILL or _failpoint_fired(out, target)
    else:
        at = round(rng.uniform(0.05, 0.95) * clean_s, 2)
        env[WRITE_LOG_ENV] = str(work / f"trial-{i:02d}.writes.log")
        record.update(at_s=at, of_s=round(clean_s, 1))
        record.update(_kill_at(sample_dir, out, env, mode, at_s=at))
        record["killed"] = record["killed_rc"] == -signal.SIGKILL
        record.update(_stage_at_kill(out, Path(env[WRITE_LOG_ENV])))
    reruns = []
    for _ in range(3):  # a correct build needs one rerun; more say the folder was left in a bad state
        rc, seconds, tail = _run_child(sample_dir, out, dict(os.environ), timeout=900)
        reruns.append({"rc": rc, "seconds": round(seconds, 1), **({"tail": tail} if rc else {})})
        if rc == 0:
            break
    record["reruns"] = reruns
    if reruns[-1]["rc"] == 0:
        got = snapshot(out)
        differing = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
        record.update(identical=not differing, differing=differing[:20])
    else:
        record.update(identical=False, differing=["<rerun never finished>"])
        print(f"trial {i}: the rerun failed:\n{reruns[-1].get('tail', '')}", flush=True)
    if record["identical"]:
        shutil.rmtree(out, ignore_errors=True)
    else:
        record["kept_for_diagnosis"] = str(out)  # the folder as the rerun left it
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("SAMPLE_DIR", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--trials", type=int, default=21)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="default: a new results/faults-<time>.json")
    args = parser.parse_args()
    args.out = args.out or str(default_output("faults"))
    if args.child:
        return child_main(*args.child)

    work = Path(args.work or tempfile.mkdtemp(prefix="cc4m-faults-"))
    sample_dir = work / "sample"
    make_small_sample(sample_dir, args.rows)
    clean = work / "clean"
    log = work / "writes.log"
    rc, clean_s, tail = _run_child(sample_dir, clean, {**os.environ, WRITE_LOG_ENV: str(log)}, timeout=900)
    if rc != 0:
        raise SystemExit(f"the clean build failed:\n{tail}")
    writes = log.read_text().splitlines()
    reference = snapshot(clean)
    rng = random.Random(args.seed)
    modes = ("failpoint", "group", "main")
    trials = []
    for i in range(args.trials):
        trials.append(_trial(i, modes[i % 3], sample_dir, work, reference, clean_s, writes, clean, rng))
        t = trials[-1]
        print(f"trial {i:2d} {t['mode']:9s} {t['stage']!s:10s} killed={t['killed']} orphans={t['orphans_after_kill']} "
              f"reruns={len(t['reruns'])} identical={t['identical']} {t['differing'][:3]}", flush=True)
    by_mode = {m: {"trials": sum(t["mode"] == m for t in trials),
                   "identical": sum(t["mode"] == m and t["identical"] for t in trials)} for m in modes}
    result = {
        "benchmark": "faults", "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": args.rows, "clean_build_s": round(clean_s, 1), "writes_in_clean_build": len(writes),
        "stages_hit_by_failpoints": sorted({t["stage"] for t in trials if t["mode"] == "failpoint"}),
        "trials": len(trials), "identical": sum(t["identical"] for t in trials), "by_mode": by_mode,
        "killed": sum(t["killed"] for t in trials), "not_killed": [t["trial"] for t in trials if not t["killed"]],
        "stages_at_kill": dict(sorted(Counter(t["stage"] for t in trials).items())),
        "rerun_attempts_over_1": sum(len(t["reruns"]) > 1 for t in trials),
        "trials_with_orphans": sum(t["orphans_after_kill"] > 0 for t in trials),
        "details": trials,
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))
    passed = result["identical"] == result["trials"] == result["killed"]
    if passed:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"FAILED: {result['trials'] - result['killed']} trial(s) whose kill did not happen "
              f"{result['not_killed']}, {result['trials'] - result['identical']} not identical", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
