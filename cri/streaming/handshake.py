"""The HTTP/1.1 request that starts a streaming session, and the upgrade answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from cri.streaming import websocket

#: Largest request head (request line plus headers) accepted.
MAX_REQUEST_HEAD = 16 << 10


class BadRequest(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def tokens(self, name: str) -> list[str]:
        """Every comma-separated value of a header that may repeat, in order."""
        name = name.lower()
        out: list[str] = []
        for key, value in self.headers:
            if key == name:
                out.extend(part.strip() for part in value.split(",") if part.strip())
        return out

    def has_token(self, name: str, token: str) -> bool:
        return token.lower() in (t.lower() for t in self.tokens(name))

    @property
    def is_spdy_upgrade(self) -> bool:
        return self.has_token("connection", "upgrade") and any(
            t.lower() == "spdy/3.1" for t in self.tokens("upgrade")
        )

    @property
    def is_websocket_upgrade(self) -> bool:
        return self.has_token("connection", "upgrade") and self.has_token("upgrade", "websocket")


async def read_request(reader: asyncio.StreamReader, max_size: int = MAX_REQUEST_HEAD) -> Request:
    """Read one request head; raises BadRequest, or EOFError if the peer left."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise EOFError("connection closed before a full request") from exc
    except asyncio.LimitOverrunError as exc:
        raise BadRequest(431, f"request head larger than {max_size} bytes") from exc
    if len(head) > max_size:
        raise BadRequest(431, f"request head larger than {max_size} bytes")
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
        raise BadRequest(400, "undecodable request") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers.append((name.lower(), value.strip()))
    return Request(method, target, version, headers)


_REASONS = {
    101: "Switching Protocols",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def response(status: int, headers: list[tuple[str, str]] | None = None, body: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    all_headers = list(headers or [])
    if status != 101:
        data = body.encode()
        all_headers += [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
        ]
    lines += [f"{name}: {value}" for name, value in all_headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body.encode() if status != 101 else b"")


def negotiate(offered: list[str], supported: list[str]) -> str | None:
    """The first protocol the client offered that we support (client preference)."""
    for protocol in offered:
        if protocol in supported:
            return protocol
    return None


def spdy_upgrade(request: Request, supported: list[str]) -> tuple[str, bytes]:
    """(protocol, 101 response) for a SPDY upgrade; protocol "" when the client offered
    none (legacy clients). Raises BadRequest(403) when no offered protocol is known."""
    offered = request.tokens("x-stream-protocol-version")
    headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    if not offered:
        return "", response(101, headers)
    chosen = negotiate(offered, supported)
    if chosen is None:
        raise BadRequest(
            403,
            f"none of the stream protocols {offered} is supported",
            [("X-Accepted-Stream-Protocol-Versions", ", ".join(supported))],
        )
    return chosen, response(101, [*headers, ("X-Stream-Protocol-Version", chosen)])


def websocket_upgrade(request: Request, supported: list[str]) -> tuple[str, bytes]:
    """(subprotocol, 101 response) for a WebSocket upgrade; raises BadRequest."""
    if request.method != "GET":
        raise BadRequest(405, "WebSocket upgrades use GET")
    if request.header("sec-websocket-version") != "13":
        raise BadRequest(400, "Sec-WebSocket-Version must be 13", [("Sec-WebSocket-Version", "13")])
    key = request.header("sec-websocket-key")
    if not key:
        raise BadRequest(400, "missing Sec-WebSocket-Key")
    offered = request.tokens("sec-websocket-protocol")
    chosen = negotiate(offered, supported)
    if chosen is None:
        raise BadRequest(400, f"none of the WebSocket subprotocols {offered} is supported")
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", websocket.accept_key(key)),
        ("Sec-WebSocket-Protocol", chosen),
    ]
    return chosen, response(101, headers)
