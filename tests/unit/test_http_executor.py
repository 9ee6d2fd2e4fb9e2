"""HTTP executor units: the address policy, the resolver guard, expected statuses, field checks."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from unittest import mock

import msgspec
import pytest

from executors import ExecutorConfig, Outcome, RunContext, SpecError, get_executor
from executors.http import (
    AddressGuard,
    BlockedAddressError,
    GuardedBackend,
    forbidden_reason,
    status_matcher,
)

FORBIDDEN = [
    "127.0.0.1",
    "127.255.255.254",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # AWS/GCP/Azure metadata
    "100.100.100.200",  # Alibaba metadata
    "192.0.0.192",  # Oracle metadata
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "fe80::1",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "::127.0.0.1",  # IPv4-compatible
]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d822::"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


SPELLINGS = [
    "0x7f000001",
    "2130706433",
    "127.1",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "localhost",
    "LOCALHOST.",
    "169.254.169.254",
    "0xa9fea9fe",
    "2852039166",
    "::ffff:169.254.169.254",
    "[::ffff:169.254.169.254]",
    "::ffff:a9fe:a9fe",
    "[::1]",
]


@pytest.mark.parametrize("host", SPELLINGS)
def test_every_spelling_resolves_to_a_refused_address(host: str) -> None:
    """The real resolver (inet_aton rules, /etc/hosts) turns each spelling into its address."""
    with pytest.raises(BlockedAddressError, match="http_allowlist"):
        AddressGuard.from_allowlist([]).resolve(host, 80)


def test_allowlist_takes_hosts_addresses_and_networks() -> None:
    guard = AddressGuard.from_allowlist(["127.0.0.0/8", " Internal.Example. ", "::1", ""])
    assert guard.resolve("0x7f000001", 80) == ["127.0.0.1"]
    assert guard.resolve("[::1]", 80) == ["::1"]
    assert guard.hosts == frozenset({"internal.example"})
    with pytest.raises(BlockedAddressError):
        guard.resolve("10.0.0.1", 80)
    only_one = AddressGuard.from_allowlist(["127.0.0.2"])
    with pytest.raises(BlockedAddressError):
        only_one.resolve("127.0.0.1", 80)


def _resolver(table: dict[str, list[str]]) -> Any:
    def resolve(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]

    return resolve


def test_a_name_is_refused_when_any_of_its_addresses_is_private() -> None:
    table = {"mixed.example": ["93.184.216.34", "10.0.0.5"], "good.example": ["93.184.216.34"]}
    guard = AddressGuard(resolver=_resolver(table))
    with pytest.raises(BlockedAddressError, match=r"10\.0\.0\.5"):
        guard.resolve("mixed.example", 443)
    assert guard.resolve("good.example", 443) == ["93.184.216.34"]
    allowed_name = AddressGuard(hosts=frozenset({"mixed.example"}), resolver=_resolver(table))
    assert allowed_name.resolve("mixed.example", 443) == ["93.184.216.34", "10.0.0.5"]


def test_the_connection_goes_to_the_checked_address_not_the_name() -> None:
    """No second DNS lookup between check and connect: DNS rebinding has no window."""
    guard = AddressGuard(resolver=_resolver({"rebind.example": ["93.184.216.34"]}))
    backend = GuardedBackend(guard)
    with mock.patch.object(backend, "inner") as inner:
        backend.connect_tcp("rebind.example", 443, timeout=1.0)
    inner.connect_tcp.assert_called_once()
    assert inner.connect_tcp.call_args.args[:2] == ("93.184.216.34", 443)


def test_a_refused_address_fails_the_run_without_connecting() -> None:
    executor = get_executor("http")
    spec = executor.parse_spec({"url": "http://169.254.169.254/latest/meta-data/"})
    logs: list[str] = []
    ctx = RunContext(run_id=1, task_name="t", log=logs.append, config=ExecutorConfig())
    with mock.patch("socket.create_connection") as connect:
        result = executor.run(spec, ctx)
    connect.assert_not_called()
    assert result.outcome is Outcome.FAILED
    assert result.error and "refused to connect to 169.254.169.254" in result.error
    assert "refused" in "".join(logs)


@pytest.mark.parametrize(
    ("expect", "yes", "no"),
    [
        (200, [200], [201, 404]),
        ([200, 204], [200, 204], [201]),
        ("2xx", [200, 204, 299], [199, 300, 404]),
        ("4XX", [400, 404, 499], [200, 500]),
        ("200-204", [200, 202, 204], [205, 199]),
    ],
)
def test_expect_status_forms(expect: Any, yes: list[int], no: list[int]) -> None:
    matches = status_matcher(expect)
    assert all(matches(code) for code in yes)
    assert not any(matches(code) for code in no)


@pytest.mark.parametrize("bad", ["2xy", "6xx", "204-200", "", 99, 600, True, [], [200, 1000]])
def test_bad_expect_status_names_the_field(bad: Any) -> None:
    with pytest.raises(SpecError) as err:
        status_matcher(bad)
    assert err.value.field == "expect_status"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"url": "ftp://example.org/"}, "url"),
        ({"url": "http:///nohost"}, "url"),
        ({"url": "http://example.org/", "json": {}, "body": ""}, "body"),
        ({"url": "http://example.org/", "headers": {"X-A": "a\r\nInjected: 1"}}, "headers"),
        ({"url": "http://example.org/", "headers": {"bad name": "x"}}, "headers"),
        ({"url": "http://example.org/", "method": "get"}, "method"),
        ({"url": "http://example.org/", "max_redirects": 50}, "max_redirects"),
        ({"url": "http://example.org/", "timeout_seconds": 5}, "timeout_seconds"),
    ],
)
def test_spec_errors_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        get_executor("http").parse_spec(fields)
    assert err.value.field == field


def test_json_null_is_a_body_and_absent_json_is_none() -> None:
    executor = get_executor("http")
    with_null = executor.parse_spec({"url": "http://example.org/", "json": None})
    assert with_null.json is None  # type: ignore[attr-defined]
    absent = executor.parse_spec({"url": "http://example.org/"})
    assert msgspec.to_builtins(absent).get("json", "absent") == "absent"
