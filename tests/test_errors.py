from __future__ import annotations

import pickle

import pytest

from stockade import errors
from stockade.errors import (
    BackendUnavailable,
    ExecError,
    InvalidRequest,
    LifecycleError,
    NetworkPolicyError,
    SandboxError,
    SessionNotFound,
    Unsupported,
    error_from_json,
)

ALL: list[type[SandboxError]] = [
    SessionNotFound,
    Unsupported,
    InvalidRequest,
    LifecycleError,
    ExecError,
    NetworkPolicyError,
    BackendUnavailable,
]

EVERY: list[type[SandboxError]] = [SandboxError, *ALL]

SAMPLES: list[SandboxError] = [
    SandboxError("generic"),
    SessionNotFound("s-1"),
    Unsupported("bwrap", "snapshot", "no freezer"),
    Unsupported("bwrap", "resume"),
    InvalidRequest("must not be empty", field="session_id"),
    InvalidRequest("no field"),
    LifecycleError("agent died"),
    ExecError("not found: foo"),
    NetworkPolicyError("gateway down"),
    BackendUnavailable("docker", "install it with: pip install 'stockade[docker]'"),
]


# --- the tree ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_every_error_is_a_sandbox_error(cls: type[SandboxError]) -> None:
    assert issubclass(cls, SandboxError)
    assert issubclass(cls, Exception)


def test_builtin_bases() -> None:
    assert issubclass(SessionNotFound, LookupError)
    assert issubclass(InvalidRequest, ValueError)
    assert not issubclass(Unsupported, ValueError)
    assert not issubclass(SessionNotFound, ValueError)
    # Catchable by the builtin a caller would naturally use.
    with pytest.raises(LookupError):
        raise SessionNotFound("x")
    with pytest.raises(ValueError):
        raise InvalidRequest("bad", field="f")


def test_docstring_draws_every_class() -> None:
    doc = errors.__doc__ or ""
    for cls in EVERY:
        assert cls.__name__ in doc
        assert f'"{cls.code}"' in doc


# --- codes and messages -----------------------------------------------------------------------------------


def test_codes_are_stable() -> None:
    assert {cls.__name__: cls.code for cls in EVERY} == {
        "SandboxError": "sandbox_error",
        "SessionNotFound": "session_not_found",
        "Unsupported": "unsupported",
        "InvalidRequest": "invalid_request",
        "LifecycleError": "lifecycle_error",
        "ExecError": "exec_error",
        "NetworkPolicyError": "network_policy_error",
        "BackendUnavailable": "backend_unavailable",
    }


def test_messages() -> None:
    assert str(SessionNotFound("s-1")) == "no sandbox session with id 's-1'"
    assert str(SessionNotFound("s-1", "gone")) == "gone"
    assert str(Unsupported("bwrap", "snapshot")) == "backend 'bwrap' does not support snapshot"
    assert str(Unsupported("bwrap", "snapshot", "no freezer")) == (
        "backend 'bwrap' does not support snapshot: no freezer"
    )
    assert str(InvalidRequest("must be positive", field="limits.wall_time")) == (
        "limits.wall_time: must be positive"
    )
    assert str(InvalidRequest("bad")) == "bad"
    assert str(BackendUnavailable("docker", "no engine")) == "backend 'docker' is not available: no engine"


# --- JSON -------------------------------------------------------------------------------------------------


def test_to_json_shapes() -> None:
    assert SessionNotFound("s-1").to_json() == {
        "code": "session_not_found",
        "message": "no sandbox session with id 's-1'",
        "session_id": "s-1",
    }
    assert Unsupported("b", "op", "why").to_json() == {
        "code": "unsupported",
        "message": "backend 'b' does not support op: why",
        "backend": "b",
        "operation": "op",
        "reason": "why",
    }
    assert InvalidRequest("bad", field="f").to_json() == {
        "code": "invalid_request",
        "message": "f: bad",
        "field": "f",
    }
    assert LifecycleError("x").to_json() == {"code": "lifecycle_error", "message": "x"}
    assert BackendUnavailable("b", "r").to_json() == {
        "code": "backend_unavailable",
        "message": "backend 'b' is not available: r",
        "backend": "b",
        "reason": "r",
    }


@pytest.mark.parametrize("err", SAMPLES, ids=lambda e: f"{type(e).__name__}")
def test_error_from_json_round_trip(err: SandboxError) -> None:
    rebuilt = error_from_json(err.to_json())
    assert type(rebuilt) is type(err)
    assert rebuilt.to_json() == err.to_json()
    assert str(rebuilt) == str(err)
    assert rebuilt.message == err.message


def test_error_from_json_keeps_fields() -> None:
    rebuilt = error_from_json(InvalidRequest("bad", field="mounts.0.target").to_json())
    assert isinstance(rebuilt, InvalidRequest)
    assert rebuilt.field == "mounts.0.target"
    nf = error_from_json({"code": "session_not_found", "message": "m", "session_id": "s-9"})
    assert isinstance(nf, SessionNotFound) and isinstance(nf, LookupError)
    assert nf.session_id == "s-9"


def test_error_from_json_unknown_code() -> None:
    rebuilt = error_from_json({"code": "teapot", "message": "short and stout"})
    assert type(rebuilt) is SandboxError
    assert str(rebuilt) == "short and stout"


def test_error_from_json_missing_details_default() -> None:
    rebuilt = error_from_json({"code": "unsupported", "message": "nope"})
    assert isinstance(rebuilt, Unsupported)
    assert rebuilt.backend is None
    assert rebuilt.to_json() == {
        "code": "unsupported",
        "message": "nope",
        "backend": None,
        "operation": None,
        "reason": None,
    }


def test_error_from_json_cannot_shadow_methods() -> None:
    rebuilt = error_from_json(
        {"code": "exec_error", "message": "m", "to_json": 1, "__class__": 2, "extra": 3}
    )
    assert type(rebuilt) is ExecError
    assert rebuilt.to_json() == {"code": "exec_error", "message": "m"}
    assert getattr(rebuilt, "extra") == 3  # noqa: B009


# --- pickling (errors cross process boundaries) ---------------------------------------------------------


@pytest.mark.parametrize("err", SAMPLES, ids=lambda e: f"{type(e).__name__}")
def test_pickle_keeps_type_and_fields(err: SandboxError) -> None:
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert copy.to_json() == err.to_json()
    assert copy.args == err.args
    assert str(copy) == str(err)


def test_pickle_keeps_named_attributes() -> None:
    err = pickle.loads(pickle.dumps(Unsupported("bwrap", "snapshot", "why")))
    assert (err.backend, err.operation, err.reason) == ("bwrap", "snapshot", "why")
    inv = pickle.loads(pickle.dumps(InvalidRequest("bad", field="f")))
    assert inv.field == "f"
