"""Errors of the runtime service. Every layer's errors carry an ``ErrorCode``
(agent/protocol.py ``CodedError``); the CRI edge (cri/edge.py) answers each with the
gRPC status of that name, in one place."""

from __future__ import annotations

from agent.protocol import CodedError, ErrorCode


class CriError(CodedError):
    """A CRI call failed; ``code`` says why."""


class NotFound(CriError):
    code = ErrorCode.NOT_FOUND


class InvalidArgument(CriError):
    code = ErrorCode.INVALID_ARGUMENT


class FailedPrecondition(CriError):
    code = ErrorCode.FAILED_PRECONDITION


class AlreadyExists(CriError):
    code = ErrorCode.ALREADY_EXISTS


class ResourceExhausted(CriError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(CriError):
    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(CriError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Unimplemented(CriError):
    code = ErrorCode.UNIMPLEMENTED


def in_context(exc: CodedError, what: str) -> CriError:
    """``exc`` (any layer's) with what the call was doing in front; its code is kept.
    An agent or VM that failed inside (INTERNAL) is UNAVAILABLE to the client: the pod is
    what broke, and kubelet retries."""
    code = exc.code
    if code == ErrorCode.INTERNAL:
        code = ErrorCode.UNAVAILABLE
    return CriError(f"{what}: {exc}", code=code)
