"""The ray backend's pure parts, without a cluster: placement labels, the snapshot store, node command lines,
option checks and the ``stockade ray`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stockade import InvalidRequest, LifecycleError
from stockade.backends.ray._nodes import MIN_OBJECT_STORE_BYTES, SLOT_RESOURCE, NodeOptions, node_argv, node_env
from stockade.backends.ray._placement import (
    NodeView,
    PlacementRequest,
    allowed_nodes,
    label_selector,
    parse_placement,
    without_gone_pins,
)
from stockade.backends.ray._snapstore import SnapshotStore, local_snapshot_dir
from stockade.cli import main

A, B, C = "a" * 56, "b" * 56, "c" * 56
NODES = {
    A: NodeView(A, "10.0.0.1", True, 4),
    B: NodeView(B, "10.0.0.2", True, 4),
    C: NodeView(C, "10.0.0.3", True, 4),
}

# ---------------------------------------------------------------------------------------------- placement


def test_labels_outside_the_prefix_are_the_callers_own() -> None:
    assert parse_placement({"team": "x", "stockade.conformance": "y"}) == PlacementRequest()
    assert not PlacementRequest().constrained


def test_placement_labels_are_read() -> None:
    request = parse_placement({
        "stockade.ray/node": f"{A}, 10.0.0.2",
        "stockade.ray/spread": "replicas",
        "stockade.ray/select.zone": "in(a, b)",
    })
    assert request.pin == (A, "10.0.0.2") and request.spread == "replicas"
    assert request.select == {"zone": "in(a, b)"} and request.constrained


@pytest.mark.parametrize(
    ("labels", "rule"),
    [
        ({"stockade.ray/nodes": "x"}, "not a known placement label"),
        ({"stockade.ray/node": " , "}, "at least one node"),
        ({"stockade.ray/spread": " "}, "non-empty group"),
        ({"stockade.ray/select.zone": "in(a,"}, "label selector"),
        ({"stockade.ray/select.zone": "!!a"}, "label selector"),
        ({"stockade.ray/select.ray.io/node-id": A}, "to pin a node"),
        ({"stockade.ray/select.": "a"}, "not a known placement label"),
    ],
)
def test_bad_placement_labels_are_refused_with_the_field(labels: dict[str, str], rule: str) -> None:
    with pytest.raises(InvalidRequest, match=rule) as info:
        parse_placement(labels)
    assert info.value.field == f"labels.{next(iter(labels))}"


def test_no_constraint_lets_ray_pick_freely() -> None:
    assert allowed_nodes(PlacementRequest(), NODES) is None
    assert label_selector(PlacementRequest(), None) == {}


def test_pin_by_id_and_by_ip() -> None:
    assert allowed_nodes(PlacementRequest(pin=(A,)), NODES) == {A}
    assert allowed_nodes(PlacementRequest(pin=("10.0.0.2", C)), NODES) == {B, C}
    assert label_selector(PlacementRequest(pin=(A,)), {B, A}) == {"ray.io/node-id": f"in({A},{B})"}


def test_pin_to_a_node_that_is_not_live_is_refused() -> None:
    with pytest.raises(LifecycleError, match="no live node"):
        allowed_nodes(PlacementRequest(pin=("10.9.9.9",)), NODES)
    dead = {**NODES, C: NodeView(C, "10.0.0.3", False, 4)}
    with pytest.raises(LifecycleError, match="no live node"):
        allowed_nodes(PlacementRequest(pin=(C,)), dead)


def test_spread_excludes_nodes_holding_the_group_until_none_is_left() -> None:
    request = PlacementRequest(spread="g")
    assert allowed_nodes(request, NODES, group_nodes=[A]) == {B, C}
    # Admitted sibling: a group with no session yet may go anywhere.
    assert allowed_nodes(request, NODES, group_nodes=[]) is None
    with pytest.raises(LifecycleError, match="already holds a session of the group"):
        allowed_nodes(request, NODES, group_nodes=[A, B, C])


def test_unusable_nodes_and_slotless_nodes_are_kept_out() -> None:
    nodes = {**NODES, B: NodeView(B, "10.0.0.2", True, 4, usable=False, problem="no bwrap"),
             C: NodeView(C, "10.0.0.3", True, 0)}
    assert allowed_nodes(PlacementRequest(), nodes) == {A}
    with pytest.raises(LifecycleError, match="no bwrap"):
        allowed_nodes(PlacementRequest(pin=(B,)), nodes)
    with pytest.raises(LifecycleError, match="no live node"):
        allowed_nodes(PlacementRequest(), {B: nodes[B]})


def test_avoid_and_selector_combine() -> None:
    request = PlacementRequest(select={"zone": "a"})
    assert allowed_nodes(request, NODES, avoid=[A]) == {B, C}
    assert label_selector(request, {B}) == {"zone": "a", "ray.io/node-id": f"in({B})"}
    assert label_selector(request, None) == {"zone": "a"}


def test_pins_to_gone_nodes_are_dropped_for_a_comeback() -> None:
    request = PlacementRequest(pin=("10.0.0.9", B), spread="g")
    kept = without_gone_pins(request, NODES)
    assert kept.pin == (B,) and kept.spread == "g"
    assert without_gone_pins(PlacementRequest(pin=("10.0.0.9",)), NODES).pin == ()


# ------------------------------------------------------------------------------------------ snapshot store


def _snapshot(tmp_path: Path, snapshot_id: str) -> Path:
    source = tmp_path / "local" / snapshot_id
    source.mkdir(parents=True)
    (source / "archive.tar.gz").write_bytes(b"archive-bytes")
    (source / "manifest.json").write_text(json.dumps({"snapshot_id": snapshot_id}))
    return source


@pytest.mark.parametrize("kind", ["directory", "file-url", "memory-url"])
def test_store_round_trip(tmp_path: Path, kind: str) -> None:
    location = {
        "directory": str(tmp_path / "store"),
        "file-url": f"file://{tmp_path}/store",
        "memory-url": f"memory://stockade-test-{tmp_path.name}",
    }[kind]
    if kind != "directory":
        pytest.importorskip("fsspec", reason="fsspec is not installed: pip install 'stockade[ray]'")
    store = SnapshotStore(location)
    source = _snapshot(tmp_path, "s1-abc")
    assert not store.exists("s1-abc")
    target = tmp_path / "node2" / "snapshots" / "s1-abc"
    assert store.fetch("s1-abc", target) is False and not target.exists()
    store.put("s1-abc", source)
    assert store.exists("s1-abc")
    assert store.fetch("s1-abc", target) is True
    assert (target / "archive.tar.gz").read_bytes() == b"archive-bytes"
    assert json.loads((target / "manifest.json").read_text()) == {"snapshot_id": "s1-abc"}
    assert store.fetch("s1-abc", target) is True  # already there: nothing changes
    store.delete("s1-abc")
    assert not store.exists("s1-abc")


def test_store_refuses_bad_locations_and_ids(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="absolute path or a URL"):
        SnapshotStore("relative/dir")
    with pytest.raises(InvalidRequest):
        SnapshotStore("")
    store = SnapshotStore(str(tmp_path))
    with pytest.raises(InvalidRequest):
        store.exists("../escape")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LifecycleError, match="manifest"):
        store.put("s2", empty)


def test_local_snapshot_dir_uses_the_backends_store(tmp_path: Path) -> None:
    from stockade.backends.bwrap import BwrapBackend

    backend = BwrapBackend(tmp_path / "state")
    assert local_snapshot_dir(backend, "x1") == tmp_path / "state" / "snapshots" / "x1"
    assert local_snapshot_dir(object(), "x1") is None


# ---------------------------------------------------------------------------------------------- node start


def test_head_and_worker_command_lines() -> None:
    head = node_argv(NodeOptions(slots=8, node_ip="10.1.1.1", labels={"zone": "a"}, block=True), python="py")
    assert head[:4] == ["py", "-m", "ray.scripts.scripts", "start"]
    assert "--head" in head and "--include-dashboard=false" in head and "--block" in head
    assert f"--resources={json.dumps({SLOT_RESOURCE: 8})}" in head
    assert "--node-ip-address=10.1.1.1" in head and '--labels={"zone": "a"}' in head
    assert f"--object-store-memory={MIN_OBJECT_STORE_BYTES}" in head
    worker = node_argv(NodeOptions(slots=2, address="10.1.1.1:6379", fixed_agent_ports=True), python="py")
    assert "--address=10.1.1.1:6379" in worker and "--head" not in worker and "--block" not in worker
    assert "--dashboard-agent-grpc-port=52366" in worker


def test_node_options_are_checked() -> None:
    with pytest.raises(InvalidRequest, match="slots"):
        NodeOptions(slots=-1)
    with pytest.raises(InvalidRequest, match="Ray's minimum"):
        NodeOptions(slots=1, object_store_bytes=1000)
    with pytest.raises(InvalidRequest, match="head"):
        NodeOptions(slots=1, address="h:1", system_config={"x": 1})


def test_node_env_carries_the_state_dir() -> None:
    env = node_env(NodeOptions(slots=1, state_dir="/srv/state"), base={"PATH": "/bin"})
    assert env["STOCKADE_STATE_DIR"] == "/srv/state" and env["PATH"] == "/bin"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


# ----------------------------------------------------------------------------------------------- backend


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"placement_timeout": 0}, "placement_timeout"),
        ({"probe_interval": -1}, "probe_interval"),
        ({"probe_timeout": True}, "probe_timeout"),
        ({"node_backend": "ray"}, "node_backend"),
        ({"snapshot_store": "not/absolute"}, "snapshot_store"),
    ],
)
def test_bad_options_are_refused_before_connecting(options: dict[str, object], field: str) -> None:
    pytest.importorskip("ray", reason="ray is not installed: pip install 'stockade[ray]'")
    from stockade.backends.ray import RayBackend

    with pytest.raises(InvalidRequest) as info:
        RayBackend("10.255.255.1:6379", **options)  # type: ignore[arg-type]
    assert info.value.field == field


def test_registered_under_its_name() -> None:
    pytest.importorskip("ray", reason="ray is not installed: pip install 'stockade[ray]'")
    from stockade.backends.ray import RayBackend
    from stockade.registry import backend_class

    assert backend_class("ray") is RayBackend


# ------------------------------------------------------------------------------------------------- CLI


def test_ray_up_prints_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ray", "up", "--head", "--slots", "5", "--state-dir", "/srv/s", "--label", "zone=b",
                 "--print"]) == 0
    line = capsys.readouterr().out
    assert "STOCKADE_STATE_DIR=/srv/s" in line and "--head" in line and '"stockade_slots": 5' in line
    assert "--block" in line and "zone" in line


def test_ray_up_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ray", "up", "--slots", "2", "--print"]) == 125  # neither --head nor --address
    assert main(["ray", "up", "--head", "--slots", "-3", "--print"]) == 125
    assert main(["ray", "up", "--head", "--slots", "1", "--label", "novalue", "--print"]) == 125
    assert "KEY=VALUE" in capsys.readouterr().err


def test_capabilities_without_nodes_claim_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """No node answers: every flag is false, the private_* ones too (their model default is true), while one
    node's flags pass through (the admitted sibling)."""
    pytest.importorskip("ray", reason="ray is not installed: pip install 'stockade[ray]'")
    from stockade import SandboxCapabilities
    from stockade.backends.ray import RayBackend

    backend = RayBackend.__new__(RayBackend)  # not connected: capabilities() reads only node_capabilities()
    monkeypatch.setattr(backend, "node_capabilities", dict)
    assert not any(backend.capabilities().to_json().values())
    one = SandboxCapabilities(filesystem_isolation=True)
    monkeypatch.setattr(backend, "node_capabilities", lambda: {"n1": one})
    assert backend.capabilities() == one and backend.capabilities().private_supervisor
