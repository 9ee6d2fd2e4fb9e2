"""HTTP executor: one request (and, when asked, its redirects), with the response recorded.

Server-side request forgery is stopped at connect time: every address a host name resolves to is
checked (loopback, private, link-local, metadata, … are refused unless allowlisted), and the
connection goes to the address that was checked, so DNS cannot change its answer in between.
Because the check happens where the socket is opened, every spelling of an address (`0x7f000001`,
`2130706433`, `127.1`, `[::ffff:169.254.169.254]`) and every redirect hop goes through it.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import httpcore
import httpx
import msgspec

from executors import Executor, Outcome, Result, RunContext, SpecError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
DEFAULT_TIMEOUT_SECONDS = 30.0
_POLL_SECONDS = 0.05
_ERROR_BODY_CHARS = 500
_STATUS_RANGE_RE = re.compile(r"^([1-5])xx$")
_STATUS_SPAN_RE = re.compile(r"^([1-5][0-9]{2})-([1-5][0-9]{2})$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
_REDACTED_HEADERS = frozenset({"set-cookie", "authorization", "proxy-authorization"})

# Always refused (unless allowlisted), whatever `ipaddress` thinks is global on this Python.
_BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT; also Alibaba's metadata 100.100.100.200
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local; AWS/GCP/Azure metadata 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF assignments; Oracle's metadata 192.0.0.192
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",  # unique local; AWS metadata fd00:ec2::254
        "fe80::/10",
        "ff00::/8",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddressError(Exception):
    """The request would reach an address the HTTP executor may not reach."""


class HttpSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Fields of an HTTP task (the run's limit is the task's `timeout_seconds`)."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    method: Method = "GET"
    headers: dict[str, Annotated[str, msgspec.Meta(max_length=8192)]] = {}
    json: Any | msgspec.UnsetType = msgspec.UNSET
    body: Annotated[str, msgspec.Meta(max_length=1024 * 1024)] | None = None
    expect_status: int | list[int] | str = "2xx"
    follow_redirects: bool = False
    max_redirects: Annotated[int, msgspec.Meta(ge=0, le=20)] = 5
    verify_tls: bool = True


# -- address policy -----------------------------------------------------------------------


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden inside an IPv6 one (mapped, NAT64, 6to4, Teredo), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    # IPv4-compatible (::a.b.c.d, deprecated but still routed by some stacks)
    if int(ip) >> 32 == 0 and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip))
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why `ip` may not be reached (e.g. 'loopback'), or None when it is a public address."""
    for candidate in (ip, _embedded_ipv4(ip)):
        if candidate is None:
            continue
        if candidate.is_loopback:
            return "loopback"
        if candidate.is_link_local:
            return "link-local (cloud metadata)"
        if candidate.is_private or any(candidate in n for n in _BLOCKED_NETWORKS):
            return "private or reserved"
        if candidate.is_multicast or candidate.is_unspecified or not candidate.is_global:
            return "not a public address"
    return None


@dataclass(frozen=True)
class AddressGuard:
    """Resolves a host and decides, per address, whether the executor may connect to it."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    resolver: Callable[..., list[Any]] = field(default=socket.getaddrinfo, compare=False)

    @classmethod
    def from_allowlist(cls, entries: Iterable[str]) -> AddressGuard:
        """Entries are host names, IP addresses or CIDR networks."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().strip("[]").lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(hosts=frozenset(hosts), networks=tuple(networks))

    def allowed_address(self, ip: IPAddress) -> bool:
        embedded = _embedded_ipv4(ip)
        return any(ip in n or (embedded is not None and embedded in n) for n in self.networks)

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of `host` to connect to, all checked; BlockedAddressError otherwise."""
        name = host.strip("[]").lower().rstrip(".")
        addresses = self._lookup(name, port)
        if name in self.hosts:
            return [str(ip) for ip in addresses]
        for ip in addresses:
            reason = forbidden_reason(ip)
            if reason and not self.allowed_address(ip):
                raise BlockedAddressError(
                    f"refused to connect to {ip} for host {host!r}: {reason} addresses are not"
                    " allowed (add the host, address or network to http_allowlist to permit it)"
                )
        return [str(ip) for ip in addresses]

    def _lookup(self, name: str, port: int) -> list[IPAddress]:
        try:
            infos = self.resolver(name, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve host {name!r}: {exc}") from exc
        found: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if ip not in found:
                found.append(ip)
        if not found:
            raise httpcore.ConnectError(f"host {name!r} has no addresses")
        return found


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, but every TCP connection goes to an address the guard checked."""

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in self.guard.resolve(host, port):
            try:
                return self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as exc:  # try the next checked address
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise BlockedAddressError("unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with the guarded backend and no proxies from the environment."""

    def __init__(self, guard: AddressGuard, *, verify: bool) -> None:
        super().__init__(verify=verify, trust_env=False)
        # httpx has no public knob for the network backend; the pool is rebuilt with it.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            network_backend=GuardedBackend(guard),
        )


