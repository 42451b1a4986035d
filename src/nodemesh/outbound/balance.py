"""Latency-aware load balancing: power of two choices over peak-EWMA cost.  Pure, no I/O.

Theory of operation
-------------------
Each endpoint keeps an RTT estimate and a count of requests in flight.  To pick, draw two
distinct endpoints at random and take the one with the lower cost

    cost = rtt_estimate × (pending + 1)

so a slow endpoint and a busy one both look expensive.  On each response the estimate takes a
new peak at once (``rtt > estimate`` → ``estimate = rtt``) and otherwise decays toward the
observed RTT with weight ``w = exp(-elapsed / DECAY)``.  Reading the cost decays it toward zero
as time passes, so an endpoint that was slow long ago gets probed again.

An endpoint with no history costs nothing while idle, so a new instance is probed at once
instead of waiting for the others' estimates to decay below a guess; with a request already in
flight it costs a large penalty, so it is not flooded before its first answer (both Finagle's
rules).  Its first observed RTT replaces the ``DEFAULT_RTT`` placeholder outright.

A failure (connect error, reset, 5xx from the proxy itself) is recorded as an RTT of at least
``FAILURE_PENALTY``, so an endpoint that fails fast is not mistaken for one that answers fast.

Constants follow Finagle and Linkerd: DECAY 10 s, a 30 ms estimate before the first answer.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from nodemesh.errors import NoEndpoints

DECAY = 10.0  # seconds; Finagle and Linkerd default
DEFAULT_RTT = 0.030  # seconds; estimate before the first answer (Linkerd default)
PENALTY = 1e6  # seconds; an unknown endpoint with a request in flight (Finagle)
FAILURE_PENALTY = 1.0  # seconds; the RTT recorded for a connection failure

E = TypeVar("E", bound=Hashable)


class _Stats:
    __slots__ = ("estimate", "pending", "seen", "stamp")

    def __init__(self, now: float) -> None:
        self.estimate = DEFAULT_RTT
        self.pending = 0
        self.stamp = now
        self.seen = False

    def cost(self, now: float) -> float:
        elapsed = max(now - self.stamp, 0.0)
        self.estimate *= math.exp(-elapsed / DECAY)
        self.stamp = now
        if not self.seen:
            return PENALTY + self.pending if self.pending else 0.0
        return self.estimate * (self.pending + 1)

    def observe(self, rtt: float, now: float) -> None:
        if not self.seen or rtt > self.estimate:
            self.estimate = rtt
        else:
            w = math.exp(-max(now - self.stamp, 0.0) / DECAY)
            self.estimate = self.estimate * w + rtt * (1.0 - w)
        self.stamp = now
        self.seen = True


class Balancer(Generic[E]):
    """P2C peak-EWMA over a changing set of endpoints.

    ``update`` replaces the endpoint set, keeping the statistics of endpoints that stay.
    ``pick`` → endpoint (pending += 1); the caller must call ``done`` exactly once after.
    """

    def __init__(
        self,
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._rng = rng or random.Random()
        self._endpoints: tuple[E, ...] = ()
        self._stats: dict[E, _Stats] = {}
        self.source: object = None  # the sequence last passed to ``update`` (identity checks)

    def __repr__(self) -> str:
        return f"<Balancer {self.name} endpoints={len(self._endpoints)}>"

    @property
    def endpoints(self) -> tuple[E, ...]:
        return self._endpoints

    def update(self, endpoints: Sequence[E]) -> None:
        self.source = endpoints
        self._endpoints = tuple(endpoints)
        now = self._clock()
        old = self._stats
        # Endpoints that left keep their stats only while requests to them are still pending.
        self._stats = {e: old.get(e) or _Stats(now) for e in self._endpoints}
        for e, s in old.items():
            if e not in self._stats and s.pending:
                self._stats[e] = s

    def pick(self) -> E:
        eps = self._endpoints
        n = len(eps)
        if n == 0:
            raise NoEndpoints(f"service {self.name} has no healthy endpoints")
        if n == 1:
            chosen = eps[0]
        else:
            i = self._rng.randrange(n)
            j = self._rng.randrange(n - 1)
            if j >= i:
                j += 1
            now = self._clock()
            a, b = eps[i], eps[j]
            chosen = a if self._stats[a].cost(now) <= self._stats[b].cost(now) else b
        self._stats[chosen].pending += 1
        return chosen

    def done(self, endpoint: E, rtt: float, *, failed: bool = False) -> None:
        s = self._stats.get(endpoint)
        if s is None:
            return
        s.pending = max(s.pending - 1, 0)
        s.observe(max(rtt, FAILURE_PENALTY) if failed else rtt, self._clock())
        if s.pending == 0 and endpoint not in self._endpoints:
            del self._stats[endpoint]

    def cost(self, endpoint: E) -> float:
        return self._stats[endpoint].cost(self._clock())
