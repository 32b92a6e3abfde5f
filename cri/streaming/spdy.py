"""SPDY/3.1 framing (sans I/O): frame parsing, frame building and header compression.

Only what the Kubernetes streaming protocols use is implemented: SYN_STREAM, SYN_REPLY,
RST_STREAM, DATA, PING, GOAWAY and HEADERS. SETTINGS and WINDOW_UPDATE from the peer are
parsed and ignored; this side never sends them (the Go client treats them as errors).

Layout (all integers big-endian)::

    control: 1 | version (15) | type (16) | flags (8) | length (24) | data
    data:    0 | stream id (31)           | flags (8) | length (24) | data
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3

# Control frame types.
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9
CONTROL_TYPES = {
    SYN_STREAM: "SYN_STREAM",
    SYN_REPLY: "SYN_REPLY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PING: "PING",
    GOAWAY: "GOAWAY",
    HEADERS: "HEADERS",
    WINDOW_UPDATE: "WINDOW_UPDATE",
}

# Flags.
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
UNSUPPORTED_VERSION = 4
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9
FRAME_TOO_LARGE = 11

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

HEADER = struct.Struct(">II")
MAX_STREAM_ID = 0x7FFFFFFF

#: Largest DATA payload accepted from a peer (Go's client writes 32 KiB chunks).
MAX_DATA_LENGTH = 1 << 20
#: Largest control frame accepted (a compressed header block plus a few fields).
MAX_CONTROL_LENGTH = 64 << 10
#: Largest decompressed header block accepted (guards against zlib bombs).
MAX_HEADER_BLOCK = 256 << 10
#: Largest number of name/value pairs in one header block.
MAX_HEADER_PAIRS = 256
#: Outgoing DATA frames are split into chunks of this size.
SEND_CHUNK = 32 << 10


def _dictionary() -> bytes:
    """The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): a list of
    length-prefixed header names and values followed by common status lines, dates and
    content types as one run of text."""
    words = [
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200_OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ]
    items = [w.replace("_", " ") for w in words]  # "200 OK" is the one entry with a space
    prefix = b"".join(struct.pack(">I", len(w)) + w.encode() for w in items)
    text = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8"
        "charset=iso-8859-1,utf-,*,enq=0."
    )
    return prefix + text.encode()


DICTIONARY = _dictionary()


class SpdyError(Exception):
    """A protocol violation that ends the whole connection (answered with GOAWAY)."""

    def __init__(self, message: str, status: int = GOAWAY_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.status = status


class StreamError(Exception):
    """A violation confined to one stream (answered with RST_STREAM)."""

    def __init__(self, stream_id: int, status: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.status = status


Headers = list[tuple[str, str]]


@dataclass
class Frame:
    """One decoded frame. ``kind`` is a control type, or 0 for DATA."""

    kind: int
    flags: int = 0
    stream_id: int = 0
    data: bytes = b""
    headers: Headers = field(default_factory=list)
    associated_id: int = 0
    priority: int = 0
    status: int = 0  # RST_STREAM / GOAWAY status
    ping_id: int = 0
    last_good_id: int = 0

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)

    def header(self, name: str) -> str | None:
        """First value of a header (names compare case-insensitively)."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value.split("\0", 1)[0]
        return None


DATA = 0


# ---------------------------------------------------------------------------- headers


