"""Agent failures become the gRPC codes kubelet acts on."""

from __future__ import annotations

import grpc

from agent.errors import AgentTimeout, AgentUnavailable
from agent.errors import InvalidArgument as AgentInvalidArgument
from cri.runtime.core import agent_error


def test_an_agent_timeout_is_deadline_exceeded() -> None:
    # kubelet counts only DEADLINE_EXCEEDED as a probe timeout
    error = agent_error(AgentTimeout("exec got no answer within 1.0 s"), "exec in main")
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "exec in main" in str(error)


def test_other_agent_failures_keep_their_codes() -> None:
    assert agent_error(AgentUnavailable("gone"), "x").code == grpc.StatusCode.UNAVAILABLE
    assert agent_error(AgentInvalidArgument("bad"), "x").code == grpc.StatusCode.INVALID_ARGUMENT


def test_errors_no_call_site_translated_keep_their_codes_at_the_edge() -> None:
    """A sandbox or agent error that reaches the CRI edge untranslated answers with its
    own code (it was INTERNAL, the code of a bug)."""
    import asyncio

    from agent.errors import AgentError
    from cri.runtime.service import cri_call
    from sandbox.pod import SandboxError, SandboxExhausted, SandboxNotFound, SandboxRefused

    class Aborted(Exception):
        pass

    class Context:
        async def abort(self, code: grpc.StatusCode, message: str) -> None:
            raise Aborted(code, message)

    class Servicer:
        def __init__(self, error: Exception) -> None:
            self.error = error

        @cri_call
        async def Call(self, request: object, context: object) -> object:
            raise self.error

    def answer(error: Exception) -> grpc.StatusCode:
        try:
            asyncio.run(Servicer(error).Call(None, Context()))  # type: ignore[arg-type]
        except Aborted as exc:
            code, message = exc.args
            assert str(error) in message
            return code
        raise AssertionError("not aborted")

    assert answer(SandboxError("no room")) == grpc.StatusCode.FAILED_PRECONDITION
    assert answer(SandboxNotFound("gone")) == grpc.StatusCode.NOT_FOUND
    assert answer(SandboxExhausted("slots")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert answer(SandboxRefused("bidirectional")) == grpc.StatusCode.INVALID_ARGUMENT
    assert answer(AgentTimeout("slow")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert answer(AgentError("?", code="UNKNOWN_OP")) == grpc.StatusCode.UNIMPLEMENTED
    assert answer(AgentError("?", code="NO_SUCH_CODE")) == grpc.StatusCode.INTERNAL
    assert answer(RuntimeError("a bug")) == grpc.StatusCode.INTERNAL
