"""Files into and out of a session, confined to the session's own view.

The transfer runs *inside* the session, as small ``sh`` scripts executed with the backend's ``exec``: every
path (``..``, symlinks, mounts) is resolved by the sandbox's own filesystem view and with the guest's
permissions, so a guest-planted symlink to a host file leads nowhere the guest could not already read. Nothing
here opens a host path. The price: the guest needs ``sh``, ``base64``, ``stat``, ``find`` (GNU findutils) and
``mkdir``/``dirname``, and files are bounded (``max_bytes``; the session's output limit also applies, after
base64's 4/3 growth).

A backend with a transfer of its own (the ``remote`` backend forwards to its service) offers ``read_file``,
``write_file`` and ``list_files`` methods; the functions here use them first.
"""

from __future__ import annotations

import base64
import binascii
from datetime import timedelta
from typing import Any

from ..backend import SandboxBackend
from ..errors import ExecError, InvalidRequest, Unsupported
from ..models import ExecRequest, ExecResult
from .wire import FileEntry

__all__ = ["DEFAULT_MAX_FILE_BYTES", "list_files", "read_file", "validate_guest_path", "write_file"]

DEFAULT_MAX_FILE_BYTES = 8 << 20
_TIMEOUT = timedelta(seconds=120)

# Exit statuses of the scripts below: each names one refusal, so the caller can say which.
_MISSING, _IS_DIR, _NOT_FILE, _DENIED, _TOO_LARGE, _NOT_DIR, _WRITE_FAILED = 70, 71, 72, 73, 75, 78, 77
_REASONS = {
    _MISSING: "no such file or directory in the session",
    _IS_DIR: "is a directory",
    _NOT_FILE: "is not a regular file",
    _DENIED: "permission denied in the session",
    _NOT_DIR: "is not a directory",
}

_READ = f"""
p=$1; max=$2
[ -e "$p" ] || exit {_MISSING}
[ -d "$p" ] && exit {_IS_DIR}
[ -f "$p" ] || exit {_NOT_FILE}
[ -r "$p" ] || exit {_DENIED}
size=$(stat -L -c %s -- "$p") || exit {_DENIED}
[ "$size" -le "$max" ] || {{ echo "$size" >&2; exit {_TOO_LARGE}; }}
exec base64 -w 0 -- "$p"
"""

_WRITE = f"""
p=$1
[ -d "$p" ] && exit {_IS_DIR}
mkdir -p -- "$(dirname -- "$p")" || exit {_WRITE_FAILED}
base64 -d > "$p" || exit {_WRITE_FAILED}
stat -L -c %s -- "$p"
"""

_LIST = f"""
p=$1
[ -e "$p" ] || exit {_MISSING}
[ -d "$p" ] || exit {_NOT_DIR}
cd -- "$p" 2>/dev/null || exit {_DENIED}
exec find . -mindepth 1 -maxdepth 1 -printf '%y %s %m %T@ %P\\0'
"""

_TYPES = {"f": "file", "d": "dir", "l": "symlink"}


def validate_guest_path(path: Any, *, allow_root: bool = False, field: str = "path") -> str:
    """An absolute guest path without ``.``/``..`` components or NUL, normalised (no doubled slashes)."""
    if not isinstance(path, str) or not path:
        raise InvalidRequest("must be a non-empty absolute path in the session", field=field)
    if "\x00" in path:
        raise InvalidRequest("must not contain a NUL character", field=field)
    if not path.startswith("/"):
        raise InvalidRequest(f"must be an absolute path in the session (got {path!r})", field=field)
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InvalidRequest(f"must not contain '.' or '..' components (got {path!r})", field=field)
    if len(path) > 4096:
        raise InvalidRequest("must be at most 4096 characters", field=field)
    normal = "/" + "/".join(parts)
    if normal == "/" and not allow_root:
        raise InvalidRequest("must name a file, not '/'", field=field)
    return normal


def _own_method(backend: SandboxBackend, name: str) -> Any:
    method = getattr(backend, name, None)
    return method if callable(method) else None


async def _run(backend: SandboxBackend, session_id: str, script: str, *args: str, stdin: str | None = None
               ) -> ExecResult:
    request = ExecRequest(
        command="/bin/sh", args=("-c", script, "stockade-files", *args), stdin=stdin, timeout=_TIMEOUT
    )
    return await backend.exec(session_id, request)


