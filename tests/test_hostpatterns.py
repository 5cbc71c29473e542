from __future__ import annotations

import ipaddress

import pytest

from stockade.errors import InvalidRequest
from stockade.hostpatterns import DEFAULT_PORTS, HostPattern, HostRules, normalise_name, parse_host_pattern

# --- accepted forms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "host", "ports", "canonical"),
    [
        ("github.com", "name", "github.com", DEFAULT_PORTS, "github.com"),
        ("GitHub.COM.", "name", "github.com", DEFAULT_PORTS, "github.com"),
        ("github.com:8443", "name", "github.com", {8443}, "github.com:8443"),
        ("*.github.com", "wildcard", "github.com", DEFAULT_PORTS, "*.github.com"),
        ("*.GitHub.com:22", "wildcard", "github.com", {22}, "*.github.com:22"),
        ("bücher.de", "name", "xn--bcher-kva.de", DEFAULT_PORTS, "xn--bcher-kva.de"),
        ("10.1.2.3", "address", "10.1.2.3", DEFAULT_PORTS, "10.1.2.3"),
        ("10.1.2.3:8080", "address", "10.1.2.3", {8080}, "10.1.2.3:8080"),
        ("192.0.2.0/24", "network", "192.0.2.0/24", DEFAULT_PORTS, "192.0.2.0/24"),
        ("192.0.2.0/24:8080", "network", "192.0.2.0/24", {8080}, "192.0.2.0/24:8080"),
        ("2001:db8::1", "address", "2001:db8::1", DEFAULT_PORTS, "2001:db8::1"),
        ("2001:DB8:0::1", "address", "2001:db8::1", DEFAULT_PORTS, "2001:db8::1"),
        ("[2001:db8::1]", "address", "2001:db8::1", DEFAULT_PORTS, "2001:db8::1"),
        ("[2001:db8::1]:8443", "address", "2001:db8::1", {8443}, "[2001:db8::1]:8443"),
        ("2001:db8::/32", "network", "2001:db8::/32", DEFAULT_PORTS, "2001:db8::/32"),
        ("[2001:db8::/32]:443", "network", "2001:db8::/32", {443}, "[2001:db8::/32]:443"),
        ("x.com:65535", "name", "x.com", {65535}, "x.com:65535"),
        ("x.com:1", "name", "x.com", {1}, "x.com:1"),
    ],
)
def test_accepted(text: str, kind: str, host: str, ports: set[int], canonical: str) -> None:
    pattern = parse_host_pattern(text)
    assert pattern.kind == kind
    assert pattern.host == host
    assert pattern.ports == frozenset(ports)
    assert pattern.text == canonical
    # The canonical text parses back to the same pattern.
    assert parse_host_pattern(pattern.text) == pattern


