"""Standalone access controls: a per-client rate limit, and CORS for the publisher widget.

The rate limit is a token bucket per client address, in the process: `rate_per_minute`
requests a minute on average, bursts of up to `burst`. A request over it gets 429 with
`Retry-After` (whole seconds until a token is back), before any database or model work, so a
client in a loop costs nothing but the refusal. It is per process: with N uvicorn workers a
client gets up to N times the rate, which is the price of needing no shared store; a
deployment behind a proxy should rate-limit there too (the client address is the peer's,
X-Forwarded-For is not trusted).

/health and /metrics are exempt: probes and scrapers poll them on a schedule.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

EXEMPT_PATHS = frozenset({"/health", "/metrics"})
MAX_TRACKED_CLIENTS = 10_000  # buckets kept; full (idle) ones are dropped beyond this


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets by client key; `take(key)` returns 0 when allowed, else the seconds
    until a request would be."""

    def __init__(self, rate_per_minute: int, burst: int, clock=time.monotonic) -> None:
        self.rate = rate_per_minute / 60.0  # tokens per second
        self.burst = float(max(1, burst))
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget clients whose bucket has refilled (they would start full anyway)."""
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * self.rate >= self.burst:
                del self._buckets[key]
        if len(self._buckets) >= MAX_TRACKED_CLIENTS:  # all busy: forget the oldest half
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for key in oldest[: len(oldest) // 2]:
                del self._buckets[key]


class RateLimitMiddleware:
    """429 + Retry-After for a client over its rate (ASGI, ahead of routing)."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        key = client[0] if client else "unknown"
        wait = self.limiter.take(key)
        if wait == 0.0:
            await self.app(scope, receive, send)
            return
        retry_after = str(max(1, math.ceil(wait)))
        log.warning(
            "rate limit: %s refused, retry after %s s (stage api, url %s)",
            key,
            retry_after,
            scope["path"],
        )
        body = b'{"detail":"too many requests: retry after ' + retry_after.encode() + b' s"}'
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", retry_after.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
