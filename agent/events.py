"""Events from the guest agent (container exits, OOM kills, output drops) and the
host-side fan-out to whoever listens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from agent.protocol import ExitStatus, ProtocolError, decode_json


class AgentEvent:
    """An event from the guest: ``kind`` (e.g. "container_exited") and its fields."""

    __slots__ = ("data", "kind")

    def __init__(self, kind: str, data: dict[str, Any]) -> None:
        self.kind = kind
        self.data = data

    @classmethod
    def decode(cls, payload: bytes) -> AgentEvent:
        """The event of an EVENT frame's payload; ProtocolError when it is not one."""
        message = decode_json(payload)
        kind = message.get("event")
        if not isinstance(kind, str) or not kind:
            raise ProtocolError("an event without a name")
        return cls(kind, message)

    def int_field(self, name: str, default: int = 0) -> int:
        """An integer field (``default`` when absent); ProtocolError when not an integer."""
        value = self.data.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"event {self.kind}: {name} is not an integer: {value!r}")
        return value

    @property
    def stream(self) -> int:
        """The stream the event is about (0: none)."""
        return self.int_field("stream")

    @property
    def container_id(self) -> str | None:
        value = self.data.get("container_id")
        return value if isinstance(value, str) else None

    @property
    def exit_status(self) -> ExitStatus | None:
        status = self.data.get("status")
        if not isinstance(status, dict):
            return None
        try:
            result: ExitStatus = ExitStatus.from_dict(status)
        except ValueError as exc:
            raise ProtocolError(f"event {self.kind}: bad status: {exc}") from exc
        return result

    def __repr__(self) -> str:
        return f"AgentEvent({self.kind!r}, {self.data!r})"


class EventHub:
    """Hands every event to the iterators of :meth:`events` and the callbacks of
    :meth:`on_event`, until :meth:`end` (the connection closed)."""

    def __init__(self) -> None:
        self._subscribers: list[asyncio.Queue[AgentEvent | None]] = []
        self._callbacks: list[Callable[[AgentEvent], None]] = []
        self.ended = False

    def publish(self, event: AgentEvent) -> None:
        if self.ended:
            return
        for queue in list(self._subscribers):
            queue.put_nowait(event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:  # a subscriber's bug must not stop the connection's reader
                continue

    def end(self) -> None:
        """No more events: every iterator of :meth:`events` ends."""
        if self.ended:
            return
        self.ended = True
        for queue in self._subscribers:
            queue.put_nowait(None)

    async def events(self) -> AsyncIterator[AgentEvent]:
        """Every event from now on; ends when the connection closes."""
        if self.ended:
            return
        queue: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._subscribers.remove(queue)

    def on_event(self, callback: Callable[[AgentEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every event; returns a function that unregisters it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)
