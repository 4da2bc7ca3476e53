"""A hostile local web for the download tests: one HTTP server on 127.0.0.1 (the only address the tests allow) with
dozens of kinds of good and bad responses, and a canary listener on 127.0.0.2 playing every address the guard must
refuse (it counts connections: any at all is a failure).

`KINDS` maps a name to (path, expected outcome): "success", or the failure reason. `url_rows()` adds the URLs that
must never reach a server at all (other schemes, other addresses in numeric disguises).
"""
from __future__ import annotations

import gzip
import io
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from PIL import Image

from curation.sample.bombs import jpeg_header_bomb, png_bomb
from flows.local import free_port

CANARY_HOST = "127.0.0.2"


# ------------------------------------------------------------------------------------------------------------ images
def _picture(size: tuple[int, int] = (48, 32), seed: int = 0) -> Image.Image:
    img = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, 90))
    for x in range(size[0]):
        img.putpixel((x, (x * (seed + 3)) % size[1]), (255, 255 - seed % 256, 0))
    return img


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """48x24 pixels stored landscape with EXIF Orientation 6 (rotate 90° CW to view): upright it is 24x48."""
    img = _picture((48, 24), seed=11)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", exif=exif.tobytes())


def build_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) of every image kind that must be written."""
    grey16 = Image.new("I;16", (40, 30))
    for x in range(40):
        grey16.putpixel((x, x % 30), 65535 - x * 1000)
    palette = _picture(seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = _picture(seed=6).convert("RGBA")
    rgba.putalpha(128)
    frames = [_picture(seed=s) for s in (8, 9, 10)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cmyk = _picture(seed=2).convert("CMYK")
    return {
        "jpeg_baseline": (_save(_picture(seed=1), "JPEG"), "image/jpeg"),
        "jpeg_progressive": (_save(_picture(seed=3), "JPEG", progressive=True), "image/jpeg"),
        "jpeg_cmyk": (_save(cmyk, "JPEG"), "image/jpeg"),
        "jpeg_greyscale": (_save(_picture(seed=4).convert("L"), "JPEG"), "image/jpeg"),
        "png_16bit": (_save(grey16, "PNG"), "image/png"),
        "png_palette_transparency": (_save(palette, "PNG"), "image/png"),
        "png_rgba": (_save(rgba, "PNG"), "image/png"),
        "webp": (_save(_picture(seed=12), "WEBP"), "image/webp"),
        "bmp": (_save(_picture(seed=13), "BMP"), "image/bmp"),
        "tiff": (_save(_picture(seed=14), "TIFF"), "image/tiff"),
        "gif_animated": (gif.getvalue(), "image/gif"),
        "exif_rotated": (exif_rotated_jpeg(), "image/jpeg"),
        "chunked": (_save(_picture(seed=15), "JPEG"), "image/jpeg"),
        "redirect_target": (_save(_picture(seed=16), "JPEG"), "image/jpeg"),
        "chain_target": (_save(_picture(seed=17), "JPEG"), "image/jpeg"),
        "encoded_path": (_save(_picture(seed=18), "JPEG"), "image/jpeg"),
        "flaky": (_save(_picture(seed=19), "JPEG"), "image/jpeg"),
    }


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"><rect width="40" ' \
      b'height="30" fill="red"/></svg>'
HTML = b"<!doctype html><html><body><img src='/img/jpeg_baseline'>an image page</body></html>"

# name -> (path on the server, expected outcome)
KINDS: dict[str, tuple[str, str]] = {
    **{name: (f"/img/{name}", "success") for name in (
        "jpeg_baseline", "jpeg_progressive", "jpeg_cmyk", "jpeg_greyscale", "png_16bit", "png_palette_transparency",
        "png_rgba", "webp", "bmp", "tiff", "gif_animated", "exif_rotated")},
    "chunked": ("/chunked", "success"),
    "redirect_302": ("/redirect/302", "success"),
    "redirect_chain": ("/redirect/chain/3", "success"),
    "encoded_path": ("/img/caf\u00e9 space.jpg", "success"),  # fetched as /img/caf%C3%A9%20space.jpg
    "flaky_503_then_ok": ("/flaky", "http_503"),  # transient: the retry round gets the image
    "status_404": ("/status/404", "http_404"),
    "status_410": ("/status/410", "http_410"),
    "status_403": ("/status/403", "http_403"),
    "status_429": ("/status/429", "http_429"),
    "status_500": ("/status/500", "http_500"),
    "status_503": ("/status/503", "http_503"),
    "html_200": ("/html", "undecodable"),
    "svg": ("/svg", "undecodable"),
    "empty_200": ("/empty", "undecodable"),
    "garbage_200": ("/garbage", "undecodable"),
    "truncated_jpeg": ("/truncated", "undecodable"),
    "gzip_encoded_jpeg": ("/gzip", "undecodable"),  # Content-Encoding we never asked for: bytes are not an image
    "content_length_short": ("/cl/short", "undecodable"),  # says half the size: the image arrives cut
    "content_length_long": ("/cl/long", "incomplete_body"),  # says more than it sends, then closes
    "content_length_huge": ("/cl/huge", "too_large"),  # announces 10 GB: refused before reading
    "endless_body": ("/endless", "too_large"),
    "endless_chunked": ("/endless/chunked", "too_large"),
    "slow_drip": ("/drip", "timeout"),
    "reset_before_response": ("/reset", "connection_reset"),
    "not_http": ("/not-http", "bad_response"),
    "png_bomb": ("/bomb/png", "too_many_pixels"),
    "jpeg_header_bomb": ("/bomb/jpeg", "too_many_pixels"),
    "robots_noai": ("/robots/noai", "robots_disallowed"),
    "redirect_loop": ("/redirect/loop/a", "redirect_loop"),
    "redirect_too_many": ("/redirect/many/0", "too_many_redirects"),
    "redirect_no_location": ("/redirect/no-location", "bad_redirect"),
    "redirect_to_file": ("/redirect/to-file", "blocked_scheme"),
    "redirect_to_data": ("/redirect/to-data", "blocked_scheme"),
    "redirect_to_ftp": ("/redirect/to-ftp", "blocked_scheme"),
    "redirect_to_canary": ("/redirect/to-canary", "blocked_address"),
    "redirect_to_decimal": ("/redirect/to-decimal", "blocked_address"),
    "redirect_to_mapped_ipv6": ("/redirect/to-mapped", "blocked_address"),
}

TRANSIENT_KINDS = {name for name, (_, outcome) in KINDS.items()
                   if outcome in ("http_429", "http_500", "http_503", "incomplete_body", "timeout",
                                  "connection_reset")}


class _Handler(BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.record(self.path)
        handler = self.server.route(self.path)
        handler(self)

    # helpers the routes use
    def send(self, status: int, body: bytes, ctype: str = "application/octet-stream", length: int | None = None,
             headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def redirect(self, location: str, status: int = 302) -> None:
        self.send(status, b"", "text/plain", headers={"Location": location})

    def reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def stream(self, chunk: bytes, pause: float, chunked: bool, limit: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            while sent < limit and not self.server.stopping.is_set():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                self.wfile.flush()
                sent += len(chunk)
                if pause:
                    self.server.stopping.wait(pause)
            if chunked and sent >= limit:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading: what a cap does
        self.close_connection = True


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, canary_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.canary_port = canary_port
        self.images = build_images()
        self.bombs = {"png": png_bomb(), "jpeg": jpeg_header_bomb()}
        self.stopping = threading.Event()
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._flaky_calls = 0

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets and clients that gave up are the point here

    def record(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def route(self, path: str):
        images, canary = self.images, self.canary_port
        if path.startswith("/img/"):
            name = path[len("/img/"):]
            if name == "caf%C3%A9%20space.jpg":
                name = "encoded_path"
            if name in images:
                return lambda h: h.send(200, images[name][0], images[name][1])
            return lambda h: h.send(404, b"no such image", "text/plain")
        if path.startswith("/status/"):
            return lambda h: h.send(int(path.rsplit("/", 1)[1]), b"status page", "text/html")
        if path.startswith("/redirect/chain/"):
            n = int(path.rsplit("/", 1)[1])
            return lambda h: h.redirect(f"/redirect/chain/{n - 1}" if n > 1 else "/img/chain_target", 301)
        if path.startswith("/redirect/many/"):
            n = int(path.rsplit("/", 1)[1])
            return lambda h: h.redirect(f"/redirect/many/{n + 1}", 307)
        jpeg = images["jpeg_baseline"][0]
        routes = {
            "/chunked": lambda h: h.stream(images["chunked"][0], 0, True, len(images["chunked"][0])),
            "/redirect/302": lambda h: h.redirect("/img/redirect_target"),
            "/flaky": self._flaky,
            "/html": lambda h: h.send(200, HTML, "text/html"),
            "/svg": lambda h: h.send(200, SVG, "image/svg+xml"),
            "/empty": lambda h: h.send(200, b"", "image/jpeg"),
            "/garbage": lambda h: h.send(200, bytes(range(256)) * 40, "image/jpeg"),
            "/truncated": lambda h: h.send(200, jpeg[: len(jpeg) // 2], "image/jpeg"),
            "/gzip": lambda h: h.send(200, gzip.compress(jpeg), "image/jpeg", headers={"Content-Encoding": "gzip"}),
            "/cl/short": lambda h: h.send(200, jpeg, "image/jpeg", length=len(jpeg) // 2),
            "/cl/long": lambda h: h.send(200, jpeg, "image/jpeg", length=len(jpeg) * 3),
            "/cl/huge": lambda h: h.send(200, b"", "image/jpeg", length=10 * 1024**3),
            "/endless": lambda h: h.stream(b"\xff" * 65536, 0, False, 1 << 30),
            "/endless/chunked": lambda h: h.stream(b"\xff" * 65536, 0, True, 1 << 30),
            "/drip": lambda h: h.stream(b"\xff", 0.05, False, 1 << 20),
            # One byte every 0.5 s for 10 s: each read is far inside a socket timeout; only the deadline ends it.
            "/drip/slow": lambda h: h.stream(b"\xff", 0.5, False, 20),
            "/redirect/to-slow-drip": lambda h: h.redirect("/drip/slow"),
            "/reset": lambda h: h.reset(),
            "/not-http": lambda h: (h.wfile.write(b"HELLO THERE\r\n\r\n"), setattr(h, "close_connection", True)),
            "/bomb/png": lambda h: h.send(200, self.bombs["png"], "image/png"),
            "/bomb/jpeg": lambda h: h.send(200, self.bombs["jpeg"], "image/jpeg"),
            "/robots/noai": lambda h: h.send(200, jpeg, "image/jpeg", headers={"X-Robots-Tag": "noai"}),
            "/redirect/loop/a": lambda h: h.redirect("/redirect/loop/b"),
            "/redirect/loop/b": lambda h: h.redirect("/redirect/loop/a"),
            "/redirect/no-location": lambda h: h.send(302, b"", "text/plain"),
            "/redirect/to-file": lambda h: h.redirect("file:///etc/passwd"),
            "/redirect/to-data": lambda h: h.redirect("data:image/gif;base64,R0lGODlhAQABAAAAACw="),
            "/redirect/to-ftp": lambda h: h.redirect(f"ftp://127.0.0.1:{canary}/x.jpg"),
            "/redirect/to-canary": lambda h: h.redirect(f"http://{CANARY_HOST}:{canary}/x.jpg"),
            "/redirect/to-decimal": lambda h: h.redirect(f"http://2130706434:{canary}/x.jpg"),
            "/redirect/to-mapped": lambda h: h.redirect(f"http://[::ffff:{CANARY_HOST}]:{canary}/x.jpg"),
        }
        return routes.get(path, lambda h: h.send(404, b"not found", "text/plain"))

    def _flaky(self, h: _Handler) -> None:
        with self._lock:
            self._flaky_calls += 1
            first = self._flaky_calls == 1
        if first:
            h.send(503, b"try again later", "text/plain")
        else:
            h.send(200, self.images["flaky"][0], "image/jpeg")


class Canary:
    """A listener on 127.0.0.2 (an address the tests never allow) that counts every connection it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((CANARY_HOST, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def url_rows(base_url: str, canary_port: int) -> dict[str, tuple[str, str]]:
    """name -> (url, expected outcome) for URLs that must be refused before any connection (or fail on their own).
    Only 127.0.0.x disguises here: addresses outside 127.0.0.0/8 (169.254.169.254, 10/8, ::1, ...) are tested in
    process, where a tripwire on socket.connect makes sure nothing is ever sent there even if the guard broke."""
    c = canary_port
    return {
        "scheme_file": ("file:///etc/passwd", "blocked_scheme"),
        "scheme_data": ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "blocked_scheme"),
        "scheme_ftp": (f"ftp://127.0.0.1:{c}/x.jpg", "blocked_scheme"),
        "scheme_javascript": ("javascript:alert(1)", "blocked_scheme"),
        "addr_canary": (f"http://{CANARY_HOST}:{c}/x.jpg", "blocked_address"),
        "addr_decimal": (f"http://2130706434:{c}/x.jpg", "blocked_address"),
        "addr_hex": (f"http://0x7f000002:{c}/x.jpg", "blocked_address"),
        "addr_octal": (f"http://0177.0.0.2:{c}/x.jpg", "blocked_address"),
        "addr_short": (f"http://127.2:{c}/x.jpg", "blocked_address"),
        "addr_mapped_ipv6": (f"http://[::ffff:{CANARY_HOST}]:{c}/x.jpg", "blocked_address"),
        "addr_userinfo": (f"http://127.0.0.1:{c}@{CANARY_HOST}:{c}/x.jpg", "blocked_address"),
        "addr_https_canary": (f"https://{CANARY_HOST}:{c}/x.jpg", "blocked_address"),
        # a free port (bound, then released): nobody listens there
        "connection_refused": (f"http://127.0.0.1:{free_port()}/x.jpg", "connection_refused"),
        "tls_to_plain_http": (base_url.replace("http://", "https://") + "/img/jpeg_baseline", "tls_error"),
    }


class HostileWeb:
    """The server and the canary, started together and stopped by handle."""

    def __init__(self) -> None:
        self.canary = Canary()
        self.server = HostileServer(self.canary.port)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    def rows(self) -> dict[str, tuple[str, str]]:
        """Every kind: name -> (url, expected outcome)."""
        base = self.server.base_url
        return {**{name: (base + path, outcome) for name, (path, outcome) in KINDS.items()},
                **url_rows(base, self.canary.port)}

    def __enter__(self) -> Self:
        self.canary.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.canary.stop()
        time.sleep(0)  # let daemon handler threads notice `stopping`
