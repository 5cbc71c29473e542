"""The OpenAPI 3.1 document of the service, built from the route table and the contract's pydantic models.

pydantic describes most of the models as they are; three things are said here by hand because the models take
more (or emit other shapes) than their annotations show: durations (``{"secs", "nanos"}`` out; that, a number
of seconds or a string like ``"30s"`` in), the network policy's two output shapes, and the session id pattern.
``docs/openapi.json`` is this document, committed; a test keeps the two equal.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__

__all__ = ["Operation", "QueryParam", "build_openapi"]

SESSION_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"
_REF = "#/components/schemas/{model}"
_DURATION_FIELDS = ("wall_time", "idle_timeout", "timeout")

_STATUS_TEXT = {
    400: "Invalid request: malformed JSON, a wrong type, an unknown field or a broken rule (`invalid_request`)",
    401: "Missing or invalid bearer token (`unauthorized`)",
    404: "No session with that id (`session_id` detail), or no such route (`session_not_found`, `not_found`)",
    409: "The session cannot do this in its state, or failed (`lifecycle_error`)",
    413: "Request body too large (`payload_too_large`)",
    422: "The backend cannot enforce or perform this (`unsupported`, with `backend`, `operation`, `reason`), "
         "or the command could not be started or collected (`exec_error`)",
    429: "A service limit is reached, e.g. the number of sessions (`limit_exceeded`)",
    502: "The network policy could not be applied (`network_policy_error`)",
    503: "The backend is not available on this host (`backend_unavailable`)",
}

Body = type[BaseModel] | Literal["bytes"] | None
Answer = type[BaseModel] | Literal["bytes", "ndjson", "openapi"] | None


@dataclass(frozen=True)
class QueryParam:
    name: str
    schema: dict[str, Any]
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Operation:
    """One route: what the router serves and what the document says about it."""

    method: str
    path: str
    operation_id: str
    handler: Callable[..., Awaitable[Any]]
    summary: str
    body: Body = None
    response: Answer = None
    status: int = 200
    query: tuple[QueryParam, ...] = ()
    errors: tuple[int, ...] = ()
    public: bool = False


def _components(operations: tuple[Operation, ...]) -> dict[str, Any]:
    from .wire import ErrorBody

    pairs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [(ErrorBody, "serialization")]
    for op in operations:
        if isinstance(op.body, type):
            pairs.append((op.body, "validation"))
        if isinstance(op.response, type):
            pairs.append((op.response, "serialization"))
    unique = list(dict.fromkeys(pairs))
    refs, top = models_json_schema(unique, ref_template=_REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    _strip_titles(schemas)
    for name, schema in schemas.items():
        _patch_model(name, schema)
    schemas["Duration"] = {
        "type": "object",
        "description": "A duration as harn writes it",
        "properties": {"secs": {"type": "integer", "minimum": 0}, "nanos": {"type": "integer", "minimum": 0,
                                                                             "maximum": 999_999_999}},
        "required": ["secs", "nanos"],
        "additionalProperties": False,
    }
    schemas["DurationInput"] = {
        "description": "A duration: {secs, nanos}, a number of seconds, or a string such as \"30s\" or \"5m\" "
                       "(positive, at most 30 days)",
        "anyOf": [
            {
                "type": "object",
                "properties": {"secs": {"type": "integer", "minimum": 0},
                               "nanos": {"type": "integer", "minimum": 0, "maximum": 999_999_999}},
                "required": ["secs"],
                "additionalProperties": False,
            },
            {"type": "number", "exclusiveMinimum": 0, "maximum": 30 * 86400},
            {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ns|us|ms|s|m|h|d)?\s*$"},
        ],
    }
    schemas["ExecStreamFrame"] = {
        "description": "One NDJSON line of exec/stream: an output chunk (base64 data), the result (last), or an "
                       "error that happened after the stream began",
        "oneOf": [
            {"type": "object", "properties": {"stream": {"enum": ["stdout", "stderr"]},
                                              "data": {"type": "string", "contentEncoding": "base64"}},
             "required": ["stream", "data"], "additionalProperties": False},
            {"type": "object", "properties": {"result": {"$ref": _REF.format(model="ExecResult")}},
             "required": ["result"], "additionalProperties": False},
            {"type": "object", "properties": {"error": {"$ref": _REF.format(model="ErrorDetail")}},
             "required": ["error"], "additionalProperties": False},
        ],
    }
    return {"schemas": dict(sorted(schemas.items())), "_refs": {f"{m.__name__}:{mode}": ref
                                                                for (m, mode), ref in refs.items()}}


def _strip_titles(node: Any) -> None:
    # pydantic's generated titles ("Wall Time") add noise and nothing a reader or a generator needs.
    if isinstance(node, dict):
        if isinstance(node.get("title"), str) and "properties" not in node and "enum" not in node:
            node.pop("title")
        for value in node.values():
            _strip_titles(value)
    elif isinstance(node, list):
        for value in node:
            _strip_titles(value)


def _patch_model(name: str, schema: dict[str, Any]) -> None:
    properties = schema.get("properties", {})
    for field in _DURATION_FIELDS:
        prop = properties.get(field)
        if prop is None:
            continue
        # Which side a schema describes shows in what pydantic made of the timedelta: an ISO "duration"
        # string when validating, the serializer's dict of integers when serializing.
        alternatives = prop.get("anyOf", [prop])
        is_input = any(alt.get("format") == "duration" for alt in alternatives)
        target = _REF.format(model="DurationInput" if is_input else "Duration")
        for key in ("anyOf", "format", "type", "additionalProperties"):
            prop.pop(key, None)
        prop["anyOf"] = [{"$ref": target}, {"type": "null"}]
    if name.startswith("NetworkPolicy"):
        hosts = {"type": "array", "items": {"type": "string"}}
        if schema.get("type") == "object" and "properties" not in schema:
            # The serializer's shape, which pydantic cannot see through: no allowed_hosts key when unrestricted.
            unrestricted: dict[str, Any] = {"properties": {"mode": {"const": "unrestricted"}}}
            text = "Egress policy as emitted: unrestricted (no allowed_hosts key), or limited"
        else:
            unrestricted = {"properties": {"mode": {"const": "unrestricted"},
                                           "allowed_hosts": {"type": "array", "maxItems": 0}}}
            text = ("Egress policy: unrestricted, or limited to allowed_hosts (required; an empty list denies "
                    "all). A host is a name, *.suffix (two labels after the star) or an address, each with an "
                    "optional :port")
        schema.clear()
        schema.update({
            "description": text,
            "oneOf": [
                {"type": "object", **unrestricted, "required": ["mode"], "additionalProperties": False},
                {"type": "object", "properties": {"mode": {"const": "limited"}, "allowed_hosts": hosts},
                 "required": ["mode", "allowed_hosts"], "additionalProperties": False},
            ],
        })
    if "session_id" in properties and name.startswith("SandboxSpec"):
        properties["session_id"]["anyOf"] = [{"type": "string", "pattern": SESSION_ID_PATTERN}, {"type": "null"}]


def _json_content(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": ref}}}


def _operation(op: Operation, refs: dict[str, str]) -> dict[str, Any]:
    def ref(model: type[BaseModel], mode: str) -> str:
        return refs[f"{model.__name__}:{mode}"]["$ref"]  # type: ignore[index]

    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
    parameters: list[dict[str, Any]] = []
    if "{session_id}" in op.path:
        parameters.append({"name": "session_id", "in": "path", "required": True,
                           "schema": {"type": "string", "pattern": SESSION_ID_PATTERN}})
    for q in op.query:
        param: dict[str, Any] = {"name": q.name, "in": "query", "required": q.required, "schema": q.schema}
        if q.description:
            param["description"] = q.description
        parameters.append(param)
    if parameters:
        doc["parameters"] = parameters
    if op.body == "bytes":
        doc["requestBody"] = {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    elif op.body is not None:
        doc["requestBody"] = {"required": True, "content": _json_content(ref(op.body, "validation"))}
    responses: dict[str, Any] = {}
    ok: dict[str, Any] = {"description": op.summary}
    if op.response == "bytes":
        ok["content"] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    elif op.response == "ndjson":
        ok["content"] = {"application/x-ndjson": {"schema": {"$ref": _REF.format(model="ExecStreamFrame")}}}
    elif op.response == "openapi":
        ok["content"] = {"application/json": {"schema": {"type": "object"}}}
    elif op.response is not None:
        ok["content"] = _json_content(ref(op.response, "serialization"))
    responses[str(op.status)] = ok
    statuses = set(op.errors)
    if op.body is not None or op.query:
        statuses.add(400)
    if op.body is not None:
        statuses.add(413)
    if not op.public:
        statuses.add(401)
    for status in sorted(statuses):
        responses[str(status)] = {"description": _STATUS_TEXT[status],
                                  "content": _json_content(ref(_error_body(), "serialization"))}
    doc["responses"] = responses
    if op.public:
        doc["security"] = []
    return doc


def _error_body() -> type[BaseModel]:
    from .wire import ErrorBody

    return ErrorBody


def build_openapi(operations: tuple[Operation, ...]) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing ``operations``."""
    components = _components(operations)
    refs = components.pop("_refs")
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "Mandatory on TCP; a unix socket is guarded by its 0600 permissions"}
    }
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {
            "title": "stockade",
            "version": __version__,
            "description": "The SandboxBackend contract over HTTP, in harn's wire shapes. Errors are "
                           '{"error": {"code", "message", ...}}.',
        },
        "paths": paths,
        "components": components,
        "security": [{"bearer": []}],
    })


def main() -> None:
    """Print the document (``python -m stockade.service.openapi > docs/openapi.json``)."""
    import json
    import sys

    from .app import OPERATIONS

    sys.stdout.write(json.dumps(build_openapi(OPERATIONS), indent=2) + "\n")


if __name__ == "__main__":
    main()
