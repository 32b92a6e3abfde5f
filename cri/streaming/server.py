"""The streaming HTTP server: hands out URLs for Exec/Attach/PortForward and serves them.

    server = StreamingServer(backend, "127.0.0.1", 0)
    await server.start()
    url = server.url_for_exec(request)      # -> ExecResponse(url=url)
    ...
    await server.stop()

Each URL is ``http://HOST:PORT/{exec,attach,portforward}/<token>``; the token is random,
single-use and valid for a minute. The client upgrades the connection to SPDY/3.1 or to
WebSocket there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from cri.streaming import handshake, portforward, remotecommand
from cri.streaming.backend import StreamingBackend
from cri.streaming.errors import InvalidStreamRequest, ServerNotRunning
from cri.streaming.handshake import BadRequest, Request
from cri.streaming.remotecommand import CommandOptions
from cri.streaming.spdy_connection import MAX_STREAMS, SpdyConnection, SpdyStream
from cri.streaming.tokens import MAX_PENDING, TOKEN_TTL, PendingRequest, RequestCache
from cri.streaming.transport import ByteStream, TcpStream
from cri.streaming.websocket import WebSocketByteStream, WebSocketConnection

log = logging.getLogger(__name__)

#: A connection must send its request head within this many seconds.
HANDSHAKE_TIMEOUT = 10.0
#: Connections served at once; more are answered 503.
MAX_CONNECTIONS = 1024
_READER_LIMIT = 64 << 10


# ---------------------------------------------------------------------------- validation


def validate_exec(request: Any) -> None:
    if not request.container_id:
        raise InvalidStreamRequest("exec: container_id is required")
    if not list(request.cmd):
        raise InvalidStreamRequest("exec: cmd must not be empty")
    _validate_stdio("exec", request)


def validate_attach(request: Any) -> None:
    if not request.container_id:
        raise InvalidStreamRequest("attach: container_id is required")
    _validate_stdio("attach", request)


def _validate_stdio(what: str, request: Any) -> None:
    if not (request.stdin or request.stdout or request.stderr):
        raise InvalidStreamRequest(f"{what}: one of stdin, stdout or stderr must be set")
    if request.tty and request.stderr:
        raise InvalidStreamRequest(
            f"{what}: tty and stderr cannot both be set (a terminal has one output stream)"
        )


def validate_port_forward(request: Any) -> None:
    if not request.pod_sandbox_id:
        raise InvalidStreamRequest("port-forward: pod_sandbox_id is required")
    for port in request.port:
        if not 0 < port < 65536:
            raise InvalidStreamRequest(f"port-forward: invalid port {port}")


# ---------------------------------------------------------------------------- server


class StreamingServer:
    def __init__(
        self,
        backend: StreamingBackend,
        address: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_address: str | None = None,
        token_ttl: float = TOKEN_TTL,
        max_pending: int = MAX_PENDING,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        stream_creation_timeout: float = remotecommand.STREAM_CREATION_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.backend = backend
        self.address = address
        self.requested_port = port
        self.advertise_address = advertise_address
        self.handshake_timeout = handshake_timeout
        self.stream_creation_timeout = stream_creation_timeout
        self.max_connections = max_connections
        self.max_streams = max_streams
        self.requests = RequestCache(ttl=token_ttl, max_pending=max_pending)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._on_connection, self.address, self.requested_port, limit=_READER_LIMIT
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("streaming: serving on %s", self.base_url)

    async def stop(self) -> None:
        """Stop listening and end every session (their processes get ``close()``)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def __aenter__(self) -> StreamingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        host = self.advertise_address or self.address
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def active_sessions(self) -> int:
        return len(self._tasks)

    # ------------------------------------------------------------------ URLs

    def _url(self, kind: str, request: Any) -> str:
        if self._server is None:
            raise ServerNotRunning("the streaming server is not running")
        token = self.requests.insert(kind, request)
        return f"{self.base_url}/{kind}/{token}"

    def url_for_exec(self, request: Any) -> str:
        """URL for an ``api_pb2.ExecRequest``; raises InvalidStreamRequest,
        TooManyPendingRequests or ServerNotRunning (each has ``.code``)."""
        validate_exec(request)
        return self._url("exec", request)

    def url_for_attach(self, request: Any) -> str:
        validate_attach(request)
        return self._url("attach", request)

    def url_for_port_forward(self, request: Any) -> str:
        validate_port_forward(request)
        return self._url("portforward", request)

    # ------------------------------------------------------------------ connections

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self._tasks) > self.max_connections:
                writer.write(handshake.response(503, body="too many streaming connections\n"))
                await writer.drain()
                return
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError) as exc:
            log.debug("streaming: connection ended: %r", exc)
        except Exception:
            log.exception("streaming: session failed")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(handshake.read_request(reader), self.handshake_timeout)
        except (TimeoutError, EOFError):
            return  # never sent a request: drop it
        except BadRequest as exc:
            writer.write(handshake.response(exc.status, exc.headers, str(exc) + "\n"))
            await writer.drain()
            return
        try:
            await self._route(request, reader, writer)
        except BadRequest as exc:
            writer.write(handshake.response(exc.status, exc.headers, str(exc) + "\n"))
            await writer.drain()

    async def _route(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        parts = request.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("exec", "attach", "portforward"):
            raise BadRequest(404, f"no such endpoint {request.path!r}")
        kind, token = parts
        websocket = request.is_websocket_upgrade
        if not websocket and not request.is_spdy_upgrade:
            raise BadRequest(
                400,
                "this endpoint needs an upgrade to SPDY/3.1 or websocket",
                [("Upgrade", "SPDY/3.1")],
            )
        # Negotiate before using the token, so a request we would refuse anyway does not
        # burn it.
        if kind == "portforward":
            supported = (
                [portforward.TUNNEL_PROTOCOL, *portforward.WEBSOCKET_PROTOCOLS]
                if websocket
                else [portforward.PROTOCOL]
            )
        else:
            supported = (
                remotecommand.WEBSOCKET_PROTOCOLS if websocket else remotecommand.SPDY_PROTOCOLS
            )
        if websocket:
            protocol, answer = handshake.websocket_upgrade(request, supported)
        else:
            protocol, answer = handshake.spdy_upgrade(request, supported)
        ports: list[int] = []
        if websocket and kind == "portforward" and protocol != portforward.TUNNEL_PROTOCOL:
            ports = _query_ports(request)
        pending = self.requests.consume(token)
        if pending is None or pending.kind != kind:
            raise BadRequest(404, "unknown or expired streaming token")
        writer.write(answer)
        await writer.drain()
        transport = TcpStream(reader, writer)
        log.info(
            "streaming: %s session, %s %s",
            kind,
            "websocket" if websocket else "spdy",
            protocol or "(no protocol header)",
        )
        if kind == "portforward":
            if websocket and protocol != portforward.TUNNEL_PROTOCOL:
                ws = WebSocketConnection(transport)
                await portforward.serve_websocket_channels(
                    ws, ports, self._opener(pending), _describe(pending)
                )
            elif websocket:
                ws = WebSocketConnection(transport)
                await self._serve_port_forward(WebSocketByteStream(ws), pending)
            else:
                await self._serve_port_forward(transport, pending)
        elif websocket:
            await self._serve_command_websocket(transport, pending, protocol)
        else:
            await self._serve_command_spdy(transport, pending, protocol)

    # ------------------------------------------------------------------ sessions

    def _starter(self, pending: PendingRequest) -> Any:
        req = pending.request
        backend = self.backend
        if pending.kind == "exec":
            return lambda size: backend.exec(
                req.container_id, list(req.cmd), tty=req.tty, stdin=req.stdin, size=size
            )
        return lambda _size: backend.attach(req.container_id, tty=req.tty, stdin=req.stdin)

    @staticmethod
    def _options(pending: PendingRequest) -> CommandOptions:
        req = pending.request
        return CommandOptions(
            stdin=req.stdin, stdout=req.stdout, stderr=req.stderr and not req.tty, tty=req.tty
        )

    async def _serve_command_spdy(
        self, transport: ByteStream, pending: PendingRequest, protocol: str
    ) -> None:
        version = remotecommand.protocol_version(protocol)
        opts = self._options(pending)
        incoming: asyncio.Queue[SpdyStream] = asyncio.Queue()
        conn = SpdyConnection(transport, incoming.put_nowait, max_streams=self.max_streams)
        runner = asyncio.ensure_future(conn.run())
        try:
            try:
                streams = await remotecommand.collect_spdy_streams(
                    conn,
                    incoming,
                    remotecommand.expected_streams(opts, version),
                    self.stream_creation_timeout,
                )
            except (TimeoutError, ConnectionError) as exc:
                log.info("streaming: %s", exc)
                return
            conn.on_stream = _refuse
            channels = remotecommand.SpdyCommandChannels(conn, streams)
            await remotecommand.run_session(
                channels, self._starter(pending), opts, version, attach=pending.kind == "attach"
            )
        finally:
            await conn.close()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def _serve_command_websocket(
        self, transport: ByteStream, pending: PendingRequest, protocol: str
    ) -> None:
        version = remotecommand.protocol_version(protocol)
        ws = WebSocketConnection(transport)
        channels = remotecommand.WebSocketCommandChannels(
            ws, version, base64_frames=protocol in remotecommand.BASE64_PROTOCOLS
        )
        try:
            await channels.announce(self._options(pending))
            await remotecommand.run_session(
                channels,
                self._starter(pending),
                self._options(pending),
                version,
                attach=pending.kind == "attach",
            )
        finally:
            await channels.finish(b"") if not ws.closed.is_set() else None

    def _opener(self, pending: PendingRequest) -> portforward.Opener:
        sandbox_id = pending.request.pod_sandbox_id
        backend = self.backend

        async def open_channel(port: int) -> Any:
            return await backend.port_forward(sandbox_id, port)

        return open_channel

    async def _serve_port_forward(self, transport: ByteStream, pending: PendingRequest) -> None:
        forwarder: portforward.SpdyPortForwarder | None = None

        def on_stream(stream: SpdyStream) -> None:
            assert forwarder is not None
            forwarder.on_stream(stream)

        conn = SpdyConnection(transport, on_stream, max_streams=self.max_streams)
        forwarder = portforward.SpdyPortForwarder(conn, self._opener(pending), _describe(pending))
        runner = asyncio.ensure_future(conn.run())
        try:
            await forwarder.run()
        finally:
            await conn.close(linger=0.5)
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


def _refuse(stream: SpdyStream) -> None:
    from cri.streaming import spdy

    stream.reset(spdy.REFUSED_STREAM)


def _describe(pending: PendingRequest) -> str:
    return f"pod sandbox {pending.request.pod_sandbox_id}"


def _query_ports(request: Request) -> list[int]:
    ports: list[int] = []
    for value in request.query.get("port", []):
        for item in value.split(","):
            port = portforward.parse_port(item.strip())
            if port is None:
                raise BadRequest(400, f"invalid port {item!r}")
            ports.append(port)
    if not ports:
        raise BadRequest(400, "WebSocket port-forward needs ?port=N")
    return ports
