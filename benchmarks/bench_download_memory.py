"""Peak memory of the download stage on a list that is nothing but trouble.

A local server (127.0.0.1, allowed with download.allowed_networks) answers every URL of the list with one of:
  png_bomb_100mp   10000x10000 PNG, ~100 kB on the wire: refused from its header (too_many_pixels)
  png_81mp         9000x9000 PNG, just UNDER the 89.5 MP cap: decoded in full (the worst case the cap allows)
  jpeg_header_bomb a small JPEG whose header claims 30000x30000: refused from the header
  endless          an endless body at full speed: reading stops at max_bytes (too_large)
  big_garbage      30 MB of garbage, under the 32 MiB cap: spooled to disk, then undecodable
  drip             one byte every 50 ms forever: ends at the whole-fetch deadline (timeout)
`curation.download.download_selected` runs on the list (img2dataset in its subprocess with the guarded fetcher and
the imaging decoder); a sampler adds up the RSS of that whole process tree every 0.1 s. RSS counts shared pages once
per process, so the sum over-states: the bound is conservative.

    .venv/bin/python benchmarks/bench_download_memory.py [--rows 600] [--processes 2] [--threads 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import stamp, write_result
from curation.download import DownloadConfig, download_selected
from curation.sample.bombs import jpeg_header_bomb, png_bomb
from manifests.layout import BuildLayout, part_name

KINDS = ("png_bomb_100mp", "png_81mp", "jpeg_header_bomb", "endless", "big_garbage", "drip")


def make_server() -> tuple[ThreadingHTTPServer, threading.Event]:
    bodies = {"png_bomb_100mp": png_bomb(10_000), "png_81mp": png_bomb(9_000),
              "jpeg_header_bomb": jpeg_header_bomb(), "big_garbage": os.urandom(30 * 1024 * 1024)}
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            kind = self.path.strip("/").split("/")[0]
            try:
                if kind in bodies:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(bodies[kind])))
                    self.end_headers()
                    self.wfile.write(bodies[kind])
                    return
                self.send_response(200)
                self.end_headers()
                chunk, pause = (b"\xff" * 65536, 0.0) if kind == "endless" else (b"\xff", 0.05)
                while not stopping.is_set():
                    self.wfile.write(chunk)
                    if pause:
                        stopping.wait(pause)
            except OSError:
                pass  # the client stopped reading: the cap or the deadline did its job

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server, stopping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="whole-fetch deadline (drip rows wait it)")
    parser.add_argument("--out", type=Path, default=None, help="default: a new results/download-memory-<time>.json")
    args = parser.parse_args(argv)
    stamped = stamp()  # at the start: the code this process imported

    server, stopping = make_server()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    work = Path(tempfile.mkdtemp(prefix="cc4m-bench-mem-"))
    layout = BuildLayout(work)
    layout.selected_dir.mkdir(parents=True)
    urls = [f"{base}/{KINDS[i % len(KINDS)]}/{i}" for i in range(args.rows)]
    pq.write_table(pa.table({"sample_id": pa.array(range(args.rows), pa.int64()), "url": urls,
                             "caption": [f"a dog {i}" for i in range(args.rows)]}), layout.selected_dir / part_name(0))
    cfg = DownloadConfig(processes_count=args.processes, thread_count=args.threads, number_sample_per_shard=100,
                         allowed_networks=("127.0.0.1/32",), max_seconds=args.max_seconds, timeout=10)

    me = psutil.Process()
    peak = {"tree_rss": 0, "largest_process_rss": 0}
    per_process: dict[int, list] = {}  # pid -> [peak rss, role]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = []
            for proc in me.children(recursive=True):
                try:
                    rss.append(proc.memory_info().rss)
                    if proc.pid not in per_process:
                        cmd = " ".join(proc.cmdline())
                        role = ("driver" if "curation.download_driver" in cmd else "worker/logger (spawn)"
                                if "multiprocessing" in cmd else cmd[:60])
                        per_process[proc.pid] = [0, role]
                    per_process[proc.pid][0] = max(per_process[proc.pid][0], rss[-1])
                except psutil.Error:
                    pass
            if rss:
                peak["tree_rss"] = max(peak["tree_rss"], sum(rss))
                peak["largest_process_rss"] = max(peak["largest_process_rss"], max(rss))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        counts = download_selected(work, cfg)
    finally:
        done.set()
        sampler.join()
        stopping.set()
        server.shutdown()
        server.server_close()
    seconds = time.perf_counter() - start
    table = pq.read_table(layout.downloads).to_pylist()
    outcome = Counter((r["url"].split("/")[3], r["status"] if r["status"] == "success" else r["reason"])
                      for r in table)
    mib = 1024 * 1024
    result = {
        "benchmark": "download_stage_peak_memory",
        "what": "download_selected on a list of only decompression bombs, endless bodies, oversized garbage and slow "
                "drips; peak of the summed RSS of the img2dataset process tree (driver + workers), sampled every 0.1 s",
        "rows": args.rows, "kinds": list(KINDS),
        "settings": {"processes_count": args.processes, "thread_count": args.threads, "max_bytes": cfg.max_bytes,
                     "max_pixels": cfg.max_pixels, "max_seconds": cfg.max_seconds},
        "outcomes": {f"{k} -> {o}": n for (k, o), n in sorted(outcome.items())},
        "peak_tree_rss_mib": round(peak["tree_rss"] / mib, 1),
        "peak_largest_process_rss_mib": round(peak["largest_process_rss"] / mib, 1),
        "peak_rss_mib_per_process": sorted(([round(r / mib, 1), role] for r, role in per_process.values()),
                                           reverse=True),
        "seconds": round(seconds, 1), "selected": counts["selected"], "failed": counts["failed"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **stamped,
    }
    write_result("download-memory", result, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