# -- expected status ----------------------------------------------------------------------


def status_matcher(expect: int | list[int] | str) -> Callable[[int], bool]:
    """A predicate for `expect_status`: a code, a list of codes, `2xx`, or `200-204`."""
    if isinstance(expect, int):
        _check_code(expect)
        return lambda status: status == expect
    if isinstance(expect, list):
        if not expect:
            raise SpecError("expect_status must not be an empty list", field="expect_status")
        for code in expect:
            _check_code(code)
        codes = frozenset(expect)
        return lambda status: status in codes
    return _range_matcher(expect.strip().lower())


def _range_matcher(text: str) -> Callable[[int], bool]:
    match = _STATUS_RANGE_RE.match(text)
    if match:
        low = int(match.group(1)) * 100
        return lambda status: low <= status <= low + 99
    span = _STATUS_SPAN_RE.match(text)
    if span and int(span.group(1)) <= int(span.group(2)):
        low, high = int(span.group(1)), int(span.group(2))
        return lambda status: low <= status <= high
    raise SpecError(
        f"expect_status {text!r} must be a code, a list of codes, a class such as '2xx'"
        " or a span such as '200-204'",
        field="expect_status",
    )


def _check_code(code: int) -> None:
    if isinstance(code, bool) or not 100 <= code <= 599:
        raise SpecError(f"{code!r} is not an HTTP status code", field="expect_status")


# -- the exchange ---------------------------------------------------------------------------


@dataclass
class Exchange:
    """What happened on the wire, for the run log and the `response.json` artifact."""

    hops: list[dict[str, Any]] = field(default_factory=list)
    response: httpx.Response | None = None
    body: bytes = b""
    truncated: bool = False
    elapsed: float = 0.0
    error: BaseException | None = None


def _capped_body(response: httpx.Response, limit: int, ctx: RunContext) -> tuple[bytes, bool]:
    """Read at most `limit` bytes of the (decoded) body; say whether more was left."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit or ctx.cancel_event.is_set():
            break
    data = b"".join(chunks)
    return data[:limit], size > limit


def _perform(client: httpx.Client, spec: HttpSpec, ctx: RunContext, out: Exchange) -> None:
    """Send the request, follow redirects when asked (each hop guarded), read a capped body."""
    started = time.monotonic()
    try:
        request = client.build_request(spec.method, spec.url, **_payload(spec))
        response = client.send(request, stream=True)
        while response.is_redirect and spec.follow_redirects:
            if len(out.hops) >= spec.max_redirects:
                break
            out.hops.append(_hop(response))
            response.close()
            assert response.next_request is not None
            ctx.log(f"[nbcron] following redirect to {response.next_request.url}\n")
            response = client.send(response.next_request, stream=True)
        out.response = response
        limit = ctx.config.http_max_response_bytes
        out.body, out.truncated = _capped_body(response, limit, ctx)
        response.close()
    except BaseException as exc:  # reported by the waiting thread
        out.error = exc
    finally:
        out.elapsed = time.monotonic() - started


def _payload(spec: HttpSpec) -> dict[str, Any]:
    headers = {"accept-encoding": "identity", **spec.headers}
    if spec.json is not msgspec.UNSET:
        return {"headers": headers, "json": spec.json}
    if spec.body is not None:
        return {"headers": headers, "content": spec.body.encode()}
    return {"headers": headers}


def _hop(response: httpx.Response) -> dict[str, Any]:
    return {
        "url": str(response.request.url),
        "status": response.status_code,
        "location": response.headers.get("location"),
    }


class HttpExecutor(Executor):
    kind = "http"
    spec_type = HttpSpec

    def validate(self, spec: Any) -> None:
        _validate_url(spec.url)
        status_matcher(spec.expect_status)
        if spec.json is not msgspec.UNSET and spec.body is not None:
            raise SpecError("give either json or body, not both", field="body")
        for name, value in spec.headers.items():
            if not _HEADER_NAME_RE.match(name):
                raise SpecError(f"header name {name!r} is not valid", field="headers")
            if any(c in value for c in "\r\n\x00"):
                raise SpecError(f"header {name!r} contains a line break", field="headers")

    def execute(self, spec: Any, ctx: RunContext) -> Result:
        guard = AddressGuard.from_allowlist(ctx.config.http_allowlist)
        timeout = ctx.timeout_seconds or DEFAULT_TIMEOUT_SECONDS
        ctx.log(f"[nbcron] {spec.method} {spec.url}\n")
        client = httpx.Client(
            transport=GuardedTransport(guard, verify=spec.verify_tls),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
        )
        out = Exchange()
        worker = threading.Thread(target=_perform, args=(client, spec, ctx, out), daemon=True)
        worker.start()
        stopped = self._wait(worker, ctx, timeout)
        client.close()  # also aborts a request still in flight after a cancel or timeout
        if stopped is not None:
            return stopped
        return self._report(spec, ctx, out)

    def _wait(self, worker: threading.Thread, ctx: RunContext, timeout: float) -> Result | None:
        """Wait for the exchange; a cancel or the run's deadline stops it."""
        deadline = time.monotonic() + timeout
        while worker.is_alive():
            if ctx.cancel_event.wait(_POLL_SECONDS):
                return Result(outcome=Outcome.CANCELLED, error="cancelled")
            if time.monotonic() >= deadline:
                return Result(outcome=Outcome.TIMED_OUT, error=f"timed out after {timeout}s")
        return None

    def _report(self, spec: HttpSpec, ctx: RunContext, out: Exchange) -> Result:
        if out.error is not None:
            return _error_result(out.error, ctx)
        assert out.response is not None
        _log_response(ctx, out)
        ctx.add_artifact("response.json", "application/json", _artifact(spec, out))
        status = out.response.status_code
        if status_matcher(spec.expect_status)(status):
            return Result(outcome=Outcome.SUCCEEDED, exit_code=status)
        return Result(outcome=Outcome.FAILED, exit_code=status, error=_status_error(spec, out))


