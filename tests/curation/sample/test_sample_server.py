from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from curation.sample import SampleImageServer, SampleInfo
from curation.sample.server import spawn_server_process

HOST = "http://cc4m-sample.invalid"


def _opener(monkeypatch: pytest.MonkeyPatch, proxy_url: str) -> urllib.request.OpenerDirector:
    """An opener configured from the environment exactly like urlopen's (img2dataset's) default one."""
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy_url)
    return urllib.request.build_opener()


def _port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_each_url_kind_through_the_proxy(small_sample: SampleInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    with SampleImageServer(small_sample.root, slow_seconds=30.0) as server:
        assert server.proxy_url.startswith("http://127.0.0.1:")
        opener = _opener(monkeypatch, server.proxy_url)

        with opener.open(f"{HOST}/images/0.jpg", timeout=5) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
            body = resp.read()
        assert body == (small_sample.images_dir / "0.jpg").read_bytes()
        assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is not None

        for code in (404, 500):
            with pytest.raises(urllib.error.HTTPError) as err:
                opener.open(f"{HOST}/fail/{code}/5.jpg", timeout=5)
            assert err.value.code == code

        with pytest.raises((TimeoutError, urllib.error.URLError)):
            opener.open(f"{HOST}/fail/slow/10.jpg", timeout=0.3).read()

        with opener.open(f"{HOST}/fail/corrupt/1.jpg", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "image/jpeg"
            corrupt = resp.read()
        assert corrupt.startswith(b"\xff\xd8") and 0 < len(corrupt) < len(body)
        assert cv2.imdecode(np.frombuffer(corrupt, np.uint8), cv2.IMREAD_COLOR) is None  # img2dataset's decoder

        with opener.open(f"{HOST}/fail/notimage/1.jpg", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/html")
            assert b"<html" in resp.read()

        with pytest.raises(urllib.error.HTTPError) as err:  # a row without a rendered image
            opener.open(f"{HOST}/images/99999.jpg", timeout=5)
        assert err.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as err:  # never forwards to the network
            opener.open("http://example.com/images/0.jpg", timeout=5)
        assert err.value.code == 403

        counts = server.request_counts
    assert counts["image"] == 2 and counts["404"] == 1 and counts["500"] == 1 and counts["slow"] == 1
    assert counts["refused"] == 1


def test_slow_url_serves_the_image_after_the_delay(small_sample: SampleInfo, monkeypatch) -> None:
    with SampleImageServer(small_sample.root, slow_seconds=0.5) as server:
        opener = _opener(monkeypatch, server.proxy_url)
        with opener.open(f"{HOST}/fail/slow/0.jpg", timeout=10) as resp:
            assert resp.read() == (small_sample.images_dir / "0.jpg").read_bytes()


def test_plain_paths_without_proxy(small_sample: SampleInfo) -> None:
    with SampleImageServer(small_sample.root) as server:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{server.base_url}/images/1.jpg", timeout=5) as resp:
            assert resp.read() == (small_sample.images_dir / "1.jpg").read_bytes()


def test_stop_closes_the_port_even_with_a_slow_request_pending(small_sample: SampleInfo) -> None:
    server = SampleImageServer(small_sample.root, slow_seconds=60.0)
    server.start()
    port = server.port
    pending = socket.create_connection(("127.0.0.1", port), timeout=5)
    pending.sendall(f"GET {HOST}/fail/slow/0.jpg HTTP/1.0\r\n\r\n".encode())
    server.stop()  # must not wait for the 60 s sleep
    pending.close()
    assert _port_closed(port)
    server.stop()  # idempotent


def test_rejects_non_loopback_host_and_missing_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        SampleImageServer(tmp_path, host="0.0.0.0")
    with pytest.raises(ValueError, match="render the sample first"):
        SampleImageServer(tmp_path / "nothing")


def test_server_as_a_process_stops_by_pid(small_sample: SampleInfo, tmp_path: Path, monkeypatch) -> None:
    with spawn_server_process(small_sample.root, tmp_path / "port", slow_seconds=1.0) as proc:
        opener = _opener(monkeypatch, proc.proxy_url)
        with opener.open(f"{HOST}/images/0.jpg", timeout=5) as resp:
            assert resp.status == 200
        assert proc.stop() == 0
    assert _port_closed(proc.port)
