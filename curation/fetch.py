"""The guarded fetcher: one HTTP(S) GET of an untrusted URL, with an address guard, a size cap, a deadline and a
failure class for everything that can go wrong. The download stage runs it inside img2dataset's workers
(`curation.download_worker`) in place of img2dataset's `urllib.request.urlopen`, which reads `file:` and `data:`
URLs, connects to any address and reads bodies without a cap.

Address guard (SSRF defence, OWASP's standard one):
- only `http` and `https`, on the first URL and on every redirect hop;
- the host is resolved here (numeric forms such as `2130706434`, `0x7f000002`, `0177.0.0.2` and `127.2` are parsed
  the way the C library parses them, without any DNS query), every address is checked, and the socket connects to
  the checked address itself, never to the name again: a DNS answer that changes between check and connect
  (rebinding) cannot redirect it. The peer address of the connected socket is checked once more;
- refused: every address that is not globally routable (loopback, RFC 1918, link-local incl. 169.254.169.254, CGNAT
  100.64.0.0/10, reserved, unspecified, documentation ranges, IPv6 ULA fc00::/7 and link-local fe80::/10, site-local),
  multicast, and IPv4 embedded in IPv6 (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16) when the
  embedded address is refused; `allowed_networks` (CIDRs named by the operator) opens networks explicitly.

The sample proxy: URLs whose host is one of `proxy_hosts` (by default only the embedded sample's reserved host
`cc4m-sample.invalid`) go to the operator-configured `proxy` (the sample server on 127.0.0.1) as proxy requests. That
is safe without opening loopback to the URL list: `.invalid` is reserved (RFC 6761) and never resolves, so such a URL
can only ever reach that proxy, which answers it itself; every other URL, and every redirect away from the proxy host,
goes direct and through the guard.

Caps: at most `max_bytes` of body are read (reading stops there: `too_large`, also when Content-Length announces
more), and the whole fetch, redirects included, ends after `max_seconds` (a watchdog shuts the socket down, so a slow
drip of headers or body cannot hold a worker thread). Bodies above `SPOOL_BYTES` are spooled to a temporary file, so
the memory held by in-flight downloads does not grow with `max_bytes`.

Every failure raises FetchError(reason, detail); `str(err)` is "reason: detail", the form the download stage stores
as img2dataset's error message and parses back (`reason_of`).
"""
from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import re
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # real CC12M images are rarely over 20 MB
DEFAULT_MAX_REDIRECTS = 10  # urllib's and img2dataset's limit
SPOOL_BYTES = 1 << 20  # bodies above this go to a temporary file instead of memory
CHUNK_BYTES = 64 * 1024
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's

# Failure classes. Transient ones may succeed later (a rebuild with download.retry_transient tries them again);
# permanent ones will not. HTTP statuses are "http_<code>" (see is_transient).
TRANSIENT_REASONS = frozenset({
    "timeout", "connection_reset", "connection_refused", "incomplete_body", "dns_error", "network_error", "missing",
    "proxy_unreachable",
})
# Failures of the build's own infrastructure, not of the web: every rerun retries them (download.retry_transient or
# not, whatever the attempts), since a build killed mid-download leaves them behind in finished staging shards.
OWN_FAILURE_REASONS = frozenset({"proxy_unreachable"})
PERMANENT_REASONS = frozenset({
    "blocked_scheme", "blocked_address", "bad_url", "bad_redirect", "redirect_loop", "too_many_redirects",
    "dns_not_found", "tls_error", "bad_response", "robots_disallowed", "too_large", "too_many_pixels", "undecodable",
    "image_too_small", "image_area_too_large", "aspect_ratio_too_large", "other",
})
TRANSIENT_HTTP = frozenset({408, 425, 429})
_REASON_RE = re.compile(r"^(http_\d{3}|[a-z_]+): ")


