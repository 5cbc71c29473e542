"""The gateway's decisions: may this name, or this resolved address, be reached on this port?

Semantics (design.md section 4):

- ``deny``: nothing.
- ``limited``: a name must match a name or wildcard rule on that port. The address it resolves to must be
  public, unless an address or network rule allows that very address and port. Connecting by IP literal needs
  an address or network rule.
- ``unrestricted``: any public destination, by name or literal; a non-public one only through an explicit
  address or network rule.

Decisions carry either the text of the rule that allowed the connection or a short machine-readable reason.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from stockade.errors import InvalidRequest
from stockade.gateway.addresses import classify
from stockade.hostpatterns import HostPattern, HostRules, IPAddress, normalise_name

__all__ = ["Decision", "GatewayPolicy", "Mode"]

Mode = Literal["deny", "unrestricted", "limited"]

UNRESTRICTED_RULE = "unrestricted"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None = None  # set when allowed: the rule's canonical text (or "unrestricted")
    reason: str | None = None  # set when refused: e.g. "not_in_allowlist", "port_not_allowed", "loopback"
    # When a name rule admitted the name and an address rule admitted its non-public address, both count.
    address_rule: str | None = None

    @property
    def label(self) -> str:
        return (self.rule if self.allowed else self.reason) or ""

    @classmethod
    def allow(cls, rule: str) -> Decision:
        return cls(True, rule=rule)

    @classmethod
    def refuse(cls, reason: str) -> Decision:
        return cls(False, reason=reason)


class GatewayPolicy:
    """An immutable policy; swap the whole object to change the rules."""

    __slots__ = ("mode", "public_overrides", "rules")

    def __init__(
        self,
        mode: Mode,
        rules: HostRules | Iterable[HostPattern | str] = (),
        *,
        public_overrides: Iterable[IPAddress] = (),
    ) -> None:
        if mode not in ("deny", "unrestricted", "limited"):
            raise InvalidRequest(f"unknown network mode {mode!r}", field="mode")
        self.rules = rules if isinstance(rules, HostRules) else HostRules(rules)
        # Test-only: addresses treated as public (e.g. a fake upstream on 127.0.0.2), so that name rules can
        # be exercised against loopback listeners while IP literals still need an explicit rule.
        self.public_overrides: frozenset[IPAddress] = frozenset(public_overrides)
        # A limited policy with no rules is the documented spelling of deny-all.
        self.mode: Mode = "deny" if mode == "limited" and not self.rules else mode

    @classmethod
    def deny(cls) -> GatewayPolicy:
        return cls("deny")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GatewayPolicy:
        """Accept the wire shape ``{"mode": "limited", "allowed_hosts": [...]}`` (or unrestricted / deny)."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("a network policy must be a JSON object", field="policy")
        mode = data.get("mode")
        hosts = data.get("allowed_hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise InvalidRequest("must be a list of strings", field="allowed_hosts")
        if mode not in ("deny", "unrestricted", "limited"):
            raise InvalidRequest(f"unknown network mode {mode!r}", field="mode")
        return cls(mode, hosts)

    def with_public_overrides(self, addrs: Iterable[IPAddress]) -> GatewayPolicy:
        """The same rules, with ``addrs`` classified as public (test fixtures only)."""
        return GatewayPolicy(self.mode, self.rules, public_overrides=addrs)

    def _unsafe(self, addr: IPAddress) -> str | None:
        return None if addr in self.public_overrides else classify(addr)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "allowed_hosts": [p.text for p in self.rules]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GatewayPolicy) and (self.mode, self.rules) == (other.mode, other.rules)

    def __hash__(self) -> int:
        return hash((self.mode, self.rules))

    def __repr__(self) -> str:
        return f"GatewayPolicy({self.mode!r}, {self.rules!r})"

    def decide_dns(self, name: str) -> Decision:
        """Whether the DNS stub answers for ``name``: it may be reached on at least one port."""
        if self.mode == "deny":
            return Decision.refuse("deny_all")
        try:
            normalise_name(name)
        except InvalidRequest:
            return Decision.refuse("invalid_name")
        if self.mode == "unrestricted":
            return Decision.allow(UNRESTRICTED_RULE)
        hit = self.rules.match_name_any_port(name)
        if hit is None:
            return Decision.refuse("not_in_allowlist")
        return Decision.allow(hit.text)

    def decide_name(self, name: str, port: int) -> Decision:
        if self.mode == "deny":
            return Decision.refuse("deny_all")
        try:
            normalise_name(name)
        except InvalidRequest:
            return Decision.refuse("invalid_name")
        if not 1 <= port <= 65535:
            return Decision.refuse("invalid_port")
        if self.mode == "unrestricted":
            return Decision.allow(UNRESTRICTED_RULE)
        hit = self.rules.match_name(name, port)
        if hit is not None:
            return Decision.allow(hit.text)
        if self.rules.ports_for_name(name):
            return Decision.refuse("port_not_allowed")
        return Decision.refuse("not_in_allowlist")

    def decide_address(
        self,
        name: str | None,
        addr: IPAddress,
        port: int,
        rule: HostPattern | str | None = None,
    ) -> Decision:
        """Decide a concrete destination.

        ``name`` is the name it was resolved from (None for an IP literal); ``rule`` is the name rule that
        admitted the name, when the caller already has it (otherwise the name is decided again here).
        """
        if self.mode == "deny":
            return Decision.refuse("deny_all")
        if not 1 <= port <= 65535:
            return Decision.refuse("invalid_port")
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            return Decision.refuse("link_local")
        explicit = self.rules.match_address(addr, port)
        if name is None:
            if explicit is not None:
                return Decision.allow(explicit.text)
            unsafe = self._unsafe(addr)
            if unsafe is not None:
                return Decision.refuse(unsafe)
            if self.mode == "unrestricted":
                return Decision.allow(UNRESTRICTED_RULE)
            if any(p.matches_address(addr, q) for p in self.rules.patterns for q in p.ports):
                return Decision.refuse("port_not_allowed")
            return Decision.refuse("ip_literal_not_allowed")
        name_rule: str
        if rule is None:
            by_name = self.decide_name(name, port)
            if not by_name.allowed:
                return by_name
            name_rule = by_name.rule or ""
        else:
            name_rule = rule.text if isinstance(rule, HostPattern) else rule
            # The caller's rule may come from an older policy: make sure this one still admits the name.
            by_name = self.decide_name(name, port)
            if not by_name.allowed:
                return by_name
        unsafe = self._unsafe(addr)
        if unsafe is None:
            return Decision.allow(name_rule)
        if explicit is not None:
            return Decision(True, rule=name_rule, address_rule=explicit.text)
        return Decision.refuse(unsafe)
