"""The service's bearer token: generated on first start, stored 0600, rotatable, compared in constant time.

A running service re-reads the token file when it changes (a ``stat`` per request), so ``stockade serve
--rotate-token`` takes effect at once without a restart, and the old token stops working with it.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
import tempfile
import threading
from pathlib import Path

from ..errors import InvalidRequest

__all__ = ["TokenSource", "ensure_token", "load_token", "new_token", "rotate_token", "token_matches"]

TOKEN_BYTES = 32  # 256 bits from the OS CSPRNG


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not replace:
        # O_EXCL: two services starting at once must not both generate (and one silently lose) a token.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".token.")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_token(path: Path) -> str:
    """Read the token at ``path``; refuse a file that others could read or that another user owns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidRequest(f"no token file at {path}", field="token_file") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read token file {path}: {exc.strerror}", field="token_file") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequest(f"{path} is not a regular file", field="token_file")
        if st.st_mode & 0o077:
            raise InvalidRequest(
                f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it or rotate it",
                field="token_file",
            )
        if st.st_uid != os.geteuid():
            raise InvalidRequest(f"{path} belongs to uid {st.st_uid}, not to this user", field="token_file")
        token = f.read().strip()
    if len(token) < 32:
        raise InvalidRequest(f"the token in {path} is too short (at least 32 characters)", field="token_file")
    return token


def ensure_token(path: Path) -> str:
    """The token at ``path``, generating one (0600) when there is none yet."""
    with contextlib.suppress(FileExistsError):
        _write_private(path, new_token(), replace=False)
    return load_token(path)


def rotate_token(path: Path) -> str:
    """Replace the token at ``path`` with a fresh one (atomically) and return it."""
    token = new_token()
    _write_private(path, token, replace=True)
    return token


def token_matches(expected: str, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``expected`` as a bearer token (constant-time compare)."""
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest on bytes: its time depends on the length only, not on where the first difference is.
    return hmac.compare_digest(value.strip().encode("utf-8", "replace"), expected.encode("utf-8"))


class TokenSource:
    """The token a service checks: fixed, or read from a file and re-read when the file changes.

    When the file disappears or turns unsafe, :meth:`current` returns None and every request is refused
    (fail closed) until a good file is back.
    """

    def __init__(self, *, token: str | None = None, path: Path | None = None) -> None:
        if (token is None) == (path is None):
            raise ValueError("give exactly one of token and path")
        self._token = token
        self._path = path
        self._seen: tuple[int, ...] | None = None
        self._lock = threading.Lock()
        if path is not None:
            self._token = load_token(path)
            self._seen = self._signature()

    @property
    def path(self) -> Path | None:
        return self._path

    def _signature(self) -> tuple[int, ...] | None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        # ctime and mode too: a chmod that makes the file unsafe must be noticed like a new token.
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode, st.st_uid)

    def current(self) -> str | None:
        if self._path is None:
            return self._token
        signature = self._signature()
        if signature != self._seen:
            with self._lock:
                self._seen = signature
                try:
                    self._token = load_token(self._path) if signature is not None else None
                except InvalidRequest:
                    self._token = None
        return self._token

    def check(self, authorization: str | None) -> bool:
        expected = self.current()
        return expected is not None and token_matches(expected, authorization)
