"""Limits shared by every task process on every worker, kept in PostgreSQL.

Under Airflow's LocalExecutor or CeleryExecutor several crawl and summarize/embed tasks run
at once, in different processes and on different machines; a limit kept in one process would
be multiplied by the number of tasks. So the limits live in the results database, in one row
per scope of `blogqa.shared_limits` (migration 007), and every process using that database
shares them:

- `host <netloc>`: at most BLOGQA_PER_HOST_CONCURRENCY requests in flight to one host, and
  the host's Crawl-delay between consecutive request starts (each request reserves its start
  time atomically: "next allowed start" moves on by the delay);
- `endpoint <base url>`: at most BLOGQA_LLM_MAX_IN_FLIGHT requests in flight to the model
  endpoint, chat and embedding requests together (what the server has to hold at once);
- `model <base url> <model>`: BLOGQA_LLM_RPM requests / BLOGQA_LLM_TPM tokens per minute,
  each model of an endpoint on its own budget (as OpenAI counts them). When the server says
  so (429 with Retry-After or retry-after-ms, or x-ratelimit-remaining-requests/-tokens at 0
  with its x-ratelimit-reset-*) every process pauses its requests to that model until the
  time given.

A model request passes its model's row first (pauses, rates), then takes a slot of its
endpoint's: a request waiting out a pause or a rate never holds a slot another model could
use. One that has passed its model's row and then waits for a slot is not checked again, so
a pause recorded meanwhile lets it through once.

Costs: one statement per attempt to acquire (`blogqa.limit_acquire`, which locks the scope's
row for microseconds; a model request makes one on each of its two rows) and one per release; no transaction stays open while a request is in
flight. The statements run on one connection per process, in a worker thread, so the event
loop never blocks on the database. A slot is a lease renewed while held (every third of
SLOT_LEASE_SECONDS): a holder killed with SIGKILL frees its slot within SLOT_LEASE_SECONDS,
and normal completion or cancellation releases it at once. Waiting polls with short,
capped, jittered sleeps, and is cancellable. A process whose database role may not write the
table (a read-only API login) or whose database lacks migration 007 goes on without the
shared limits, with one warning, rather than failing its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import email.utils
import logging
import os
import random
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import psycopg

from blogqa import sql_queries
from blogqa.config import Settings

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/limits.sql

SLOT_LEASE_SECONDS = 30.0  # a killed holder's slot is free again after this
RATE_BURST_SECONDS = 1.0  # RPM/TPM: up to one second's worth at once, then evenly spaced
POLL_FIRST_SECONDS = 0.01  # all slots taken: first re-check, doubling up to the cap
POLL_CAP_SECONDS = 0.25
WAIT_CAP_SECONDS = 1.0  # paused or rate-limited: re-check at least this often
MAX_SERVER_PAUSE_SECONDS = 600.0  # a longer Retry-After is capped (tasks fail and retry)
DEFAULT_429_PAUSE_SECONDS = 1.0  # a 429 that says nothing about when to come back
# Tokens a chat request is charged for its reply before the usage is known (the requests
# set no max_tokens; a summary and 3-5 pairs take about 300-600), corrected afterwards.
CHAT_OUTPUT_TOKENS = 1024

# Errors meaning "these limits cannot be kept in this database", not "the database is down".
UNUSABLE_ERRORS = (
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
)


def host_scope(netloc: str) -> str:
    return f"host {netloc.lower()}"


def model_scope(endpoint: str, model: str) -> str:
    return f"model {endpoint.rstrip('/')} {model}"


def endpoint_scope(endpoint: str) -> str:
    return f"endpoint {endpoint.rstrip('/')}"


# ---------------------------------------------------------------- the database side

_connections: dict[tuple[int, str], psycopg.Connection] = {}
_connections_lock = threading.Lock()


def _connection(dsn: str, *, fresh: bool = False) -> psycopg.Connection:
    """This process's limits connection to `dsn`. Keyed by pid: a forked child opens its own
    and never touches (or closes) the one it inherited."""
    key = (os.getpid(), dsn)
    with _connections_lock:
        conn = _connections.get(key)
        if fresh or conn is None or conn.closed or conn.broken:
            conn = psycopg.connect(dsn, autocommit=True, application_name="blogqa-limits")
            _connections[key] = conn
        return conn


def _execute(dsn: str, query: str, params: Mapping[str, Any]) -> tuple | None:
    """Run one statement (in a worker thread); reconnect once if the connection broke."""
    for attempt in (1, 2):
        conn = _connection(dsn, fresh=attempt == 2)
        try:
            cur = conn.execute(query, params)
            return cur.fetchone() if cur.description else None
        except psycopg.OperationalError:
            if attempt == 2 or not conn.broken:
                raise
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Grant:
    """The answer of one acquire attempt."""

    granted: bool
    wait: float | None  # granted: until the reserved start; refused: hint (None: poll)
    reason: str | None


class _Attempt:
    """One acquire statement running in a thread, and whether its caller gave up on it, so
    a slot granted to a cancelled caller is released instead of waiting for its lease."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.result: Grant | None = None


