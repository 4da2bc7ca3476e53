"""Benchmark: curation.index.build_index on a synthetic CC4M-sized kept.parquet.

4M samples, 1-4 classes each, class frequencies Zipf-like over the 73 vocabulary classes. The index build runs in a
fresh subprocess so its wall time and peak RSS (getrusage max RSS) are its own, not the generator's.
Targets: <= 60 s and < 4 GB peak RSS on the 2-core CI machine. Writes benchmarks/results/index-<time>.json.

    .venv/bin/python benchmarks/bench_index.py [--samples 4000000] [--k 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import write_result
from manifests.layout import BuildLayout
from manifests.vocabulary import load_vocabulary

TARGET_SECONDS = 60.0
TARGET_RSS_BYTES = 4 * 1024**3

CHILD = """
import json, resource, sys, time
from curation.index import IndexConfig, build_index
start = time.perf_counter()
counts = build_index(sys.argv[1], IndexConfig(partners_per_sample=int(sys.argv[2]), seed=0))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "counts": counts}))
"""


def synthetic_kept(path: Path, n: int, seed: int = 0, zipf_s: float = 1.1) -> dict:
    classes = np.array(load_vocabulary().classes)
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(classes) + 1) ** zipf_s
    p /= p.sum()
    per_sample = rng.choice([1, 2, 3, 4], size=n, p=[0.45, 0.3, 0.17, 0.08])
    rows = np.repeat(np.arange(n, dtype=np.int64), per_sample)
    codes = rng.choice(len(classes), size=len(rows), p=p)
    key = np.unique(rows * len(classes) + codes)  # sorted unique classes per sample (draws can repeat)
    rows, codes = key // len(classes), key % len(classes)
    # ids with gaps, like real sample ids after selection and failed downloads
    sample_ids = np.cumsum(rng.integers(1, 4, size=n)).astype(np.int64)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    # kept.parquet holds each sample's classes sorted by NAME, which is not the vocabulary order of the codes
    name_rank = np.argsort(np.argsort(classes))
    order = np.lexsort((name_rank[codes], rows))
    names = pa.DictionaryArray.from_arrays(pa.array(codes[order].astype(np.int32)), pa.array(classes.tolist()))
    entities = pa.ListArray.from_arrays(pa.array(offsets), names.cast(pa.string()))
    pq.write_table(pa.table({"sample_id": sample_ids, "entities": entities}), path)
    return {"samples": n, "sample_class_entries": len(rows), "zipf_s": zipf_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4_000_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="default: a new results/index-<time>.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        build = Path(tmp)
        t0 = time.perf_counter()
        data = synthetic_kept(BuildLayout(build).kept, args.samples)
        generate_seconds = time.perf_counter() - t0
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(build), str(args.k)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        sizes = {p.name: p.stat().st_size for p in BuildLayout(build).index_dir.glob("*.parquet")}
    result = {
        "benchmark": "curation.index.build_index",
        "data": data,
        "partners_per_sample": args.k,
        "generate_seconds": round(generate_seconds, 2),
        "build_seconds": round(child["seconds"], 2),
        "max_rss_bytes": child["max_rss_bytes"],
        "max_rss_gib": round(child["max_rss_bytes"] / 1024**3, 3),
        "output_bytes": sizes,
        "counts": child["counts"],
        "targets": {"seconds": TARGET_SECONDS, "max_rss_bytes": TARGET_RSS_BYTES},
        "meets_targets": child["seconds"] <= TARGET_SECONDS and child["max_rss_bytes"] < TARGET_RSS_BYTES,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
        },
    }
    write_result("index", result, args.out)
    print(json.dumps(result, indent=2))
    return 0 if result["meets_targets"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
