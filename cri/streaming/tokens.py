"""Single-use, short-lived tokens naming the pending streaming requests."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cri.streaming.errors import TooManyPendingRequests

#: How long a URL stays valid.
TOKEN_TTL = 60.0
#: Pending (handed out, not yet used) requests at most.
MAX_PENDING = 1000


@dataclass(frozen=True)
class PendingRequest:
    kind: str  # "exec", "attach" or "portforward"
    request: Any  # the CRI request message
    expires: float


class RequestCache:
    def __init__(
        self,
        *,
        ttl: float = TOKEN_TTL,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_pending = max_pending
        self._clock = clock
        self._pending: OrderedDict[str, PendingRequest] = OrderedDict()

    def __len__(self) -> int:
        self._prune()
        return len(self._pending)

    def _prune(self) -> None:
        now = self._clock()
        while self._pending:
            token, entry = next(iter(self._pending.items()))
            if entry.expires > now:
                break
            del self._pending[token]

    def insert(self, kind: str, request: Any) -> str:
        self._prune()
        if len(self._pending) >= self.max_pending:
            raise TooManyPendingRequests(
                f"{len(self._pending)} streaming requests are pending; retry in a minute"
            )
        token = secrets.token_urlsafe(24)
        self._pending[token] = PendingRequest(kind, request, self._clock() + self.ttl)
        return token

    def consume(self, token: str) -> PendingRequest | None:
        """The request for ``token`` (removing it), or None if unknown or expired."""
        entry = self._pending.pop(token, None)
        if entry is None or entry.expires <= self._clock():
            return None
        return entry
