"""Downloads that survive the real web: the address guard, the caps, failure classes and retries, against the hostile
local web of hostile_web.py (127.0.0.1 allowed; 127.0.0.2 is a canary that must never be contacted)."""
from __future__ import annotations

import io
import ipaddress
import socket
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from build_fixtures import CAPTIONS_SCHEMA
from hostile_web import TRANSIENT_KINDS, HostileWeb
from PIL import Image

from curation import fetch as fetch_mod
from curation.config import config_with_overrides, parse_overrides
from curation.download import SAMPLE_PROXY_HOSTS, DownloadConfig, download_selected
from curation.fetch import FetchError, FetchPolicy, address_refusal, fetch, is_transient, parse_target, reason_of
from curation.sample import SAMPLE_HOST
from curation.staging import iter_staged_images
from curation.verify import BuildQualityError, VerifyConfig, verify_downloads
from manifests.layout import BuildLayout, part_name

LOOPBACK_ONLY = ("127.0.0.1/32",)


@pytest.fixture
def tripwire(monkeypatch):
    """Fail (and never connect) if anything tries an address outside 127.0.0.0/8; records every attempt."""
    attempts: list[str] = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        attempts.append(host)
        ip = ipaddress.ip_address(host)
        if ip.version != 4 or not ip.is_loopback:
            raise AssertionError(f"a test tried to connect to {host}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


# ------------------------------------------------------------------------------------------------- the address rule
@pytest.mark.parametrize("address, refused", [
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("100.64.0.1", "not globally routable"),
    ("224.0.0.1", "multicast"), ("240.0.0.1", "private"), ("0.0.0.0", "unspecified"),
    ("255.255.255.255", "private"), ("::1", "loopback"), ("::", "unspecified"), ("fd00::1", "private"),
    ("fe80::1", "link-local"), ("ff02::1", "multicast"), ("fec0::1", "site-local"),
    ("::ffff:127.0.0.2", "loopback"), ("::ffff:169.254.169.254", "link-local"),
    ("64:ff9b::a00:1", "private (embedded in 64:ff9b::a00:1)"), ("2002:a00:1::", "private (embedded in 2002:a00:1::)"),
    ("93.184.215.14", None), ("2606:4700::1111", None), ("::ffff:93.184.215.14", None),
])
def test_address_refusal(address, refused):
    assert address_refusal(ipaddress.ip_address(address)) == refused


def test_allowed_networks_open_exactly_what_they_name():
    policy = FetchPolicy(allowed_networks=("10.1.0.0/16", "fd12::/16"))
    assert address_refusal(ipaddress.ip_address("10.1.9.9"), policy._networks) is None
    assert address_refusal(ipaddress.ip_address("10.2.0.1"), policy._networks) == "private"
    assert address_refusal(ipaddress.ip_address("::ffff:10.1.0.5"), policy._networks) is None  # the same address
    assert address_refusal(ipaddress.ip_address("fd12::5"), policy._networks) is None
    with pytest.raises(ValueError, match="not a CIDR"):
        FetchPolicy(allowed_networks=("10.1.0.1/16",))  # host bits set: a typo, refused
    with pytest.raises(ValueError, match="allowed_networks"):
        DownloadConfig(allowed_networks=("nonsense",))
    with pytest.raises(ValueError, match="list of strings"):
        DownloadConfig(allowed_networks="10.1.0.0/16")
    with pytest.raises(ValueError, match=".invalid"):
        DownloadConfig(http_proxy="http://127.0.0.1:9", proxy_hosts=("example.com",))


def test_allowed_networks_from_the_command_line(tmp_path):
    overrides = parse_overrides(['download.allowed_networks=["10.1.0.0/16"]'])
    cfg = config_with_overrides(str(tmp_path / "src.tsv"), str(tmp_path / "b"), None, overrides)
    assert cfg.download.allowed_networks == ("10.1.0.0/16",)
    assert cfg.download.fetch_policy().allowed_networks == ("10.1.0.0/16",)
    assert DownloadConfig().allowed_networks == ()  # on by default: nothing opened
    assert SAMPLE_PROXY_HOSTS == (SAMPLE_HOST,)


def test_urls_are_sent_the_way_browsers_send_them():
    target = parse_target("HTTP://user:pw@Example.COM:80/a b/caf\u00e9.jpg?q=x y&z=\u00fc#frag")
    assert target.url == "http://example.com/a%20b/caf%C3%A9.jpg?q=x%20y&z=%C3%BC"
    assert target.path == "/a%20b/caf%C3%A9.jpg?q=x%20y&z=%C3%BC" and target.host_header == "example.com"
    assert parse_target("http://b\u00fccher.example/x%20y.jpg").url == "http://xn--bcher-kva.example/x%20y.jpg"
    assert parse_target("https://[::1]:8443/").host_header == "[::1]:8443"
    for url, reason in [("file:///etc/passwd", "blocked_scheme"), ("data:,x", "blocked_scheme"),
                        ("ftp://a/b", "blocked_scheme"), ("www.example.com/a.jpg", "blocked_scheme"),
                        ("http://a:99999/", "bad_url"), ("http:///nohost", "bad_url")]:
        with pytest.raises(FetchError) as err:
            parse_target(url)
        assert err.value.reason == reason, url


def test_failure_classes():
    for reason in ("timeout", "connection_reset", "connection_refused", "incomplete_body", "http_429", "http_500",
                   "http_503", "http_408", "missing"):
        assert is_transient(reason), reason
    for reason in ("http_404", "http_410", "http_403", "http_401", "undecodable", "blocked_address",
                   "blocked_scheme", "too_large", "too_many_pixels", "redirect_loop", "robots_disallowed", "other"):
        assert not is_transient(reason), reason
    assert reason_of("http_404: HTTP Error 404: Not Found") == "http_404"
    assert reason_of("too_large: body exceeds cap") == "too_large"
    assert reason_of("Use of image disallowed") == "other" and reason_of(None) == "other"


# ------------------------------------------------------------------------------------ in process, with a tripwire
def test_addresses_outside_loopback_are_refused_before_any_connection(tripwire):
    policy = FetchPolicy(allowed_networks=LOOPBACK_ONLY, timeout=2, max_seconds=5)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.jpg", "http://100.64.0.1/",
                "http://[fd00::1]/", "http://[fe80::1]/", "http://[::1]/", "http://0.0.0.0/", "http://224.0.0.1/",
                "https://192.168.0.1/", "http://[64:ff9b::a9fe:a9fe]/", "http://0251.0376.0251.0376/",
                "http://2852039166/"):
        with pytest.raises(FetchError) as err:
            fetch(url, policy, resolver=lambda host, port: pytest.fail("no DNS for numeric hosts"))
        assert err.value.reason == "blocked_address", url
    assert tripwire == []


