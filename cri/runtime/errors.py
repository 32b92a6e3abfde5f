"""Errors of the runtime service, each tied to the gRPC code the client sees."""

from __future__ import annotations

import grpc

from agent.protocol import ErrorCode


def status_for(code: str) -> grpc.StatusCode:
    """The gRPC status of an ``ErrorCode`` (any layer's error), INTERNAL for a code
    that is not one."""
    if code == ErrorCode.UNKNOWN_OP:
        return grpc.StatusCode.UNIMPLEMENTED
    try:
        return grpc.StatusCode[str(code)]
    except KeyError:
        return grpc.StatusCode.INTERNAL


class CriError(Exception):
    """A CRI call failed; ``code`` is the gRPC status the client gets."""

    code = grpc.StatusCode.INTERNAL


class NotFound(CriError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(CriError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(CriError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(CriError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(CriError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CriError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CriError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(CriError):
    code = grpc.StatusCode.UNIMPLEMENTED