def _refusal(result: ExecResult, path: str, what: str) -> InvalidRequest | ExecError:
    reason = _REASONS.get(result.exit_code)
    if reason is not None:
        return InvalidRequest(f"{path}: {reason}", field="path")
    if result.timed_out:
        return ExecError(f"{what} {path} timed out in the session")
    detail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.exit_code}"]
    if result.exit_code == 127:
        return ExecError(f"{what} {path}: the session lacks a tool the transfer needs ({detail[0]})")
    return InvalidRequest(f"{what} {path}: {detail[0]}", field="path")


async def read_file(backend: SandboxBackend, session_id: str, path: str, *,
                    max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The content of the regular file ``path`` as the session sees it (symlinks followed inside the session).

    Raises InvalidRequest (missing, a directory, unreadable, larger than ``max_bytes``), SessionNotFound,
    ExecError (the guest lacks the tools).
    """
    path = validate_guest_path(path)
    own = _own_method(backend, "read_file")
    if own is not None:
        try:
            data: bytes = await own(session_id, path, max_bytes=max_bytes)
            return data
        except Unsupported:
            pass
    result = await _run(backend, session_id, _READ, path, str(max_bytes))
    if result.exit_code == _TOO_LARGE:
        size = result.stderr.strip()
        raise InvalidRequest(f"{path} is {size} bytes, more than the {max_bytes} bytes allowed", field="path")
    if result.exit_code != 0 or result.timed_out:
        raise _refusal(result, path, "cannot read")
    if result.truncated:
        raise InvalidRequest(
            f"{path} is larger than the session's output limit allows to transfer (base64 adds a third)",
            field="path",
        )
    try:
        data = base64.b64decode(result.stdout, validate=True)
    except (binascii.Error, ValueError):
        raise ExecError(f"reading {path}: the session's base64 output is malformed") from None
    if len(data) > max_bytes:  # the file grew between the size check and the read
        raise InvalidRequest(f"{path} is larger than the {max_bytes} bytes allowed", field="path")
    return data


async def write_file(backend: SandboxBackend, session_id: str, path: str, data: bytes, *,
                     max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> int:
    """Write ``data`` to ``path`` in the session (parents created, as the guest user); returns the size.

    Raises InvalidRequest (too large, a directory, read-only or unwritable place), SessionNotFound, ExecError.
    """
    path = validate_guest_path(path)
    if len(data) > max_bytes:
        raise InvalidRequest(f"{len(data)} bytes is more than the {max_bytes} bytes allowed", field="body")
    own = _own_method(backend, "write_file")
    if own is not None:
        try:
            written: int = await own(session_id, path, data, max_bytes=max_bytes)
            return written
        except Unsupported:
            pass
    result = await _run(backend, session_id, _WRITE, path, stdin=base64.b64encode(data).decode("ascii"))
    if result.exit_code != 0 or result.timed_out:
        raise _refusal(result, path, "cannot write")
    try:
        size = int(result.stdout.strip())
    except ValueError:
        raise ExecError(f"writing {path}: the session did not report the size written") from None
    if size != len(data):
        raise ExecError(f"writing {path}: {size} bytes arrived of {len(data)}")
    return size


async def list_files(backend: SandboxBackend, session_id: str, path: str) -> list[FileEntry]:
    """The entries of directory ``path`` in the session, sorted by name (symlinks are listed, not followed).

    Raises InvalidRequest (missing, not a directory, unreadable), SessionNotFound, ExecError.
    """
    path = validate_guest_path(path, allow_root=True)
    own = _own_method(backend, "list_files")
    if own is not None:
        try:
            listed: list[FileEntry] = await own(session_id, path)
            return listed
        except Unsupported:
            pass
    result = await _run(backend, session_id, _LIST, path)
    if result.exit_code != 0 or result.timed_out:
        raise _refusal(result, path, "cannot list")
    if result.truncated:
        raise InvalidRequest(f"{path} has more entries than the session's output limit allows", field="path")
    entries = []
    for record in result.stdout.split("\0"):
        if not record:
            continue
        fields = record.split(" ", 4)
        if len(fields) != 5:
            raise ExecError(f"listing {path}: unexpected find output {record[:100]!r}")
        kind, size, mode, mtime, name = fields
        try:
            entries.append(FileEntry(name=name, type=_TYPES.get(kind, "other"),  # type: ignore[arg-type]
                                     size=int(size), mode=int(mode, 8), mtime=float(mtime)))
        except ValueError:
            raise ExecError(f"listing {path}: unexpected find output {record[:100]!r}") from None
    return sorted(entries, key=lambda e: e.name)
