"""Agent failures become the gRPC codes kubelet acts on."""

from __future__ import annotations

import grpc

from agent.client import AgentTimeout, AgentUnavailable
from agent.client import InvalidArgument as AgentInvalidArgument
from cri.runtime.core import agent_error


def test_an_agent_timeout_is_deadline_exceeded() -> None:
    # kubelet counts only DEADLINE_EXCEEDED as a probe timeout
    error = agent_error(AgentTimeout("exec got no answer within 1.0 s"), "exec in main")
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "exec in main" in str(error)


def test_other_agent_failures_keep_their_codes() -> None:
    assert agent_error(AgentUnavailable("gone"), "x").code == grpc.StatusCode.UNAVAILABLE
    assert agent_error(AgentInvalidArgument("bad"), "x").code == grpc.StatusCode.INVALID_ARGUMENT
