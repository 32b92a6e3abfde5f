"""Exec, attach and port-forward streaming for the CRI runtime (SPDY/3.1 and WebSocket).

The CRI runtime implements :class:`~cri.streaming.backend.StreamingBackend` and calls
``StreamingServer.url_for_exec/url_for_attach/url_for_port_forward`` from its Exec,
Attach and PortForward handlers. See docs/streaming.md.
"""

from cri.streaming.backend import ByteChannel, ProcessStreams, StreamingBackend
from cri.streaming.errors import (
    BackendError,
    InvalidStreamRequest,
    ServerNotRunning,
    StreamingError,
    TooManyPendingRequests,
)
from cri.streaming.server import StreamingServer

__all__ = [
    "BackendError",
    "ByteChannel",
    "InvalidStreamRequest",
    "ProcessStreams",
    "ServerNotRunning",
    "StreamingBackend",
    "StreamingError",
    "StreamingServer",
    "TooManyPendingRequests",
]