def test_names_are_resolved_once_and_the_checked_address_is_the_one_connected(tripwire):
    with HostileWeb() as web:
        port = web.server.server_address[1]
        policy = FetchPolicy(allowed_networks=LOOPBACK_ONLY, timeout=2, max_seconds=5)
        answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])  # DNS rebinding: the second answer changes

        def rebinding(host, port_):
            return next(answers)

        body = fetch(f"http://images.test:{port}/img/jpeg_baseline", policy, resolver=rebinding)
        assert body.read()[:2] == b"\xff\xd8"
        # Metadata name, mixed answers: only the allowed address is ever tried.
        with pytest.raises(FetchError) as err:
            fetch(f"http://metadata.test:{port}/x", policy, resolver=lambda h, p: ["169.254.169.254"])
        assert err.value.reason == "blocked_address"
        mixed = fetch(f"http://mixed.test:{port}/img/png_rgba", policy,
                      resolver=lambda h, p: ["10.0.0.7", "127.0.0.1"])
        assert mixed.read()[:4] == b"\x89PNG"
        # A redirect hop to a name that resolves to a refused address is refused too.
        with pytest.raises(FetchError) as err:
            fetch(f"http://127.0.0.1:{port}/redirect/to-canary", policy)
        assert err.value.reason == "blocked_address"
        assert web.canary.connections == 0
    assert set(tripwire) == {"127.0.0.1"}