class FetchError(Exception):
    """A failed fetch. `reason` is a failure class (TRANSIENT_REASONS, PERMANENT_REASONS or http_<code>)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def transient(self) -> bool:
        return is_transient(self.reason)


def is_transient(reason: str) -> bool:
    """Timeouts, resets, 408/425/429 and 5xx may pass on a later try; everything else is permanent."""
    if reason.startswith("http_") and reason[5:].isdigit():
        code = int(reason[5:])
        return code in TRANSIENT_HTTP or 500 <= code <= 599
    return reason in TRANSIENT_REASONS


def reason_of(error_message: str | None) -> str:
    """The failure class at the front of an error message ("too_large: ..."); "other" for foreign messages."""
    match = _REASON_RE.match(error_message or "")
    if match and (match.group(1) in TRANSIENT_REASONS or match.group(1) in PERMANENT_REASONS
                  or match.group(1).startswith("http_")):
        return match.group(1)
    return "other"


# ---------------------------------------------------------------------------------------------------- the policy
def parse_networks(cidrs: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDR strings -> networks; ValueError with the offending entry (host bits set are refused, as a typo guard)."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(str(cidr), strict=True))
        except ValueError as err:
            raise ValueError(f"allowed_networks: {cidr!r} is not a CIDR network ({err})") from None
    return tuple(networks)


@dataclass(frozen=True)
class FetchPolicy:
    allowed_networks: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = 10.0  # per socket operation (connect, each read)
    max_seconds: float = 60.0  # the whole fetch, redirects included
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    proxy: str | None = None  # http://host:port, used only for proxy_hosts
    proxy_hosts: tuple[str, ...] = ()
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = ()
    _networks: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        object.__setattr__(self, "proxy_hosts", tuple(h.lower() for h in self.proxy_hosts))
        object.__setattr__(self, "_networks", parse_networks(self.allowed_networks))
        if self.max_bytes <= 0 or self.timeout <= 0 or self.max_seconds <= 0 or self.max_redirects < 0:
            raise ValueError(f"FetchPolicy: caps must be positive, got {self}")
        for host in self.proxy_hosts:
            if not host.endswith(".invalid"):
                raise ValueError(f"FetchPolicy.proxy_hosts must be reserved .invalid names, got {host!r}")
        if self.proxy is not None:
            parts = urlsplit(self.proxy)
            if parts.scheme != "http" or not parts.hostname or not parts.port:
                raise ValueError(f"FetchPolicy.proxy must be http://host:port, got {self.proxy!r}")


# --------------------------------------------------------------------------------------------------- the addresses
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_refusal(ip: IPAddress, allowed: tuple = ()) -> str | None:
    """Why `ip` may not be contacted (a short category), or None when it may."""
    embedded = _embedded_ipv4(ip)
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a mapped address IS the IPv4 one
        return address_refusal(ip.ipv4_mapped, allowed)
    if embedded is not None:  # NAT64 / 6to4: a gateway would forward to the embedded IPv4 address
        inner = address_refusal(embedded, allowed)
        if inner is not None:
            return f"{inner} (embedded in {ip})"
    if any(ip in net for net in allowed):
        return None
    checks = (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified), ("link-local", ip.is_link_local),
              ("multicast", ip.is_multicast), ("private", ip.is_private), ("reserved", ip.is_reserved),
              ("site-local", ip.version == 6 and ip.is_site_local), ("not globally routable", not ip.is_global))
    return next((name for name, hit in checks if hit), None)


def _numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Numeric IPv4 forms the C library accepts (decimal, hex, octal, short): parsed here, never sent to DNS."""
    if not re.fullmatch(r"[0-9a-fA-FxX.]+", host) or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def resolve(host: str, port: int, resolver: Resolver = system_resolver) -> list[IPAddress]:
    """Addresses of `host`, literal or numeric forms without DNS. IPv4-mapped IPv6 becomes its IPv4 address."""
    try:
        ips = [ipaddress.ip_address(host)]
    except ValueError:
        numeric = _numeric_ipv4(host)
        if numeric is not None:
            ips = [numeric]
        else:
            try:
                ips = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host, port)]
            except socket.gaierror as err:
                gone = err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
                raise FetchError("dns_not_found" if gone else "dns_error", f"{host}: {err}") from None
    return [ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip for ip in ips]