def _validate_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise SpecError(f"url is not valid: {exc}", field="url") from exc
    if parsed.scheme not in ("http", "https"):
        raise SpecError("url must start with http:// or https://", field="url")
    if not parsed.host:
        raise SpecError("url must name a host", field="url")


def _error_result(error: BaseException, ctx: RunContext) -> Result:
    if isinstance(error, httpx.TimeoutException):
        ctx.log(f"[nbcron] request timed out: {error}\n")
        return Result(outcome=Outcome.TIMED_OUT, error=f"request timed out: {error}")
    if isinstance(error, BlockedAddressError):
        message = str(error)
    else:
        message = f"request failed: {type(error).__name__}: {error}"
    ctx.log(f"[nbcron] {message}\n")
    return Result(outcome=Outcome.FAILED, error=message)


def _header_lines(response: httpx.Response) -> list[tuple[str, str]]:
    return [
        (name, "[redacted]" if name.lower() in _REDACTED_HEADERS else value)
        for name, value in response.headers.multi_items()
    ]


def _log_response(ctx: RunContext, out: Exchange) -> None:
    assert out.response is not None
    response = out.response
    lines = [f"{response.http_version} {response.status_code} {response.reason_phrase}"]
    lines += [f"{name}: {value}" for name, value in _header_lines(response)]
    ctx.log("\n".join(lines) + "\n\n")
    if out.body:
        ctx.log(out.body.decode(response.encoding or "utf-8", errors="replace") + "\n")
    if out.truncated:
        ctx.log(
            f"[nbcron] response body truncated at {len(out.body)} bytes (http_max_response_bytes)\n"
        )
    ctx.log(f"[nbcron] {response.status_code} in {out.elapsed * 1000:.0f} ms\n")


def _artifact(spec: HttpSpec, out: Exchange) -> bytes:
    assert out.response is not None
    response = out.response
    record: dict[str, Any] = {
        "method": spec.method,
        "url": str(response.request.url),
        "status": response.status_code,
        "reason": response.reason_phrase,
        "http_version": response.http_version,
        "headers": [list(item) for item in _header_lines(response)],
        "redirects": out.hops,
        "elapsed_ms": round(out.elapsed * 1000, 1),
        "body_truncated": out.truncated,
    }
    try:
        record["body"] = out.body.decode(response.encoding or "utf-8")
    except (UnicodeDecodeError, LookupError):
        record["body_base64"] = base64.b64encode(out.body).decode()
    return msgspec.json.encode(record)


def _status_error(spec: HttpSpec, out: Exchange) -> str:
    assert out.response is not None
    response = out.response
    text = f"unexpected status {response.status_code} {response.reason_phrase}"
    text += f" (expected {spec.expect_status})"
    if response.is_redirect and not spec.follow_redirects:
        text += f"; redirect to {response.headers.get('location')} not followed"
        text += " (set follow_redirects: true to follow it)"
    snippet = out.body[:_ERROR_BODY_CHARS].decode("utf-8", errors="replace").strip()
    return f"{text}\n{snippet}" if snippet else text