def test_caps_in_process(tripwire):
    with HostileWeb() as web:
        base = web.server.base_url
        policy = FetchPolicy(allowed_networks=LOOPBACK_ONLY, max_bytes=200_000, timeout=2, max_seconds=1.5)
        for path, reason in [("/endless", "too_large"), ("/endless/chunked", "too_large"), ("/cl/huge", "too_large"),
                             ("/drip", "timeout"), ("/cl/long", "incomplete_body"), ("/reset", "connection_reset"),
                             ("/status/429", "http_429"), ("/redirect/loop/a", "redirect_loop")]:
            with pytest.raises(FetchError) as err:
                fetch(base + path, policy)
            assert err.value.reason == reason, path
        big = fetch(base + "/bomb/png", policy)  # ~100 kB on the wire: under the byte cap, refused later by pixels
        assert len(big.read()) < 200_000


def test_the_deadline_holds_on_every_socket_of_a_fetch():
    """max_seconds bounds the whole fetch whatever eats the time: a resolver slower than the deadline (the socket
    opened after it must not be read without one), a redirect hop whose second resolution crosses the deadline, and
    a server that drips one byte every 0.5 s (each read well inside the per-operation timeout)."""
    import time

    def slow_resolver(delay):
        def resolve(host, port):
            time.sleep(delay)
            return ["127.0.0.1"]
        return resolve

    policy = FetchPolicy(allowed_networks=LOOPBACK_ONLY, timeout=2, max_seconds=1.0)
    with HostileWeb() as web:
        port = web.server.server_address[1]
        cases = [(f"http://slow-dns.test:{port}/drip/slow", slow_resolver(1.5)),
                 (f"http://slow-dns.test:{port}/redirect/to-slow-drip", slow_resolver(0.6)),
                 (f"http://slow-dns.test:{port}/redirect/to-slow-drip", slow_resolver(0.0)),
                 (f"http://127.0.0.1:{port}/drip/slow", fetch_mod.system_resolver)]
        for url, resolver in cases:
            started = time.monotonic()
            with pytest.raises(FetchError) as err:
                fetch(url, policy, resolver=resolver)
            elapsed = time.monotonic() - started
            assert err.value.reason == "timeout", (url, err.value)
            assert elapsed <= policy.max_seconds + 1.0, (url, elapsed)


def test_bodies_above_the_spool_size_leave_memory(monkeypatch):
    monkeypatch.setattr(fetch_mod, "SPOOL_BYTES", 10)
    with HostileWeb() as web:
        body = fetch(web.server.base_url + "/img/jpeg_baseline", FetchPolicy(allowed_networks=LOOPBACK_ONLY))
        assert body._rolled and body.read()[:2] == b"\xff\xd8"  # SpooledTemporaryFile moved it to disk


# --------------------------------------------------------------------------------- the real stage, in its subprocess
def _write_selected(layout: BuildLayout, rows: dict[str, tuple[str, str]]) -> dict[int, tuple[str, str]]:
    by_id = {}
    records = []
    for sid, (name, (url, outcome)) in enumerate(sorted(rows.items())):
        by_id[sid] = (name, outcome)
        records.append({"sample_id": sid, "url": url, "caption": f"a dog number {sid}", "entities": ["dog"],
                        "entity_words": [{"word": "dog", "class": "dog", "start": 2, "end": 5}]})
    table = pa.Table.from_pylist(records, schema=CAPTIONS_SCHEMA)
    layout.selected_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, layout.selected_dir / part_name(0))
    return by_id


