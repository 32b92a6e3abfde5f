"""The CRI server's edge: every call of the runtime and image services goes through
``cri_call``, which answers any layer's error (a ``CodedError``) with the gRPC status of
its code and reports each call's method, status and duration."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc

from agent.protocol import CodedError, ErrorCode

log = logging.getLogger("clearcri.cri")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def status_for(code: str) -> grpc.StatusCode:
    """The gRPC status of an ``ErrorCode`` (any layer's error), INTERNAL for a code
    that is not one."""
    if code == ErrorCode.UNKNOWN_OP:
        return grpc.StatusCode.UNIMPLEMENTED
    try:
        return grpc.StatusCode[str(code)]
    except KeyError:
        return grpc.StatusCode.INTERNAL


def cri_call(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Run a servicer method; turn errors into gRPC status codes; report the call to
    ``self.observe`` (method, code name, seconds) when the servicer has one."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except CodedError as exc:
            code = status_for(exc.code)
            await context.abort(code, str(exc))
        except grpc.aio.AbortError:
            aborted = context.code()
            code = aborted if isinstance(aborted, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{method.__name__} failed unexpectedly: {exc}"
            )
        finally:
            observer = getattr(self, "observe", None)
            if observer is not None:
                observer(method.__name__, code.name, time.perf_counter() - started)
        raise AssertionError("unreachable")  # context.abort always raises

    return wrapper
