"""Errors of the host's agent client: one class per protocol error code.

Every failed call raises an :class:`AgentError` (a ``CodedError``, so the CRI layer
answers it with the gRPC status of its code); the guest's failed responses are turned
into the matching subclass by :func:`error_from_wire`.
"""

from __future__ import annotations

from typing import Any

from agent.protocol import (
    ALREADY_EXISTS,
    DEADLINE_EXCEEDED,
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    UNAVAILABLE,
    UNKNOWN_OP,
    CodedError,
)


class AgentError(CodedError):
    """A failed agent call; ``code`` is one of the protocol error codes."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class NotFound(AgentError):
    code = NOT_FOUND


class AlreadyExists(AgentError):
    code = ALREADY_EXISTS


class InvalidArgument(AgentError):
    code = INVALID_ARGUMENT


class FailedPrecondition(AgentError):
    code = FAILED_PRECONDITION


class Internal(AgentError):
    code = INTERNAL


class AgentTimeout(AgentError):
    code = DEADLINE_EXCEEDED


class AgentUnavailable(AgentError):
    """The connection is closed (or was never made), or the agent never answered."""

    code = UNAVAILABLE


class AgentUnanswered(AgentUnavailable):
    """One connection's hello went unanswered (``AgentClient.connect`` connects again)."""


class UnknownOperation(AgentError):
    code = UNKNOWN_OP


_ERRORS: dict[str, type[AgentError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        Internal,
        AgentTimeout,
        AgentUnavailable,
        UnknownOperation,
    )
}


def error_from_wire(error: dict[str, Any]) -> AgentError:
    """The error of a failed response's ``{"code", "message"}``."""
    code = str(error.get("code", INTERNAL))
    message = str(error.get("message", "agent error"))
    cls = _ERRORS.get(code, AgentError)
    return cls(message, code=code)
