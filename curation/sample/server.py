"""Local image server for the sample: an HTTP proxy for http://cc4m-sample.invalid/... that serves rendered images.

Clients (urllib, so img2dataset) set `http_proxy=<proxy_url>` and request the sample URLs unchanged: a proxy request
carries the absolute URI in the request line, which this server answers itself. Plain paths (`GET /images/3.jpg`)
work too. Requests for any other host get 403: nothing is ever forwarded to the network.

In-process:   with SampleImageServer(sample_dir) as server: ... server.proxy_url ...
As a process: python -m curation.sample.server --root DIR --port-file F [--slow-seconds 6]
              (writes the port to F once listening; SIGTERM/SIGINT stop it; `spawn_server_process` wraps this)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from curation.io import write_bytes_atomic
from curation.sample.lock import ServingLock
from curation.sample.make import SAMPLE_HOST, parse_sample_url

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
NOT_IMAGE_BODY = b"<!doctype html><html><head><title>Not an image</title></head><body>sample page</body></html>\n"


class _Handler(BaseHTTPRequestHandler):
    server: _SampleHTTPServer
    server_version = "cc4m-sample/1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # thousands of requests per run: counts are kept in `request_counts` instead

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_CONNECT(self) -> None:
        self._send(405, "text/plain", b"CONNECT not supported: the sample is plain http\n", True)

    def _send(self, status: int, content_type: str, body: bytes, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _answer(self, send_body: bool) -> None:
        parts = urlsplit(self.path)
        if parts.scheme or parts.netloc:
            # Absolute URIs: the sample host, or this server itself (a client whose proxy env also covers it).
            is_self = parts.hostname in LOOPBACK_HOSTS and parts.port == self.server.server_address[1]
            if parts.scheme != "http" or not (parts.hostname == SAMPLE_HOST or is_self):
                self.server.count("refused")
                self._send(403, "text/plain", f"this proxy only serves http://{SAMPLE_HOST}/\n".encode(), send_body)
                return
        parsed = parse_sample_url(f"http://{SAMPLE_HOST}{parts.path}")
        kind = parsed[0] if parsed else "unknown"
        self.server.count(kind)
        if parsed is None:
            self._send(404, "text/plain", b"not a sample url\n", send_body)
            return
        kind, row = parsed
        if kind == "404":
            self._send(404, "text/plain", b"not found (on purpose)\n", send_body)
        elif kind == "500":
            self._send(500, "text/plain", b"server error (on purpose)\n", send_body)
        elif kind == "notimage":
            self._send(200, "text/html; charset=utf-8", NOT_IMAGE_BODY, send_body)
        else:
            if kind == "slow" and self.server.stopping.wait(self.server.slow_seconds):
                return  # server stopping: drop the connection instead of holding shutdown
            data = self.server.image_bytes(row)
            if data is None:
                self._send(404, "text/plain", b"no image rendered for this row\n", send_body)
            elif kind == "corrupt":
                # Half a JPEG: the SOI marker and headers are intact, the scan data ends early -> decoding fails.
                self._send(200, "image/jpeg", data[: len(data) // 2], send_body)
            else:
                self._send(200, "image/jpeg", data, send_body)


class _SampleHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # slow requests must not hold up stop()
    allow_reuse_address = False

    def __init__(self, address: tuple[str, int], images_dir: Path, slow_seconds: float) -> None:
        super().__init__(address, _Handler)
        self.images_dir = images_dir
        self.slow_seconds = slow_seconds
        self.stopping = threading.Event()
        self.request_counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (timeout on /fail/slow) closes its socket: expected here, not worth a traceback.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    def count(self, kind: str) -> None:
        with self._lock:
            self.request_counts[kind] = self.request_counts.get(kind, 0) + 1

    def image_bytes(self, row: int) -> bytes | None:
        try:
            return (self.images_dir / f"{row}.jpg").read_bytes()
        except FileNotFoundError:
            return None


class SampleImageServer:
    """Threaded HTTP server/proxy for a sample folder (`root_dir/images/<row>.jpg`), bound to 127.0.0.1."""

    def __init__(self, root_dir: str | Path, host: str = "127.0.0.1", port: int = 0, slow_seconds: float = 6.0):
        if host not in LOOPBACK_HOSTS:
            raise ValueError(f"the sample server binds loopback only ({LOOPBACK_HOSTS}), got host={host!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if slow_seconds < 0:
            raise ValueError(f"slow_seconds must be >= 0, got {slow_seconds}")
        self.root_dir = Path(root_dir)
        self.images_dir = self.root_dir / "images"
        if not self.images_dir.is_dir():
            raise ValueError(f"{self.images_dir} is not a folder: render the sample first (make_sample)")
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self.slow_seconds = slow_seconds
        self._httpd: _SampleHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counts: dict[str, int] = {}
        self._serving = ServingLock(self.root_dir)  # no maker replaces the sample while it is served

    @property
    def proxy_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    base_url = proxy_url

    @property
    def request_counts(self) -> dict[str, int]:
        """Requests answered so far per kind ("image", "404", ..., "unknown", "refused")."""
        return dict(self._counts)

    def bind(self) -> int:
        """Open the listening socket (a free port when port=0) and return the port; idempotent."""
        if self._httpd is None:
            self._serving.acquire()
            self._httpd = _SampleHTTPServer((self.host, self.port), self.images_dir, self.slow_seconds)
            self.port = self._httpd.server_address[1]
            self._counts = self._httpd.request_counts  # kept after stop() so tests can read them
        return self.port

    def start(self) -> str:
        """Serve in a background thread; returns the proxy/base URL."""
        if self._thread is not None:
            return self.proxy_url
        self.bind()
        assert self._httpd is not None
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"sample-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self.proxy_url

    def serve_forever(self) -> None:
        """Serve in the calling thread until `request_stop()` (e.g. from a signal handler); then close."""
        self.bind()
        assert self._httpd is not None
        try:
            self._httpd.serve_forever(poll_interval=0.1)
        finally:
            self._httpd.server_close()
            self._httpd = None
            self._serving.release()

    def request_stop(self) -> None:
        """Ask a `serve_forever()` loop to end, without waiting (safe from a signal handler)."""
        httpd = self._httpd
        if httpd is not None:
            httpd.stopping.set()
            # shutdown() waits for serve_forever to return, so it must not run in the serving thread itself.
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    def stop(self) -> None:
        """Stop serving, wake sleeping slow requests and close the socket (the port is free afterwards)."""
        httpd = self._httpd
        if httpd is None:
            return
        httpd.stopping.set()
        if self._thread is not None:
            httpd.shutdown()
            self._thread.join(timeout=5)
        httpd.server_close()
        self._httpd = None
        self._thread = None
        self._serving.release()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serving_sample(root: str | Path | None, download_timeout_s: float) -> Iterator[str | None]:
    """The sample's image server while the block runs (the CLI's and the flow's one set-up): yields its http proxy URL
    for the download stage, or None when `root` is None (not a sample build). Its deliberately slow URLs answer just
    after the download timeout, so they fail as intended."""
    if root is None:
        yield None
        return
    with SampleImageServer(Path(root), slow_seconds=download_timeout_s + 1) as server:
        yield server.proxy_url


class ServerProcess:
    """A server started as a separate process (`spawn_server_process`): stop it by PID with `.stop()`."""

    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process = process
        self.port = port
        self.pid = process.pid
        self.proxy_url = f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_server_process(
    root_dir: str | Path, port_file: str | Path, *, slow_seconds: float = 6.0, startup_timeout: float = 30.0
) -> ServerProcess:
    """Start `python -m curation.sample.server` and wait until it listens (its port file appears)."""
    port_file = Path(port_file)
    port_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "curation.sample.server",
        "--root",
        str(root_dir),
        "--port-file",
        str(port_file),
        "--slow-seconds",
        str(slow_seconds),
    ]
    process = subprocess.Popen(cmd, cwd=str(Path(__file__).resolve().parents[2]))
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            return ServerProcess(process, int(port_file.read_text().strip()))
        if process.poll() is not None:
            raise RuntimeError(f"sample server exited with code {process.returncode} before listening")
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"sample server did not start within {startup_timeout} s")


def serve_until_signalled(root: str | Path, port: int = 0, slow_seconds: float = 6.0,
                          port_file: str | None = None) -> None:
    """Serve `root` in this thread until SIGTERM/SIGINT; write the bound port to `port_file` once listening."""
    server = SampleImageServer(root, port=port, slow_seconds=slow_seconds)
    server.bind()
    signal.signal(signal.SIGTERM, lambda signum, frame: server.request_stop())
    signal.signal(signal.SIGINT, lambda signum, frame: server.request_stop())
    if port_file:
        write_bytes_atomic(port_file, f"{server.port}\n".encode())
    print(f"cc4m sample server: http://cc4m-sample.invalid/ via proxy {server.proxy_url} "
          f"(http_proxy={server.proxy_url}, pid {os.getpid()}, root {root})", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="sample folder (holds images/)")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--port-file", help="write the chosen port here once listening")
    parser.add_argument("--slow-seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    serve_until_signalled(args.root, args.port, args.slow_seconds, args.port_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
