"""Errors raised by the streaming server's public API; each carries its gRPC code."""

from __future__ import annotations

import grpc


class StreamingError(Exception):
    """Base class. ``code`` is the gRPC status the CRI call should return."""

    code = grpc.StatusCode.INTERNAL


class InvalidStreamRequest(StreamingError, ValueError):
    """An Exec/Attach/PortForward request that can never be served (empty command,
    no stdio stream at all, tty together with stderr, bad port ...). Also a ValueError,
    so handlers that map ValueError to INVALID_ARGUMENT need nothing more."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TooManyPendingRequests(StreamingError):
    """Too many URLs handed out and not used yet; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ServerNotRunning(StreamingError):
    """``url_for_*`` was called before ``start()`` or after ``stop()``."""

    code = grpc.StatusCode.UNAVAILABLE


class BackendError(StreamingError):
    """Raised by a backend when it cannot start a stream; the message reaches the client
    (kubectl / crictl print it)."""