# -------------------------------------------------------------------------------------------------------- the URLs
_PATH_ESCAPE = frozenset(' "#<>`{}')  # WHATWG path percent-encode set (plus controls and non-ASCII)
_QUERY_ESCAPE = frozenset(' "#<>\'')


def _escape(text: str, extra: frozenset[str]) -> str:
    out = []
    for ch in text:
        if ord(ch) <= 0x20 or ord(ch) >= 0x7F or ch in extra:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lower-case, ASCII (IDNA), no brackets
    port: int
    path: str  # path + query, percent-encoded the way browsers do
    url: str  # the normalized absolute URL (no userinfo, no fragment)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 80 if self.scheme == "http" else 443
        return host if self.port == default else f"{host}:{self.port}"


def parse_target(url: str) -> Target:
    """Split and normalize a URL; FetchError(blocked_scheme) for anything but http(s), bad_url for garbage."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError("blocked_scheme", f"scheme {scheme or '(none)'!r} is not http or https")
        host = parts.hostname or ""
        port = parts.port or (80 if scheme == "http" else 443)
    except ValueError as err:
        raise FetchError("bad_url", f"{err}") from None
    if not host:
        raise FetchError("bad_url", "no host")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as err:
        raise FetchError("bad_url", f"host {host!r}: {err}") from None
    path = _escape(parts.path or "/", _PATH_ESCAPE)
    if parts.query:
        path += "?" + _escape(parts.query, _QUERY_ESCAPE)
    target = Target(scheme, host, port, path, "")
    return Target(scheme, host, port, path, f"{scheme}://{target.host_header}{path}")


def normalize_url(url: str) -> str:
    """The URL as a browser would send it (percent-encoded path/query, IDNA host); raises FetchError."""
    return parse_target(url).url


# ------------------------------------------------------------------------------------------------------ deadlines
class _Watch:
    """One fetch's deadline. Every socket the fetch opens (each redirect hop's, the TLS one) is `attach`ed, so the
    watchdog shuts down whichever socket is current when the deadline passes; a socket attached after it passed
    (a slow DNS answer, a connect that outlived it) is refused at once instead of being read without a deadline."""

    __slots__ = ("deadline", "done", "expired", "max_seconds", "sock")

    def __init__(self, deadline: float = float("inf"), max_seconds: float = float("inf")) -> None:
        self.sock: socket.socket | None = None
        self.expired = False
        self.done = False
        self.deadline, self.max_seconds = deadline, max_seconds

    def remaining(self) -> float:
        """Seconds left; raises the fetch's timeout when none are (checked before every blocking step)."""
        left = self.deadline - time.monotonic()
        if self.expired or left <= 0:
            self.expired = True
            raise FetchError("timeout", f"transfer exceeded {self.max_seconds:g}s")
        return left

    def attach(self, sock: socket.socket, timeout: float) -> socket.socket:
        """Watch `sock` from now on; its per-operation timeout never reaches past the deadline. The order matters:
        the watchdog sets `expired` and then reads `sock`, this sets `sock` and then reads `expired`, so one of the
        two always sees the other and a late socket is never left unwatched."""
        self.sock = sock
        try:
            sock.settimeout(min(timeout, self.remaining()))
        except BaseException:
            sock.close()
            raise
        return sock


