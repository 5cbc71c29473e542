"""Read the server name out of a TLS ClientHello without terminating TLS.

``parse_client_hello(data)`` looks at the first bytes a client sent and says one of:

- ``NEED_MORE``: looks like TLS but the ClientHello is incomplete (read more, with a limit and a timeout);
- ``NOT_TLS``: the stream does not start with a TLS handshake record (plain HTTP, SSH, ...), pass it through;
- ``NO_SNI``: a complete ClientHello without a server_name extension;
- ``SNI``: a complete ClientHello naming ``name`` (normalised: lowercase, no trailing dot);
- ``MALFORMED``: claims to be a TLS handshake but does not parse; the gateway refuses it, since a ClientHello
  it cannot read is one whose server name it cannot check.

The ClientHello may be split over several handshake records; they are reassembled up to ``MAX_HELLO`` bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["MAX_HELLO", "SniResult", "SniStatus", "build_client_hello", "names_equal", "parse_client_hello"]

MAX_HELLO = 64 * 1024

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_HOST_NAME = 0x00


class SniStatus(enum.Enum):
    NEED_MORE = "need_more"
    NOT_TLS = "not_tls"
    NO_SNI = "no_sni"
    SNI = "sni"
    MALFORMED = "malformed"


@dataclass(frozen=True)
class SniResult:
    status: SniStatus
    name: str | None = None
    detail: str = ""


def _malformed(detail: str) -> SniResult:
    return SniResult(SniStatus.MALFORMED, detail=detail)


def names_equal(a: str, b: str) -> bool:
    """Host names compared the way DNS does: ASCII case-insensitive, a trailing dot ignored."""
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def _reassemble(data: bytes) -> tuple[bytes | None, SniResult | None]:
    """Concatenate handshake record payloads until the first handshake message is complete."""
    payload = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return None, SniResult(SniStatus.NEED_MORE)
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5], "big")
        if ctype != _HANDSHAKE or major != 3:
            if pos == 0:
                return None, SniResult(SniStatus.NOT_TLS)
            return None, _malformed("non-handshake record inside a fragmented ClientHello")
        if length == 0 or length > 16384 + 2048:
            return None, _malformed(f"bad record length {length}")
        body = data[pos + 5 : pos + 5 + length]
        if len(body) < length:
            return None, SniResult(SniStatus.NEED_MORE)
        payload += body
        pos += 5 + length
        if len(payload) >= 4:
            if payload[0] != _CLIENT_HELLO:
                return None, _malformed("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(payload[1:4], "big")
            if need > MAX_HELLO:
                return None, _malformed("ClientHello too large")
            if len(payload) >= need:
                return bytes(payload[:need]), None
        if pos > MAX_HELLO:
            return None, _malformed("ClientHello too large")


def parse_client_hello(data: bytes) -> SniResult:
    """Classify the first bytes of a client stream; see the module docstring."""
    if not data:
        return SniResult(SniStatus.NEED_MORE)
    # Decide "not TLS" from the first byte alone, so a non-TLS client is never held back waiting for more.
    if data[0] != _HANDSHAKE:
        return SniResult(SniStatus.NOT_TLS)
    if len(data) >= 2 and data[1] != 3:
        return SniResult(SniStatus.NOT_TLS)
    hello, early = _reassemble(data)
    if early is not None:
        return early
    assert hello is not None
    try:
        return _parse_hello(hello)
    except (IndexError, ValueError) as exc:
        return _malformed(str(exc) or "truncated ClientHello")


class _Reader:
    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ValueError("field runs past its enclosing length")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec(self, width: int) -> _Reader:
        n = int.from_bytes(self.take(width), "big")
        start = self.pos
        self.take(n)
        return _Reader(self.buf, start, start + n)

    def done(self) -> bool:
        return self.pos >= self.end


def _parse_hello(hello: bytes) -> SniResult:
    r = _Reader(hello, 4)
    r.take(2)  # legacy_version
    r.take(32)  # random
    r.vec(1)  # session id
    r.vec(2)  # cipher suites
    r.vec(1)  # compression methods
    if r.done():
        return SniResult(SniStatus.NO_SNI)
    exts = r.vec(2)
    if not r.done():
        raise ValueError("bytes after the extensions")
    seen: set[int] = set()
    name: str | None = None
    while not exts.done():
        ext_type = exts.u16()
        body = exts.vec(2)
        if ext_type in seen:
            raise ValueError(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type != _EXT_SERVER_NAME:
            continue
        names = body.vec(2)
        if not body.done():
            raise ValueError("bytes after the server_name list")
        while not names.done():
            kind = names.u8()
            value = names.vec(2)
            raw = value.take(value.end - value.pos)
            if kind != _HOST_NAME:
                continue
            if name is not None:
                raise ValueError("more than one host_name in server_name")
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError as exc:
                raise ValueError("server_name is not ASCII") from exc
            if not text or any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in text):
                raise ValueError("server_name has bad characters")
            name = text.rstrip(".").lower()
    if name is None:
        return SniResult(SniStatus.NO_SNI)
    return SniResult(SniStatus.SNI, name)


def build_client_hello(server_name: str | None, *, pad_to: int = 0) -> bytes:
    """A minimal, syntactically valid TLS 1.2/1.3 ClientHello record (for tests and self-checks)."""
    exts = bytearray()
    if server_name is not None:
        host = server_name.encode("ascii")
        entry = bytes([_HOST_NAME]) + len(host).to_bytes(2, "big") + host
        sni_body = len(entry).to_bytes(2, "big") + entry
        exts += _EXT_SERVER_NAME.to_bytes(2, "big") + len(sni_body).to_bytes(2, "big") + sni_body
    # supported_versions: TLS 1.3, so the hello looks like a modern one.
    sv = b"\x02\x03\x04"
    exts += (43).to_bytes(2, "big") + len(sv).to_bytes(2, "big") + sv
    if pad_to:
        pad = max(0, pad_to - len(exts) - 4)
        exts += (21).to_bytes(2, "big") + pad.to_bytes(2, "big") + bytes(pad)
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(exts).to_bytes(2, "big") + bytes(exts)
    hs = bytes([_CLIENT_HELLO]) + len(body).to_bytes(3, "big") + body
    out = bytearray()
    # Split into records of at most 16 KiB, as a real client would.
    for i in range(0, len(hs), 16384):
        chunk = hs[i : i + 16384]
        out += bytes([_HANDSHAKE, 3, 1]) + len(chunk).to_bytes(2, "big") + chunk
    return bytes(out)