class HeaderCompressor:
    """Compresses header blocks with one zlib stream per connection direction."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                      zlib.Z_DEFAULT_STRATEGY, DICTIONARY)  # fmt: skip

    def compress(self, headers: Headers) -> bytes:
        raw = bytearray(struct.pack(">I", len(headers)))
        for name, value in headers:
            name_b = name.lower().encode()
            value_b = value.encode()
            raw += struct.pack(">I", len(name_b)) + name_b
            raw += struct.pack(">I", len(value_b)) + value_b
        return self._zlib.compress(bytes(raw)) + self._zlib.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """Decompresses header blocks; refuses blocks that inflate beyond ``max_size``."""

    def __init__(self, max_size: int = MAX_HEADER_BLOCK) -> None:
        self._zlib = zlib.decompressobj(zdict=DICTIONARY)
        self.max_size = max_size

    def decompress(self, data: bytes) -> Headers:
        try:
            raw = self._zlib.decompress(data, self.max_size + 1)
        except zlib.error as exc:
            raise SpdyError(f"bad compressed header block: {exc}") from exc
        if len(raw) > self.max_size or self._zlib.unconsumed_tail:
            raise SpdyError(f"header block inflates beyond {self.max_size} bytes")
        return parse_header_block(raw)


def parse_header_block(raw: bytes) -> Headers:
    if len(raw) < 4:
        raise SpdyError("header block too short")
    (count,) = struct.unpack_from(">I", raw, 0)
    if count > MAX_HEADER_PAIRS:
        raise SpdyError(f"{count} header pairs (limit {MAX_HEADER_PAIRS})")
    pos = 4
    headers: Headers = []
    for _ in range(count):
        strings: list[str] = []
        for _part in range(2):
            if pos + 4 > len(raw):
                raise SpdyError("truncated header block")
            (length,) = struct.unpack_from(">I", raw, pos)
            pos += 4
            if pos + length > len(raw):
                raise SpdyError("truncated header block")
            try:
                strings.append(raw[pos : pos + length].decode())
            except UnicodeDecodeError as exc:
                raise SpdyError("header block is not UTF-8") from exc
            pos += length
        name, value = strings
        if not name:
            raise SpdyError("empty header name")
        headers.append((name.lower(), value))
    if pos != len(raw):
        raise SpdyError("trailing bytes after the header block")
    return headers


# ---------------------------------------------------------------------------- building


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    return HEADER.pack(0x80000000 | (VERSION << 16) | kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes | memoryview, *, fin: bool = False) -> bytes:
    if len(data) > 0xFFFFFF:
        raise ValueError("DATA payload too large")
    flags = FLAG_FIN if fin else 0
    return HEADER.pack(stream_id & MAX_STREAM_ID, (flags << 24) | len(data)) + data


def syn_stream_frame(
    compressor: HeaderCompressor,
    stream_id: int,
    headers: Headers,
    *,
    fin: bool = False,
    associated_id: int = 0,
    priority: int = 0,
) -> bytes:
    payload = struct.pack(">IIBB", stream_id, associated_id, (priority & 7) << 5, 0)
    return _control(SYN_STREAM, FLAG_FIN if fin else 0, payload + compressor.compress(headers))


def syn_reply_frame(
    compressor: HeaderCompressor, stream_id: int, headers: Headers, *, fin: bool = False
) -> bytes:
    payload = struct.pack(">I", stream_id) + compressor.compress(headers)
    return _control(SYN_REPLY, FLAG_FIN if fin else 0, payload)


def rst_stream_frame(stream_id: int, status: int) -> bytes:
    return _control(RST_STREAM, 0, struct.pack(">II", stream_id, status))


def ping_frame(ping_id: int) -> bytes:
    return _control(PING, 0, struct.pack(">I", ping_id))


def goaway_frame(last_good_id: int, status: int = GOAWAY_OK) -> bytes:
    return _control(GOAWAY, 0, struct.pack(">II", last_good_id, status))


# ---------------------------------------------------------------------------- parsing


class FrameParser:
    """Incremental parser: ``feed`` bytes, get complete frames.

    Raises SpdyError for anything that must end the connection (bad version, oversized
    or malformed frame, header bomb). The caller answers with GOAWAY and closes.
    """

    def __init__(
        self,
        *,
        max_data: int = MAX_DATA_LENGTH,
        max_control: int = MAX_CONTROL_LENGTH,
        max_header_block: int = MAX_HEADER_BLOCK,
    ) -> None:
        self._buf = bytearray()
        self.max_data = max_data
        self.max_control = max_control
        self._headers = HeaderDecompressor(max_header_block)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        pos = 0
        buf = self._buf
        try:
            while len(buf) - pos >= 8:
                first, second = HEADER.unpack_from(buf, pos)
                flags = second >> 24
                length = second & 0xFFFFFF
                control = bool(first & 0x80000000)
                limit = self.max_control if control else self.max_data
                if length > limit:
                    kind = "control" if control else "DATA"
                    raise SpdyError(f"{kind} frame of {length} bytes (limit {limit})")
                if len(buf) - pos - 8 < length:
                    break
                payload = bytes(buf[pos + 8 : pos + 8 + length])
                pos += 8 + length
                if control:
                    version = (first >> 16) & 0x7FFF
                    if version != VERSION:
                        raise SpdyError(f"SPDY version {version} is not supported")
                    frame = self._control(first & 0xFFFF, flags, payload)
                    if frame is not None:
                        frames.append(frame)
                else:
                    frames.append(Frame(DATA, flags, first & MAX_STREAM_ID, payload))
        finally:
            del buf[:pos]
        return frames

    def _control(self, kind: int, flags: int, payload: bytes) -> Frame | None:
        n = len(payload)
        if kind == SYN_STREAM:
            if n < 10:
                raise SpdyError("SYN_STREAM too short")
            stream_id, assoc, prio = struct.unpack_from(">IIB", payload, 0)
            headers = self._headers.decompress(payload[10:])
            return Frame(
                kind,
                flags,
                stream_id & MAX_STREAM_ID,
                headers=headers,
                associated_id=assoc & MAX_STREAM_ID,
                priority=prio >> 5,
            )
        if kind in (SYN_REPLY, HEADERS):
            if n < 4:
                raise SpdyError(f"{CONTROL_TYPES[kind]} too short")
            (stream_id,) = struct.unpack_from(">I", payload, 0)
            headers = self._headers.decompress(payload[4:])
            return Frame(kind, flags, stream_id & MAX_STREAM_ID, headers=headers)
        if kind == RST_STREAM:
            if n != 8:
                raise SpdyError("RST_STREAM must be 8 bytes")
            stream_id, status = struct.unpack(">II", payload)
            return Frame(kind, flags, stream_id & MAX_STREAM_ID, status=status)
        if kind == PING:
            if n != 4:
                raise SpdyError("PING must be 4 bytes")
            return Frame(kind, flags, ping_id=struct.unpack(">I", payload)[0])
        if kind == GOAWAY:
            if n != 8:
                raise SpdyError("GOAWAY must be 8 bytes")
            last, status = struct.unpack(">II", payload)
            return Frame(kind, flags, last_good_id=last & MAX_STREAM_ID, status=status)
        if kind == SETTINGS:
            if n < 4 or n != 4 + 8 * struct.unpack_from(">I", payload, 0)[0]:
                raise SpdyError("malformed SETTINGS")
            return Frame(kind, flags)
        if kind == WINDOW_UPDATE:
            if n != 8:
                raise SpdyError("WINDOW_UPDATE must be 8 bytes")
            return Frame(kind, flags, struct.unpack_from(">I", payload, 0)[0] & MAX_STREAM_ID)
        # Unknown control frames are ignored, as the specification asks.
        return None