class SharedLimits:
    """This process's handle on the limits of one results database. The DSN is looked up on
    first use (building it may start the embedded database), so creating one is free."""

    def __init__(self, dsn: str | Callable[[], str]) -> None:
        self._dsn_source = dsn
        self._dsn: str | None = dsn if isinstance(dsn, str) else None
        self.disabled = False  # the database cannot keep them (see UNUSABLE_ERRORS)

    @classmethod
    def for_settings(cls, settings: Settings) -> SharedLimits:
        from blogqa import db

        return cls(lambda: db.database_dsn(settings))

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            self._dsn = self._dsn_source()  # type: ignore[operator]
        return self._dsn

    async def _run(self, query: str, params: Mapping[str, Any]) -> tuple | None:
        """One statement in a worker thread. Cancelling the caller does not stop a statement
        already sent (releases and renewals always complete)."""
        if self.disabled:
            return None
        loop = asyncio.get_running_loop()
        return await asyncio.shield(loop.run_in_executor(None, _execute, self.dsn, query, params))

    async def try_acquire(
        self,
        scope: str,
        *,
        holder: str,
        max_slots: int | None = None,
        spacing: float = 0.0,
        rpm: float | None = None,
        tpm: float | None = None,
        tokens: float = 0.0,
        lease: float = SLOT_LEASE_SECONDS,
    ) -> Grant:
        """One attempt, no waiting. If the caller is cancelled while the statement runs, a
        slot it granted is released right away."""
        if self.disabled:
            return Grant(True, 0.0, None)
        params = {
            "scope": scope,
            "holder": holder,
            "lease": lease,
            "max_slots": max_slots,
            "spacing": spacing,
            "rpm": rpm,
            "tpm": tpm,
            "tokens": tokens,
            "burst": RATE_BURST_SECONDS,
        }
        attempt = _Attempt()
        dsn = self.dsn
        release = {"scope": scope, "holder": holder, "pause": 0.0, "reason": None}

        def work() -> Grant:
            granted, wait, reason = _execute(dsn, SQL.acquire, params)  # type: ignore[misc]
            grant = Grant(bool(granted), wait, reason)
            with attempt.lock:
                attempt.result = grant
                undo = attempt.abandoned and grant.granted and max_slots is not None
            if undo:
                _execute(dsn, SQL.release, release)
            return grant

        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, work)
        try:
            return await asyncio.shield(future)
        except UNUSABLE_ERRORS as exc:
            log.warning(
                "%s: shared limits unavailable in this database (%s); this process goes on "
                "without them",
                scope,
                str(exc).splitlines()[0],
            )
            self.disabled = True
            return Grant(True, 0.0, None)
        except asyncio.CancelledError:
            with attempt.lock:
                attempt.abandoned = True
                finished = attempt.result
            if finished is not None and finished.granted and max_slots is not None:
                loop.run_in_executor(None, _execute, dsn, SQL.release, release)
            raise

    async def acquire(
        self,
        scope: str,
        *,
        max_slots: int | None = None,
        spacing: float = 0.0,
        rpm: float | None = None,
        tpm: float | None = None,
        tokens: float = 0.0,
        lease: float = SLOT_LEASE_SECONDS,
        label: str = "",
    ) -> Permit:
        """Wait until the scope's limits allow one more request; the Permit must be released
        (`Permit.release`). Refused attempts sleep for the hint the database gave (paused,
        rate) or a doubling poll interval (slots taken), each capped and jittered."""
        holder = uuid.uuid4().hex
        poll = POLL_FIRST_SECONDS
        logged: str | None = None
        while True:
            grant = await self.try_acquire(
                scope,
                holder=holder,
                max_slots=max_slots,
                spacing=spacing,
                rpm=rpm,
                tpm=tpm,
                tokens=tokens,
                lease=lease,
            )
            if grant.granted:
                holds_slot = max_slots is not None and not self.disabled
                return Permit(self, scope, holder, holds_slot, grant.wait or 0.0, lease)
            if grant.wait is None:
                delay, poll = poll, min(poll * 2, POLL_CAP_SECONDS)
            else:
                delay = min(max(grant.wait, POLL_FIRST_SECONDS), WAIT_CAP_SECONDS)
                if grant.reason != "rate limit" and grant.reason != logged:
                    logged = grant.reason
                    log.info("%s waiting %.1fs: %s", label or scope, grant.wait, grant.reason)
            await asyncio.sleep(delay * random.uniform(1.0, 1.2))

    async def pause(self, scope: str, seconds: float, reason: str) -> None:
        """Pause every process's requests in `scope` for `seconds` (without a slot)."""
        params = {"scope": scope, "holder": "", "pause": seconds, "reason": reason}
        await self._run(SQL.release, params)

    async def correct_tokens(self, scope: str, delta: float, tpm: float) -> None:
        await self._run(SQL.correct_tokens, {"scope": scope, "delta": delta, "tpm": tpm})

    def state(self, scope: str) -> dict | None:
        """The scope's row (for tests and diagnostics); blocking."""
        conn = _connection(self.dsn)
        cur = conn.execute(SQL.state, {"scope": scope})
        row = cur.fetchone()
        return dict(zip([d.name for d in cur.description], row, strict=True)) if row else None