# --- rejected forms: one per rule, checking the message names it ------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty host pattern"),
        ("*", "bare '*'"),
        ("*.com", "at least two labels after '*.'"),
        ("*.com:443", "at least two labels after '*.'"),
        ("a.*.com", "'*' is only allowed once, as the whole first label"),
        ("**.x.com", "'*' is only allowed once, as the whole first label"),
        ("*x.com", "'*' is only allowed once, as the whole first label"),
        ("https://x.com", "URL scheme"),
        ("x.com/path", "paths are not allowed"),
        ("u@x.com", "user info"),
        ("a..b", "empty label"),
        (".x.com", "empty label"),
        ("a" * 64 + ".com", "label longer than 63"),
        (".".join(["a" * 50] * 5), "longer than 253"),
        ("a_b.com", "characters other than letters, digits and '-'"),
        ("a!b.com", "characters other than letters, digits and '-'"),
        ("-a.com", "starts or ends with '-'"),
        ("a-.com", "starts or ends with '-'"),
        ("x.com:0", "outside 1-65535"),
        ("x.com:65536", "outside 1-65535"),
        ("x.com:http", "non-numeric port"),
        ("x.com:+80", "non-numeric port"),
        ("x.com:", "empty port"),
        (":80", "no host"),
        ("a b.com", "whitespace"),
        (" x.com", "whitespace"),
        ("x.com\n", "whitespace"),
        ("x\x00.com", "NUL"),
        ("x\x01.com", "control character"),
        ("127.1", "looks like a numeric address"),
        ("0x7f.1", "looks like a numeric address"),
        ("1.2.3.4.5", "looks like a numeric address"),
        ("192.0.2.1/24", "host bits set"),
        ("10.0.0.0/33", "invalid prefix length"),
        ("10.0.0.0/x", "invalid prefix length"),
        ("[10.0.0.1]:80", "brackets are only for IPv6"),
        ("[::1", "without a matching ']'"),
        ("::1]", "without a matching '['"),
        ("[::1]x", "junk after ']'"),
        ("2001:db8::1::2", "not a valid IPv6 address"),
        ("[2001:db8::1]:99999", "outside 1-65535"),
        ("x.com?a=b", "looks like a URL"),
    ],
)
def test_rejected(text: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_host_pattern(text)
    assert info.value.field == "allowed_hosts"
    assert fragment in str(info.value), str(info.value)


def test_non_string_rejected() -> None:
    with pytest.raises(InvalidRequest, match="must be a string"):
        parse_host_pattern(42)  # type: ignore[arg-type]


def test_normalise_name() -> None:
    assert normalise_name("API.GitHub.com.") == "api.github.com"
    assert normalise_name("Bücher.DE") == "xn--bcher-kva.de"
    for junk in ("", ".", "a..b", "a b", "x_y.com", "127.0.0.1"):
        with pytest.raises(InvalidRequest):
            normalise_name(junk)


# --- matching ---------------------------------------------------------------------------------------------


def test_wildcard_matching_edges() -> None:
    p = parse_host_pattern("*.github.com")
    assert p.matches_name("api.github.com", 443)
    assert p.matches_name("a.b.github.com", 80)
    assert p.matches_name("API.GitHub.COM.", 443)
    assert not p.matches_name("github.com", 443)
    assert not p.matches_name("evil-github.com", 443)
    assert not p.matches_name("github.com.evil.com", 443)
    assert not p.matches_name("api.github.com", 8080)
    assert not p.matches_name("bad_name.github.com", 443)


def test_name_matching() -> None:
    p = parse_host_pattern("github.com:8443")
    assert p.matches_name("GITHUB.com.", 8443)
    assert not p.matches_name("github.com", 443)
    assert not p.matches_name("api.github.com", 8443)
    assert not p.matches_address(ipaddress.ip_address("10.0.0.1"), 8443)
    idn = parse_host_pattern("bücher.de")
    assert idn.matches_name("BÜCHER.de", 443)
    assert idn.matches_name("xn--bcher-kva.de", 443)


def test_address_matching() -> None:
    a = parse_host_pattern("10.1.2.3:8080")
    assert a.matches_address(ipaddress.ip_address("10.1.2.3"), 8080)
    assert a.matches_address(ipaddress.ip_address("::ffff:10.1.2.3"), 8080)
    assert not a.matches_address(ipaddress.ip_address("10.1.2.4"), 8080)
    assert not a.matches_address(ipaddress.ip_address("10.1.2.3"), 80)
    assert not a.matches_name("10.1.2.3", 8080)
    n = parse_host_pattern("[2001:db8::/32]:443")
    assert n.matches_address(ipaddress.ip_address("2001:db8:1::5"), 443)
    assert not n.matches_address(ipaddress.ip_address("2001:db9::5"), 443)
    assert not n.matches_address(ipaddress.ip_address("10.0.0.1"), 443)
    v4net = parse_host_pattern("192.0.2.0/24")
    assert v4net.matches_address(ipaddress.ip_address("192.0.2.200"), 443)
    assert not v4net.matches_address(ipaddress.ip_address("192.0.3.1"), 443)


def test_host_rules() -> None:
    rules = HostRules(["github.com", "*.github.com:8443", parse_host_pattern("127.0.0.2:8080"), "github.com"])
    assert len(rules) == 3  # duplicates collapse
    hit = rules.match_name("github.com", 443)
    assert isinstance(hit, HostPattern)
    assert hit.text == "github.com"
    assert rules.match_name("github.com", 8443) is None
    hit = rules.match_name("api.github.com", 8443)
    assert hit is not None
    assert hit.text == "*.github.com:8443"
    assert rules.match_name("evil.com", 443) is None
    addr_hit = rules.match_address(ipaddress.ip_address("127.0.0.2"), 8080)
    assert addr_hit is not None
    assert addr_hit.text == "127.0.0.2:8080"
    assert rules.match_address(ipaddress.ip_address("127.0.0.2"), 80) is None
    assert rules.ports_for_name("github.com") == frozenset({80, 443})
    assert rules.ports_for_name("x.github.com") == frozenset({8443})
    assert rules.ports_for_name("nope.com") == frozenset()
    assert rules.ports_for_name("bad name") == frozenset()
    assert HostRules(["github.com"]) == HostRules(["GITHUB.com."])
    assert not HostRules([])


def test_host_rules_rejects_bad_pattern() -> None:
    with pytest.raises(InvalidRequest, match="bare"):
        HostRules(["ok.com", "*"])


@pytest.mark.parametrize("text", ["::ffff:10.0.0.1", "[::ffff:10.0.0.1]:443", "::ffff:10.0.0.0/120"])
def test_ipv4_mapped_rules_are_refused_with_the_ipv4_form(text: str) -> None:
    with pytest.raises(InvalidRequest, match="IPv4-mapped"):
        parse_host_pattern(text)
    # The IPv4 spelling of the same destination is accepted.
    parse_host_pattern("10.0.0.1")