@pytest.mark.slow
def test_hostile_web_through_the_download_stage(tmp_path):
    layout = BuildLayout(tmp_path)
    cfg = DownloadConfig(image_size=64, thread_count=8, number_sample_per_shard=25, timeout=2, max_seconds=3,
                         max_bytes=1_000_000, allowed_networks=LOOPBACK_ONLY, progress_interval_s=0.5)
    updates: list[dict] = []
    with HostileWeb() as web:
        rows = web.rows()
        assert len(rows) >= 60
        by_id = _write_selected(layout, rows)
        result = download_selected(tmp_path, cfg, progress=updates.append)
        table = {r["sample_id"]: r for r in pq.read_table(layout.downloads).to_pylist()}
        got = {by_id[sid][0]: (r["status"] if r["status"] == "success" else r["reason"]) for sid, r in table.items()}
        expected = {name: outcome for name, outcome in by_id.values()}
        assert got == expected
        assert web.canary.connections == 0  # no refused address was ever contacted

        # Nothing unaccounted: one row per selected sample, every failure classified and explained.
        assert sorted(table) == sorted(by_id) and result["selected"] == len(by_id)
        assert result["success"] + result["failed"] == result["selected"]
        assert sum(result["failed_by_reason"].values()) == result["failed"]
        for r in table.values():
            if r["status"] == "success":
                assert r["reason"] is None and r["transient"] is None and r["width"] == 64 == r["height"]
            else:
                assert r["error_message"].startswith(r["reason"] + ": ")
                assert r["transient"] == is_transient(r["reason"])
            assert r["attempts"] == 1 and r["first_attempt_at"] == r["last_attempt_at"] is not None
        assert {by_id[s][0] for s, r in table.items() if r["transient"]} == TRANSIENT_KINDS | {"flaky_503_then_ok",
                                                                                              "connection_refused"}
        # Progress came from the stats files, in the agreed shape, ending at done == total.
        assert updates and set(updates[-1]) == {"stage", "done", "total", "unit", "rate", "eta_s"}
        assert updates[-1]["done"] == updates[-1]["total"] == len(by_id) and updates[-1]["unit"] == "images"

        # Upright: the EXIF-rotated 48x24 landscape is stored from its 24x48 portrait view.
        staged = pq.read_table(layout.staging_dir / "00000.parquet").to_pylist()
        staged += pq.read_table(layout.staging_dir / "00001.parquet").to_pylist()
        rotated_id = next(s for s, (name, _) in by_id.items() if name == "exif_rotated")
        rotated = next(r for r in staged if r["sample_id"] == rotated_id)
        assert (rotated["original_width"], rotated["original_height"]) == (24, 48)
        for sid, data in iter_staged_images(tmp_path):
            assert Image.open(io.BytesIO(data)).size == (64, 64), by_id[sid]

        # The weekly rebuild: transient failures are fetched again, permanent ones are not.
        again = download_selected(tmp_path, DownloadConfig(**{**cfg.to_dict(), "retry_transient": True,
                                                              "max_attempts": 2}))
        retried = {r["sample_id"]: r for r in pq.read_table(layout.downloads).to_pylist()}
        assert again["skipped"] is False and again["rounds"] == 2
        for sid, r in retried.items():
            was_transient = bool(table[sid]["transient"])
            assert r["attempts"] == (2 if was_transient else 1), by_id[sid]
            if not was_transient:
                assert (r["status"], r["reason"]) == (table[sid]["status"], table[sid]["reason"])
        flaky = next(s for s, (name, _) in by_id.items() if name == "flaky_503_then_ok")
        assert retried[flaky]["status"] == "success" and retried[flaky]["staging_shard"].startswith("retry-0001/")
        assert retried[flaky]["last_attempt_at"] >= retried[flaky]["first_attempt_at"]
        ids = [sid for sid, _ in iter_staged_images(tmp_path)]
        assert ids == sorted(ids) and flaky in ids  # retry rounds interleave, still in sample_id order
        assert web.canary.connections == 0

    # verify checks every round's stats against its parquet and downloads.parquet against both.
    checked = verify_downloads(tmp_path, VerifyConfig(min_success_rate=0.0))
    assert checked["failed_by_reason"] == {k: v for k, v in again["failed_by_reason"].items()}
    assert {s["shard"] for s in checked["per_shard"]} >= {"00000", "retry-0001/00000"}

    # The bound on attempts: nothing is tried a third time.
    third = download_selected(tmp_path, DownloadConfig(**{**cfg.to_dict(), "retry_transient": True,
                                                          "max_attempts": 2}))
    assert third["skipped"] is True
    with tarfile.open(layout.staging_dir / "retry-0001" / "00000.tar") as tar:
        assert any(m.name.endswith(".jpg") for m in tar)

    # A downloads.parquet that disagrees with staging is caught.
    tampered = pq.read_table(layout.downloads)
    status = tampered["status"].to_pylist()
    status[flaky] = "failed_to_download"
    tampered = tampered.set_column(tampered.schema.get_field_index("status"), "status", pa.array(status))
    pq.write_table(tampered, layout.downloads)
    with pytest.raises(BuildQualityError, match="disagree"):
        verify_downloads(tmp_path, VerifyConfig(min_success_rate=0.0))
