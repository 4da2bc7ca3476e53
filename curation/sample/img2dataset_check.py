"""Download (part of) a rendered sample with img2dataset through the sample server: an end-to-end check.

    python -m curation.sample.img2dataset_check --sample DIR --out DIR [--rows N] [--timeout 2] [--processes 2]

Starts a SampleImageServer on a free port, writes `<out>/urls.parquet` (url, caption, sample_id) from the sample's
source.tsv (rows ingest would reject are skipped), runs img2dataset in a child process with `http_proxy` set (the
child needs the `if __name__ == "__main__"` guard: img2dataset spawns workers), then prints one JSON line with the
summed `*_stats.json` counts, per-row statuses and the wall time. The curation download stage does the same with
its own config; this module exists so the sample can be checked alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import read_parquet
from curation.sample.make import read_caption_rows
from curation.sample.server import SampleImageServer

_CHILD = textwrap.dedent("""
    import sys
    from img2dataset import download

    def main() -> None:
        download(url_list=sys.argv[1], input_format="parquet", url_col="url", caption_col="caption",
                 save_additional_columns=["sample_id"], output_format="webdataset", output_folder=sys.argv[2],
                 processes_count=int(sys.argv[3]), thread_count=int(sys.argv[4]), image_size=int(sys.argv[5]),
                 resize_mode="border", number_sample_per_shard=int(sys.argv[6]), timeout=float(sys.argv[7]),
                 retries=0, enable_wandb=False, distributor="multiprocessing")

    if __name__ == "__main__":   # img2dataset uses a "spawn" pool: workers re-import this file
        main()
""")


def child_env(proxy_url: str) -> dict[str, str]:
    """Environment for an img2dataset child: proxy set for the sample host, nothing bypassing it."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(http_proxy=proxy_url, HTTP_PROXY=proxy_url, NO_ALBUMENTATIONS_UPDATE="1", no_proxy="127.0.0.1")
    return env


def run_img2dataset(
    sample_dir: str | Path,
    out_dir: str | Path,
    *,
    rows: list[int] | None = None,
    timeout: float = 2.0,
    processes: int = 2,
    threads: int = 16,
    image_size: int = 128,
    samples_per_shard: int = 1000,
    slow_seconds: float = 6.0,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    caption_rows = [
        r
        for r in read_caption_rows(Path(sample_dir) / "source.tsv")
        if r.url is not None and r.caption and r.caption.strip()
    ]
    if rows is not None:
        wanted = set(rows)
        caption_rows = [r for r in caption_rows if r.sample_id in wanted]
    urls = out / "urls.parquet"
    pq.write_table(
        pa.table(
            {
                "url": pa.array([r.url for r in caption_rows], pa.string()),
                "caption": pa.array([r.caption for r in caption_rows], pa.string()),
                "sample_id": pa.array([r.sample_id for r in caption_rows], pa.int64()),
            }
        ),
        urls,
    )
    script = out / "run_img2dataset.py"
    script.write_text(_CHILD, encoding="utf-8")
    downloaded = out / "downloaded"
    # A fresh folder each run: img2dataset 1.47's incremental_mode="overwrite" deletes its own _tmp/ (created inside
    # output_folder just before) and then fails with FileNotFoundError on _tmp/<n>.feather.
    if downloaded.exists():
        shutil.rmtree(downloaded)
    with SampleImageServer(sample_dir, slow_seconds=slow_seconds) as server:
        started = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                str(script),
                str(urls),
                str(downloaded),
                str(processes),
                str(threads),
                str(image_size),
                str(samples_per_shard),
                str(timeout),
            ],
            env=child_env(server.proxy_url),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        wall = time.monotonic() - started
        requests = server.request_counts
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    totals: dict[str, int] = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    for stats_file in sorted(downloaded.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        for key in totals:
            totals[key] += int(stats.get(key, 0))
    status_by_id: dict[int, str] = {}
    for part in sorted(downloaded.glob("*.parquet")):
        table = read_parquet(part, columns=["sample_id", "status"])
        status_by_id.update(zip(table["sample_id"].to_pylist(), table["status"].to_pylist()))
    return {
        "rows": len(caption_rows),
        "wall_s": round(wall, 2),
        **totals,
        "requests": requests,
        "status_by_sample_id": status_by_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    rows = list(range(args.rows)) if args.rows else None
    result = run_img2dataset(
        args.sample, args.out, rows=rows, timeout=args.timeout, processes=args.processes, threads=args.threads
    )
    result.pop("status_by_sample_id")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
