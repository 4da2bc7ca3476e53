"""The selection sweep's cost: this tree against a baseline commit, whole processes, paired and alternated.

The sample's evaluation chooses its settings on the selection split among 288 candidates (bg_thresh x top-k x
assignment x test scale x PAMR or not, `ovseg_core.evaluation.selection.SAMPLE_CANDIDATES`). Each side runs
`select_eval_settings` on the same checkpoint and images in its own process, with its own code (the baseline from a
git worktree of `--baseline`), one thread; the pairs alternate which side goes first. Reported: the sweep's seconds
(inside the process, after loading) and the whole process's, the paired ratios baseline / this tree (median, min,
max), and whether both sides scored every candidate identically (the change must not move a prediction).

    python benchmarks/bench_selection_sweep.py --checkpoint RUN/stage1/checkpoints/last.pt --eval-root SAMPLE/eval \\
        --baseline 4827f78 --max-images 20 --pairs 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import paired_summary, write_result

CHILD = """
import hashlib, json, sys, time, torch
torch.set_num_threads(1)
import ovseg_core
from ovseg_core.evaluation.datasets import load_dataset
from ovseg_core.evaluation.selection import SAMPLE_CANDIDATES, select_eval_settings
from ovseg_core.models.checkpoint import load_model_from_checkpoint
model = load_model_from_checkpoint(sys.argv[1]).eval()
selection = load_dataset("sample", sys.argv[2], split="train")
started = time.perf_counter()
out = select_eval_settings(model, selection, SAMPLE_CANDIDATES, max_images=int(sys.argv[3]))
seconds = time.perf_counter() - started
scores = json.dumps([[s["mIoU"], s["pixel_acc"]] for s in out["scores"]])
print(json.dumps({"sweep_s": seconds, "n_candidates": out["n_candidates"], "chosen": out["chosen_candidate"],
                  "scores_sha256": hashlib.sha256(scores.encode()).hexdigest(), "code": ovseg_core.__file__}))
"""


def run_side(tree: Path, args: argparse.Namespace) -> dict:
    """One whole process of the sweep with the code in `tree`; its own report plus the process's wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(args.checkpoint), str(args.eval_root),
                           str(args.max_images)], cwd=tree, env=env, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["code"].startswith(str(tree)):
        raise RuntimeError(f"the side for {tree} imported {report['code']}: PYTHONPATH did not win")
    return {**report, "process_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--eval-root", type=Path, required=True, help="the sample's VOC-layout eval folder")
    parser.add_argument("--baseline", default="4827f78", help="git revision to compare with (before the memo)")
    parser.add_argument("--max-images", type=int, default=20, help="selection images per sweep")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.baseline], cwd=REPO, check=True)
        try:
            runs = {"baseline": [], "this_tree": []}
            for pair in range(args.pairs):
                order = [("baseline", base_tree), ("this_tree", REPO)]
                for name, tree in order if pair % 2 == 0 else order[::-1]:
                    runs[name].append(run_side(tree, args))
                    print(f"[sweep] pair {pair} {name}: {runs[name][-1]['sweep_s']:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)
    identical = len({r["scores_sha256"] for side in runs.values() for r in side}) == 1
    payload = {"baseline_revision": args.baseline, "checkpoint": str(args.checkpoint), "eval_root": str(args.eval_root),
               "max_images": args.max_images, "n_candidates": runs["this_tree"][0]["n_candidates"], "threads": 1,
               "sweep_ratio_baseline_over_this": paired_summary([r["sweep_s"] for r in runs["baseline"]],
                                                                [r["sweep_s"] for r in runs["this_tree"]]),
               "process_ratio_baseline_over_this": paired_summary([r["process_s"] for r in runs["baseline"]],
                                                                  [r["process_s"] for r in runs["this_tree"]]),
               "scores_identical": identical, "runs": runs}
    path = write_result("selection_sweep", payload, args.out)
    print(f"[sweep] baseline/this median {payload['sweep_ratio_baseline_over_this']['median_ratio']:.2f}x, "
          f"scores identical: {identical} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