@dataclass
class Permit:
    """One granted request: its slot (if the scope counts slots) is held until `release`."""

    limits: SharedLimits
    scope: str
    holder: str
    holds_slot: bool
    start_delay: float  # the reserved start (Crawl-delay) is this many seconds away
    lease: float
    _keeper: asyncio.Task | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.holds_slot:
            self._keeper = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        params = {"scope": self.scope, "holder": self.holder, "lease": self.lease}
        while True:
            await asyncio.sleep(self.lease / 3)
            await self.limits._run(SQL.renew, params)

    async def release(self, *, pause: float = 0.0, reason: str | None = None) -> None:
        """Give the slot back; with `pause`, also pause the scope (one statement)."""
        if self._released:
            return
        self._released = True
        if self._keeper is not None:
            self._keeper.cancel()
        if not self.holds_slot and pause <= 0:
            return
        params = {"scope": self.scope, "holder": self.holder, "pause": pause, "reason": reason}
        await self.limits._run(SQL.release, params)


# ---------------------------------------------------------------- crawled hosts


class HostLimits:
    """Per-host concurrency and Crawl-delay for one crawl task, shared with every other.

    An in-process semaphore of the same size sits in front of the database, so a task with
    more pages of one host than slots queues locally instead of polling."""

    def __init__(self, settings: Settings, shared: SharedLimits | None = None) -> None:
        self.concurrency = settings.per_host_concurrency
        self.shared = shared or SharedLimits.for_settings(settings)
        self._gates: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def slot(self, netloc: str, delay: float = 0.0) -> AsyncIterator[None]:
        """Hold one of the host's slots, started no sooner than its Crawl-delay allows."""
        host = netloc.lower()
        gate = self._gates.setdefault(host, asyncio.Semaphore(self.concurrency))
        async with gate:
            permit = await self.shared.acquire(
                host_scope(host),
                max_slots=self.concurrency,
                spacing=delay,
                label=f"stage=crawl host={host}",
            )
            try:
                if permit.start_delay > 0:
                    await asyncio.sleep(permit.start_delay)
                yield
            finally:
                await permit.release()


# ---------------------------------------------------------------- model endpoints

_request_tokens: contextvars.ContextVar[float] = contextvars.ContextVar(
    "blogqa_request_tokens", default=0.0
)


@contextlib.contextmanager
def charging(tokens: float) -> Iterator[None]:
    """Charge each HTTP request made inside this block `tokens` against BLOGQA_LLM_TPM (the
    transport reads it; the client's own retries are charged again)."""
    token = _request_tokens.set(tokens)
    try:
        yield
    finally:
        _request_tokens.reset(token)


