"""A local HTTP server for a folder of shards, with Range requests and an optional delay per request.

For tests and `benchmarks/bench_loader.py` (object storage stand-in: whole-shard GETs stream, partner fetches are
ranged GETs, and `delay_s` adds a fixed latency to every request). Binds 127.0.0.1 on a free port; stop it with the
handle's `close()` (or use it as a context manager). Never used by training itself.
"""
from __future__ import annotations

import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

from manifests.fileio import write_text_atomic

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def _handler(root: Path, delay_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet: benchmarks make thousands of requests
            pass

        def do_GET(self) -> None:
            if delay_s:
                time.sleep(delay_s)
            path = (root / self.path.lstrip("/").split("?", 1)[0]).resolve()
            if root not in path.parents or not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            match = _RANGE.match(self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
                if start > end:
                    self.send_error(416)
                    return
            length = end - start + 1
            self.send_response(206 if match else 200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            with open(path, "rb") as f:
                f.seek(start)
                remaining = length
                while remaining > 0:
                    chunk = f.read(min(1 << 20, remaining))
                    if not chunk:
                        break
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):  # the reader stopped early
                        return
                    remaining -= len(chunk)

    return Handler


class ShardServer:
    """Serve `folder` on http://127.0.0.1:<free port>/ in a background thread.

    Args:
        folder: the folder whose files are served (e.g. a build's shards/).
        delay_s: seconds slept before answering each request (simulated object-store latency).
    """

    def __init__(self, folder: str | os.PathLike, delay_s: float = 0.0) -> None:
        root = Path(folder).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"no folder {root} to serve")
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, delay_s))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="shard-server", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def main(argv: list[str] | None = None) -> int:
    """`python ovseg_core/data/shard_server.py FOLDER --delay-s 0.02 --port-file F`: serve until SIGTERM (the
    benchmark runs it as a separate process so the server's CPU time is not counted as the loader's; run the file
    by path: this module imports nothing of the package, so it starts and stops in well under a second)."""
    import argparse
    import signal

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("folder")
    p.add_argument("--delay-s", type=float, default=0.0)
    p.add_argument("--port-file", required=True)
    args = p.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # handled by sigwait below
    server = ShardServer(args.folder, args.delay_s)
    write_text_atomic(args.port_file, server.url)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.server.server_close()
    os._exit(0)  # daemon handler threads may be mid-request: leave at once


if __name__ == "__main__":
    raise SystemExit(main())