class _Watchdog:
    """One thread per process: shuts down the socket of any fetch past its deadline (a blocking recv then returns)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, max_seconds: float = float("inf")) -> _Watch:
        entry = _Watch(deadline, max_seconds)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cc4m-fetch-watchdog", daemon=True)
                self._thread.start()
            # Wake the thread only if this deadline comes before the one it sleeps towards: deadlines are mostly
            # increasing (now + max_seconds), so that is rare, and 32 fetch threads do not each force a GIL switch.
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._ids), entry))
            if earliest:
                self._cond.notify()
        return entry

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, entry = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                entry.expired = True
                if entry.sock is not None:
                    try:
                        entry.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


_WATCHDOG = _Watchdog()
_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


# ----------------------------------------------------------------------------------------------------- the fetch
def _connect_checked(target: Target, policy: FetchPolicy, watch: _Watch, resolver: Resolver) -> socket.socket:
    watch.remaining()
    ips = resolve(target.host, target.port, resolver)  # a resolver cannot be interrupted: checked right after it
    refusals = [(ip, address_refusal(ip, policy._networks)) for ip in ips]
    allowed = [ip for ip, why in refusals if why is None]
    if not allowed:
        ip, why = refusals[0]
        raise FetchError("blocked_address", f"{target.host} -> {ip} is {why}")
    last: OSError | None = None
    for ip in allowed:  # the checked address itself, never the name again
        sock = watch.attach(socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                                          socket.SOCK_STREAM), policy.timeout)
        try:
            sock.connect((str(ip), target.port))
        except OSError as err:
            sock.close()
            last = err
            continue
        peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
        why = address_refusal(peer, policy._networks)
        if why is not None:  # cannot happen when connect() honours the address; checked because it is the contract
            sock.close()
            raise FetchError("blocked_address", f"connected peer {peer} is {why}")
        return sock
    assert last is not None
    raise last


def _open(target: Target, policy: FetchPolicy, watch: _Watch, resolver: Resolver) -> http.client.HTTPConnection:
    proxied = policy.proxy is not None and target.scheme == "http" and target.host in policy.proxy_hosts
    if proxied:  # the operator's proxy for reserved .invalid hosts: trusted by configuration, not by the URL list
        proxy = urlsplit(policy.proxy)
        try:
            sock = socket.create_connection((proxy.hostname, proxy.port), timeout=min(policy.timeout,
                                                                                     watch.remaining()))
        except ConnectionRefusedError as err:
            # The build's own proxy is gone (it lives in the build's process: the build was killed). Not the web's
            # answer about this URL: a rerun fetches these rows again (curation.download_rounds).
            raise FetchError("proxy_unreachable", f"the build's proxy {policy.proxy} refused: {err}") from None
        watch.attach(sock, policy.timeout)
    else:
        sock = _connect_checked(target, policy, watch, resolver)
        if target.scheme == "https":
            # The handshake after attaching: the wrapped socket is the one the watchdog can shut down.
            sock = watch.attach(_ssl_context().wrap_socket(sock, server_hostname=target.host,
                                                           do_handshake_on_connect=False), policy.timeout)
            sock.do_handshake()
    conn = http.client.HTTPConnection(target.host, target.port, timeout=policy.timeout)
    conn.sock = sock
    conn.putrequest("GET", target.url if proxied else target.path, skip_host=True, skip_accept_encoding=True)
    agent = USER_AGENT
    if policy.user_agent_token:
        agent += f" (compatible; {policy.user_agent_token}; +https://github.com/rom1504/img2dataset)"
    for name, value in (("Host", target.host_header), ("User-Agent", agent), ("Accept", "*/*"),
                        ("Connection", "close")):
        conn.putheader(name, value)
    conn.endheaders()
    return conn


def _robots_disallowed(headers: http.client.HTTPMessage, policy: FetchPolicy) -> bool:
    """img2dataset's X-Robots-Tag rule: a listed directive, for every agent or for our token, refuses the image."""
    token = (policy.user_agent_token or "").strip().lower() or None
    for value in headers.get_all("X-Robots-Tag") or []:
        parts = value.split(":", 1)
        names = {d.strip().lower() for d in parts[-1].split(",")}
        applies = len(parts) == 1 or parts[0].strip().lower() == token
        if applies and names & set(policy.disallowed_header_directives):
            return True
    return False