@dataclass
class EndpointLimits:
    """The shared limits one model's requests go through: the endpoint's requests in flight
    (every model's together), and the model's requests and tokens per minute and the pauses
    the server asks for. `bind` sets the endpoint once the client knows its base URL."""

    shared: SharedLimits
    model: str
    stage: str
    max_in_flight: int  # 0: no shared cap
    rpm: int | None
    tpm: int | None
    endpoint: str = ""
    lease: float = SLOT_LEASE_SECONDS

    @classmethod
    def for_settings(cls, settings: Settings, model: str, stage: str) -> EndpointLimits:
        return cls(
            SharedLimits.for_settings(settings),
            model,
            stage,
            settings.llm_max_in_flight,
            settings.llm_rpm,
            settings.llm_tpm,
        )

    def bind(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")

    @property
    def scope(self) -> str:
        """The model's row: its rates and pauses."""
        return model_scope(self.endpoint, self.model)

    @property
    def slots_scope(self) -> str:
        """The endpoint's row: its requests in flight, every model's."""
        return endpoint_scope(self.endpoint)

    @property
    def counts_tokens(self) -> bool:
        return self.tpm is not None

    @property
    def label(self) -> str:
        return f"stage={self.stage} endpoint={self.endpoint} model={self.model}"

    async def admit(self, tokens: float = 0.0) -> Permit:
        """Wait until the model may send one request of about `tokens` tokens, then for a
        slot of the endpoint's; the Permit holds the slot (if the endpoint has a cap)."""
        passed = await self.shared.acquire(
            self.scope,
            rpm=self.rpm,
            tpm=self.tpm,
            tokens=tokens if self.tpm is not None else 0.0,
            label=self.label,
        )
        if not self.max_in_flight:
            return passed
        return await self.shared.acquire(
            self.slots_scope, max_slots=self.max_in_flight, lease=self.lease, label=self.label
        )

    async def pause(self, seconds: float, reason: str) -> None:
        """Pause every process's requests to this model for `seconds`."""
        await self.shared.pause(self.scope, seconds, reason)

    async def settle(self, charged: float, used: int | None) -> None:
        """Correct the tokens charged for a request by the usage the server reported."""
        if self.tpm is None or used is None or used == charged:
            return
        await self.shared.correct_tokens(self.scope, used - charged, self.tpm)

    def transport(self, inner: Any) -> LimitedTransport:
        return LimitedTransport(self, inner)


class LimitedTransport:
    """An httpx2 transport (the interface `openai` clients take: `handle_async_request`,
    `aclose`, async context manager) that admits every HTTP request through EndpointLimits,
    the client's own retries included, and reads the rate-limit headers of every response.

    The slot is released when the response headers arrive: a non-streamed completion is
    finished by then. Duck-typed rather than a subclass of httpx2.AsyncBaseTransport so
    importing this module (every crawl task does) does not import httpx2.
    """

    def __init__(self, limits: EndpointLimits, inner: Any) -> None:
        self.limits = limits
        self.inner = inner

    async def handle_async_request(self, request: Any) -> Any:
        permit = await self.limits.admit(_request_tokens.get())
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            await permit.release()
            raise
        try:
            pause = server_pause(response.status_code, response.headers)
            if pause is not None:  # recorded before the slot is free for another request
                seconds, reason = pause
                log.warning("%s every worker pauses %.2fs: %s", self.limits.label, seconds, reason)
                await self.limits.pause(seconds, reason)
        finally:
            await permit.release()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.inner.__aexit__(*exc_info)


# ---------------------------------------------------------------- response headers

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds in an x-ratelimit-reset-* value: Go-style ("1s", "6m0s", "20ms", "1h2m3.5s")
    or a plain number of seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """retry-after-ms, else Retry-After (seconds or an HTTP date), as the openai client
    reads them; None when absent or unreadable."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        with contextlib.suppress(ValueError):
            return max(float(raw_ms) / 1000.0, 0.0)
    return retry_after_value(headers.get("retry-after"))


def retry_after_value(raw: str | None) -> float | None:
    """Seconds to wait from one Retry-After value (seconds or an HTTP date; a date without
    a zone taken as UTC); None when absent or unreadable. Shared by the model clients and
    the crawler, so both read a server's answer the same way."""
    if not raw:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)


def server_pause(status: int, headers: Mapping[str, str]) -> tuple[float, str] | None:
    """How long every client should stop sending to this model, from one response: a 429
    (or a 503 with Retry-After) for its Retry-After, and an x-ratelimit-remaining-requests
    or -tokens of 0 until its x-ratelimit-reset-*. Capped at MAX_SERVER_PAUSE_SECONDS."""
    waits: list[tuple[float, str]] = []
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if remaining is None:
            continue
        try:
            exhausted = float(remaining) <= 0
        except ValueError:
            continue
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
        if exhausted and reset:
            waits.append((reset, f"x-ratelimit-remaining-{kind}=0, reset in {reset:g}s"))
    if status in (429, 503):
        retry = retry_after_seconds(headers)
        if retry is not None:
            waits.append((retry, f"HTTP {status} with Retry-After {retry:g}s"))
        elif status == 429 and not waits:
            waits.append((DEFAULT_429_PAUSE_SECONDS, "HTTP 429 without Retry-After"))
    waits = [w for w in waits if w[0] > 0]
    if not waits:
        return None
    seconds, reason = max(waits)
    return min(seconds, MAX_SERVER_PAUSE_SECONDS), reason
