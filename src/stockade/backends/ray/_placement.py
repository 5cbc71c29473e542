"""Where a session may run: spec labels -> a Ray label selector for the session's placement group.

Ray places every session (a one-bundle placement group holding one ``stockade_slots`` unit); these pure
functions only say which nodes are *allowed*. Labels under ``stockade.ray/`` are read here; a key there that is
not one of these is refused, so a typo cannot silently drop a constraint:

``stockade.ray/node``
    Pin (node affinity): a node id (hex, as Ray prints it) or a node IP; several separated by commas.
``stockade.ray/spread``
    Spread (anti-affinity): a group name; no two live sessions of one group share a node.
``stockade.ray/select.<key>``
    A Ray node-label selector for label ``<key>`` (set with ``ray start --labels``), e.g.
    ``stockade.ray/select.zone: "in(a,b)"`` or ``"!spot"``.

Every other label is the caller's own and is passed to the node backend unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ...errors import InvalidRequest, LifecycleError

__all__ = [
    "NODE_LABEL",
    "SELECT_PREFIX",
    "SPREAD_LABEL",
    "NodeView",
    "PlacementRequest",
    "allowed_nodes",
    "label_selector",
    "parse_placement",
    "without_gone_pins",
]

LABEL_PREFIX = "stockade.ray/"
NODE_LABEL = LABEL_PREFIX + "node"
SPREAD_LABEL = LABEL_PREFIX + "spread"
SELECT_PREFIX = LABEL_PREFIX + "select."
NODE_ID_KEY = "ray.io/node-id"

_NODE_ID_RE = re.compile(r"^[0-9a-f]{56}\Z")
_VALUE = r"[A-Za-z0-9][A-Za-z0-9._/-]*"
_SELECTOR_VALUE_RE = re.compile(rf"^(!?{_VALUE}|!?in\(\s*{_VALUE}(\s*,\s*{_VALUE})*\s*\))\Z")


@dataclass(frozen=True)
class NodeView:
    """What the driver knows of one node: identity, whether it takes sessions, and its Ray labels."""

    node_id: str
    ip: str
    alive: bool = True
    slots: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    usable: bool = True
    """False when the node's agent could not open the node backend (see its ``problem``)."""
    problem: str | None = None

    @property
    def short(self) -> str:
        return f"{self.node_id[:12]} ({self.ip})"


@dataclass(frozen=True)
class PlacementRequest:
    """The placement constraints a spec's labels ask for."""

    pin: tuple[str, ...] = ()
    spread: str | None = None
    select: Mapping[str, str] = field(default_factory=dict)

    @property
    def constrained(self) -> bool:
        return bool(self.pin or self.spread or self.select)


def parse_placement(labels: Mapping[str, str]) -> PlacementRequest:
    """Read the ``stockade.ray/`` labels; raise ``InvalidRequest`` for an unknown key or a bad value."""
    pin: tuple[str, ...] = ()
    spread: str | None = None
    select: dict[str, str] = {}
    for key, value in labels.items():
        if not key.startswith(LABEL_PREFIX):
            continue
        field_name = f"labels.{key}"
        if key == NODE_LABEL:
            pin = tuple(part.strip() for part in value.split(",") if part.strip())
            if not pin:
                raise InvalidRequest("must name at least one node id or IP", field=field_name)
        elif key == SPREAD_LABEL:
            if not value.strip():
                raise InvalidRequest("must be a non-empty group name", field=field_name)
            spread = value.strip()
        elif key.startswith(SELECT_PREFIX) and len(key) > len(SELECT_PREFIX):
            node_key = key[len(SELECT_PREFIX):]
            if node_key == NODE_ID_KEY:
                raise InvalidRequest(f"use {NODE_LABEL} to pin a node", field=field_name)
            if not _SELECTOR_VALUE_RE.match(value.strip()):
                raise InvalidRequest(
                    "must be a Ray label selector value such as 'v', '!v', 'in(a,b)' or '!in(a,b)' "
                    f"(got {value!r})",
                    field=field_name,
                )
            select[node_key] = value.strip()
        else:
            known = ", ".join((NODE_LABEL, SPREAD_LABEL, SELECT_PREFIX + "<key>"))
            raise InvalidRequest(f"is not a known placement label; known: {known}", field=field_name)
    return PlacementRequest(pin=pin, spread=spread, select=select)


def _resolve_pin(pin: Iterable[str], nodes: Mapping[str, NodeView]) -> set[str]:
    wanted: set[str] = set()
    for item in pin:
        if _NODE_ID_RE.match(item):
            matches = [item] if item in nodes else []
        else:
            matches = [n.node_id for n in nodes.values() if n.ip == item]
        if not matches:
            raise LifecycleError(
                f"{NODE_LABEL}={item!r}: no live node of the cluster has that id or IP "
                f"(live: {', '.join(n.short for n in nodes.values()) or 'none'})"
            )
        wanted.update(matches)
    return wanted


def without_gone_pins(request: PlacementRequest, nodes: Mapping[str, NodeView]) -> PlacementRequest:
    """``request`` minus pins that name no live node: a session brought back after its node died goes elsewhere
    rather than nowhere. Pins that still match are kept."""
    live = {nid: n for nid, n in nodes.items() if n.alive}
    kept = tuple(p for p in request.pin if (p in live) if _NODE_ID_RE.match(p)) + tuple(
        p for p in request.pin if not _NODE_ID_RE.match(p) and any(n.ip == p for n in live.values())
    )
    return PlacementRequest(pin=kept, spread=request.spread, select=request.select)


def allowed_nodes(
    request: PlacementRequest,
    nodes: Mapping[str, NodeView],
    group_nodes: Iterable[str] = (),
    avoid: Iterable[str] = (),
) -> set[str] | None:
    """The node ids a session may land on, or None when any node will do (Ray then picks freely).

    ``nodes`` are the live nodes that declare slots; ``group_nodes`` hold a live session of the spread group;
    ``avoid`` are nodes to keep off (a node the session was just lost on). Raises ``LifecycleError`` naming
    the reason when no node is left.
    """
    live = {nid: n for nid, n in nodes.items() if n.alive and n.slots > 0}
    usable = {nid for nid, n in live.items() if n.usable}
    allowed = set(usable)
    narrowed = len(usable) != len(live)
    if request.pin:
        allowed &= _resolve_pin(request.pin, live)
        narrowed = True
        if not allowed:
            bad = "; ".join(f"{live[n].short}: {live[n].problem}" for n in _resolve_pin(request.pin, live))
            raise LifecycleError(f"the pinned node cannot host sessions: {bad}")
    avoid = set(avoid)
    if avoid & allowed:
        allowed -= avoid
        narrowed = True
    if request.spread is not None:
        taken = set(group_nodes) & allowed
        if taken:
            allowed -= taken
            narrowed = True
        if not allowed:
            raise LifecycleError(
                f"{SPREAD_LABEL}={request.spread!r}: every node that may host this session already holds a "
                "session of the group; terminate one or add nodes"
            )
    if not allowed:
        raise LifecycleError("no live node of the Ray cluster can host sessions (none declares free "
                             "stockade_slots with a working node backend)")
    return allowed if narrowed else None


def label_selector(request: PlacementRequest, allowed: set[str] | None) -> dict[str, str]:
    """The Ray ``bundle_label_selector`` entry for the session's one bundle (empty: no constraint)."""
    selector = dict(request.select)
    if allowed is not None:
        selector[NODE_ID_KEY] = f"in({','.join(sorted(allowed))})"
    return selector
