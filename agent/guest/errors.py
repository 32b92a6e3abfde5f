"""Errors a guest operation reports back to the host with a protocol error code."""

from __future__ import annotations

from agent.protocol import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
)


class OpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(message: str) -> OpError:
    return OpError(NOT_FOUND, message)


def already_exists(message: str) -> OpError:
    return OpError(ALREADY_EXISTS, message)


def invalid(message: str) -> OpError:
    return OpError(INVALID_ARGUMENT, message)


def precondition(message: str) -> OpError:
    return OpError(FAILED_PRECONDITION, message)


def internal(message: str) -> OpError:
    return OpError(INTERNAL, message)
