"""Errors raised by the streaming server's public API; each carries its ``ErrorCode``."""

from __future__ import annotations

from agent.protocol import CodedError, ErrorCode


class StreamingError(CodedError):
    """Base class. ``code`` says why, as every layer's errors do (the CRI call answers
    the gRPC status of that name)."""

    code = ErrorCode.INTERNAL


class InvalidStreamRequest(StreamingError, ValueError):
    """An Exec/Attach/PortForward request that can never be served (empty command,
    no stdio stream at all, tty together with stderr, bad port ...). Also a ValueError,
    so handlers that map ValueError to INVALID_ARGUMENT need nothing more."""

    code = ErrorCode.INVALID_ARGUMENT


class TooManyPendingRequests(StreamingError):
    """Too many URLs handed out and not used yet; retry later."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class ServerNotRunning(StreamingError):
    """``url_for_*`` was called before ``start()`` or after ``stop()``."""

    code = ErrorCode.UNAVAILABLE


class BackendError(StreamingError):
    """Raised by a backend when it cannot start a stream; the message reaches the client
    (kubectl / crictl print it)."""