def _read_body(resp: http.client.HTTPResponse, policy: FetchPolicy, watch: _Watch) -> IO[bytes]:
    announced = resp.getheader("Content-Length")
    if announced and announced.strip().isdigit() and int(announced) > policy.max_bytes:
        raise FetchError("too_large", f"Content-Length {announced} > cap {policy.max_bytes}")
    body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - returned open, closed on failure
    try:
        total = 0
        while chunk := resp.read1(CHUNK_BYTES):
            total += len(chunk)
            if total > policy.max_bytes:
                raise FetchError("too_large", f"body exceeds cap {policy.max_bytes} bytes (reading stopped)")
            body.write(chunk)
        if watch.expired:
            raise FetchError("timeout", f"transfer exceeded {policy.max_seconds:g}s")
        if resp.length:  # Content-Length promised more than arrived
            raise FetchError("incomplete_body", f"got {total} bytes, {resp.length} more were announced")
    except BaseException:
        body.close()
        raise
    body.seek(0)
    return body


def _exchange(target: Target, policy: FetchPolicy, watch: _Watch, resolver: Resolver) -> tuple[str | None, IO]:
    """One request: (redirect location, None) or (None, body)."""
    conn = _open(target, policy, watch, resolver)
    try:
        resp = conn.getresponse()
        if resp.status in REDIRECT_CODES:
            location = resp.getheader("Location")
            if not location:
                raise FetchError("bad_redirect", f"HTTP {resp.status} without a Location")
            return location, None
        if resp.status != 200:
            raise FetchError(f"http_{resp.status}", f"HTTP Error {resp.status}: {resp.reason}")
        if policy.disallowed_header_directives and _robots_disallowed(resp.headers, policy):
            raise FetchError("robots_disallowed", "use of image disallowed by X-Robots-Tag directive")
        return None, _read_body(resp, policy, watch)
    finally:
        conn.close()


def _classify(err: BaseException, watch: _Watch, policy: FetchPolicy) -> FetchError:
    if isinstance(err, FetchError):
        return err
    if watch.expired:
        return FetchError("timeout", f"transfer exceeded {policy.max_seconds:g}s ({type(err).__name__})")
    name = f"{type(err).__name__}: {err}"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return FetchError("timeout", name)
    if isinstance(err, http.client.IncompleteRead):
        return FetchError("incomplete_body", name)
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        return FetchError("tls_error", name)
    if isinstance(err, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return FetchError("connection_reset", name)  # includes http.client.RemoteDisconnected
    if isinstance(err, ConnectionRefusedError):
        return FetchError("connection_refused", name)
    if isinstance(err, http.client.HTTPException):
        return FetchError("bad_response", name)
    if isinstance(err, OSError):
        return FetchError("network_error", name)
    if isinstance(err, (UnicodeError, ValueError)):
        return FetchError("bad_url", name)
    return FetchError("other", name)


def fetch(url: str, policy: FetchPolicy, resolver: Resolver = system_resolver) -> IO[bytes]:
    """GET `url` under `policy`; return the body as a readable binary file (at position 0); raise FetchError."""
    watch = _WATCHDOG.watch(time.monotonic() + policy.max_seconds, policy.max_seconds)
    seen: set[str] = set()
    try:
        for _ in range(policy.max_redirects + 1):
            target = parse_target(url)
            if target.url in seen:
                raise FetchError("redirect_loop", f"{target.url} was already visited")
            seen.add(target.url)
            location, body = _exchange(target, policy, watch, resolver)
            if body is not None:
                return body
            url = urljoin(target.url, location)
        raise FetchError("too_many_redirects", f"more than {policy.max_redirects} redirects")
    except Exception as err:  # noqa: BLE001 - every failure becomes a classified FetchError
        raise _classify(err, watch, policy) from None
    finally:
        watch.done = True
