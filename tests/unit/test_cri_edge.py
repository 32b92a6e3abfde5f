"""One error vocabulary: every layer's errors carry an ``ErrorCode``, and the CRI edge
(cri/edge.py ``cri_call``) answers each with the gRPC status kubelet acts on."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agent.client import AgentError, AgentTimeout, AgentUnavailable
from agent.client import InvalidArgument as AgentInvalidArgument
from agent.protocol import CodedError, ErrorCode
from cri.edge import cri_call
from cri.images.errors import ContentVerificationError, ImageNotFound, RegistryUnauthenticated
from cri.runtime.errors import AlreadyExists, in_context
from cri.streaming.errors import InvalidStreamRequest, TooManyPendingRequests
from sandbox.api import (
    SandboxError,
    SandboxExhausted,
    SandboxNotFound,
    SandboxRefused,
    SandboxUnavailable,
)
from sandbox.network import CniPluginError


class Aborted(Exception):
    pass


class Context:
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


class Servicer:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.observed: list[tuple[str, str]] = []

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.observed.append((method, code))

    @cri_call
    async def Call(self, request: object, context: object) -> object:
        raise self.error


def answer(error: Exception) -> grpc.StatusCode:
    servicer = Servicer(error)
    try:
        asyncio.run(servicer.Call(None, Context()))  # type: ignore[arg-type]
    except Aborted as exc:
        code, message = exc.args
        assert str(error) in message
        assert servicer.observed == [("Call", code.name)]
        return code
    raise AssertionError("not aborted")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SandboxError("no room"), grpc.StatusCode.FAILED_PRECONDITION),
        (SandboxNotFound("gone"), grpc.StatusCode.NOT_FOUND),
        (SandboxExhausted("slots"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (SandboxRefused("bidirectional"), grpc.StatusCode.INVALID_ARGUMENT),
        (SandboxUnavailable("did not boot"), grpc.StatusCode.UNAVAILABLE),
        (AgentTimeout("slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (AgentError("?", code="UNKNOWN_OP"), grpc.StatusCode.UNIMPLEMENTED),
        (AgentError("?", code="NO_SUCH_CODE"), grpc.StatusCode.INTERNAL),
        (CniPluginError("bridge: no IP", code=11), grpc.StatusCode.FAILED_PRECONDITION),
        (ImageNotFound("busybox:9"), grpc.StatusCode.NOT_FOUND),
        (RegistryUnauthenticated("401"), grpc.StatusCode.UNAUTHENTICATED),
        (ContentVerificationError("digest"), grpc.StatusCode.DATA_LOSS),
        (InvalidStreamRequest("no stream"), grpc.StatusCode.INVALID_ARGUMENT),
        (TooManyPendingRequests("later"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (AlreadyExists("pod web"), grpc.StatusCode.ALREADY_EXISTS),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_layer_s_error_answers_its_own_code(error: Exception, code: grpc.StatusCode) -> None:
    assert answer(error) == code


def test_every_error_code_names_a_grpc_status() -> None:
    from cri.edge import status_for

    for code in ErrorCode:
        status = status_for(code)
        assert code == ErrorCode.UNKNOWN_OP or status.name == code.value


def test_an_error_in_context_keeps_its_code_and_says_what_was_done() -> None:
    # kubelet counts only DEADLINE_EXCEEDED as a probe timeout
    error = in_context(AgentTimeout("exec got no answer within 1.0 s"), "exec in main")
    assert error.code == ErrorCode.DEADLINE_EXCEEDED
    assert str(error).startswith("exec in main: ")
    assert in_context(AgentUnavailable("gone"), "x").code == ErrorCode.UNAVAILABLE
    assert in_context(AgentInvalidArgument("bad"), "x").code == ErrorCode.INVALID_ARGUMENT
    assert in_context(SandboxRefused("rshared"), "mount /x").code == ErrorCode.INVALID_ARGUMENT
    # a pod whose agent failed inside is unavailable to the client: kubelet retries
    assert in_context(AgentError("crun failed"), "start c").code == ErrorCode.UNAVAILABLE


def test_every_layer_s_base_error_is_a_coded_error() -> None:
    from cri.images.errors import ImageError
    from cri.runtime.errors import CriError
    from cri.streaming.errors import StreamingError
    from sandbox.network import NetworkError

    for base in (AgentError, SandboxError, NetworkError, ImageError, StreamingError, CriError):
        assert issubclass(base, CodedError), base
