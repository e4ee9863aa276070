"""A circuit breaker around the model endpoint, shared by every task through Postgres.

When the endpoint keeps failing (rate limits, 5xx, timeouts), calling it for every page of
every chunk only deepens the outage and burns each URL's attempts. After
BLOGQA_LLM_BREAKER_THRESHOLD consecutive transient failures a task opens the breaker for
BLOGQA_LLM_BREAKER_COOLDOWN_SECONDS: it stops calling, and every task that reaches an LLM
stage meanwhile (in any process) puts its URLs back in the queue, due when the cool-down ends,
without spending an attempt.
"""

from __future__ import annotations

import datetime as dt
import logging

import psycopg

from blogqa import sql_queries
from blogqa.config import Settings
from blogqa.errors import PageError

log = logging.getLogger(__name__)

SQL = sql_queries.load(__name__)  # queries/breaker.sql

LLM = "llm"


class CircuitOpenError(PageError):
    """The breaker is open: the URL was not tried and goes back to the queue as it was."""

    def __init__(self, name: str, seconds_left: float, stage: str) -> None:
        super().__init__(
            f"circuit breaker {name!r} is open for another {seconds_left:.0f}s after repeated "
            "model endpoint failures; not called",
            stage=stage,
            permanent=False,
            retry_after=seconds_left,
        )
        self.seconds_left = seconds_left


class CircuitBreaker:
    """Counts consecutive transient failures inside one task; trips the shared state."""

    def __init__(self, settings: Settings, name: str = LLM) -> None:
        self.name = name
        self.threshold = settings.breaker_threshold
        self.cooldown = settings.breaker_cooldown
        self.consecutive_failures = 0
        self.open_until: dt.datetime | None = None
        self.tripped = False

    def load(self, conn: psycopg.Connection) -> None:
        """Pick up a cool-down opened by another task."""
        row = conn.execute(SQL.open_until, (self.name,)).fetchone()
        self.open_until = row[0] if row else None

    def seconds_left(self) -> float:
        if self.open_until is None:
            return 0.0
        return max((self.open_until - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)

    def check(self, stage: str) -> None:
        """Raise CircuitOpenError instead of making a call while the breaker is open."""
        left = self.seconds_left()
        if left > 0:
            raise CircuitOpenError(self.name, left, stage)

    def record(self, error: PageError | None) -> None:
        """Feed one call's outcome: success resets the count, transient failures add to it."""
        if error is None:
            self.consecutive_failures = 0
            return
        if error.permanent or isinstance(error, CircuitOpenError):
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.threshold and self.seconds_left() == 0:
            self.open_until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.cooldown)
            self.tripped = True
            log.warning(
                "stage=llm circuit breaker %r opened for %.0fs after %d consecutive failures: %s",
                self.name,
                self.cooldown,
                self.consecutive_failures,
                error,
            )

    def save(self, conn: psycopg.Connection, reason: str = "") -> None:
        """Publish a trip to the other tasks (no-op when this task did not trip it)."""
        if not self.tripped:
            return
        conn.execute(
            SQL.trip,
            {"name": self.name, "cooldown": self.seconds_left(), "reason": reason[:500]},
        )
        self.tripped = False
