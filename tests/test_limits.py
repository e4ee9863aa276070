"""Limits shared by every task process (blogqa.limits): several real worker processes
(tests/limits_driver.py: the real crawler and openai client) run at once against test
servers on 127.0.0.1 that record when each request arrived, with the limits kept in the
test database. Tolerances allow for the time between a grant in the database and the
request reaching the server on a loaded machine."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email.utils
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from blogqa import db, limits
from blogqa.config import load_settings
from blogqa.extract import extract_article
from blogqa.limits import SharedLimits, parse_duration, retry_after_seconds, server_pause
from blogqa.llm import OpenAIChat, chat_messages
from tests.fakes import ARTICLE_FILES, ARTICLES, start_openai_server, start_page_server

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 3
SLACK = 0.15  # seconds: grant in the database -> request at the server, under load
# The windows are measured at the server: a second pytest worker beside them can bunch the
# arrivals by more than SLACK, so these run on their own (see the `timing` mark).
pytestmark = pytest.mark.timing


@pytest.fixture
def dsn(settings) -> str:
    return db.database_dsn(settings)


@pytest.fixture
def shared(dsn) -> SharedLimits:
    return SharedLimits(dsn)


@pytest.fixture(autouse=True)
def _migrated(conn):
    """The `conn` fixture migrates the schema (migration 007 included) and empties it."""
    return conn


@pytest.fixture
def site():
    server = start_page_server(slow_seconds=0.3)
    yield server
    server.stop()


@pytest.fixture
def model_server():
    server = start_openai_server()
    yield server
    server.stop()


def _env(dsn: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, BLOGQA_DATABASE_URL=dsn, PYTHONPATH=PROJECT_ROOT)
    env.update(extra)
    return env


def _model_env(dsn: str, server, **extra: str) -> dict[str, str]:
    return _env(
        dsn,
        OPENAI_BASE_URL=f"{server.base_url}/v1",
        OPENAI_API_KEY=server.api_key,
        BLOGQA_LLM_PROVIDER="openai",
        BLOGQA_CHAT_MODEL="test-chat-model",
        BLOGQA_LLM_MAX_RETRIES="0",
        **extra,
    )


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.limits_driver", *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _run_workers(arg_lists: list[list[str]], env: dict[str, str]) -> list[dict]:
    """Start one worker per argument list, release them together once all are ready, and
    return each one's JSON outcome."""
    procs = [_spawn(args, env) for args in arg_lists]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
        return outcomes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _results(outcomes: list[dict]) -> list[str]:
    return [r for outcome in outcomes for r in outcome["results"]]


# ---------------------------------------------------------------- crawled hosts


def test_per_host_concurrency_holds_across_processes(dsn, site):
    urls = [[f"{site.base_url}/slow-{w}-{i}" for i in range(4)] for w in range(WORKERS)]
    outcomes = _run_workers(
        [["crawl", *u] for u in urls], _env(dsn, BLOGQA_PER_HOST_CONCURRENCY="2")
    )
    assert _results(outcomes) == ["200"] * 12
    # each process alone allows 2 at a time: 6 without the shared limit
    assert site.max_inflight <= 2
    assert len([p for p, _ in site.starts if p.startswith("/slow-")]) == 12


def test_crawl_delay_spaces_starts_across_processes(dsn, site):
    site.robots = "User-agent: *\nCrawl-delay: 0.4\n"
    urls = [
        [f"{site.base_url}/articles/{ARTICLE_FILES[0]}?w={w}&i={i}" for i in range(2)]
        for w in range(WORKERS)
    ]
    outcomes = _run_workers([["crawl", *u] for u in urls], _env(dsn))
    assert _results(outcomes) == ["200"] * 6
    starts = sorted(t for path, t in site.starts if path.startswith("/articles/"))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 6
    assert min(gaps) >= 0.4 - SLACK, gaps


def test_killed_holders_slot_is_recovered_after_its_lease(dsn, shared):
    scope = f"host killed-holder-{uuid.uuid4().hex[:8]}"
    lease = 1.0
    holder = _spawn(["hold", scope, str(lease)], _env(dsn))
    try:
        assert holder.stdout.readline().strip() == "ready"
        time.sleep(lease * 1.6)  # longer than the lease: the live holder renews it

        async def attempt(holder_id: str):
            return await shared.try_acquire(scope, holder=holder_id, max_slots=1, lease=lease)

        assert asyncio.run(attempt("probe-1")).granted is False
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        assert asyncio.run(attempt("probe-2")).granted is False  # its lease still runs

        async def wait_for_slot():
            permit = await asyncio.wait_for(shared.acquire(scope, max_slots=1), timeout=10)
            await permit.release()

        asyncio.run(wait_for_slot())
        assert time.monotonic() - killed <= lease + 2.0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_slot_is_released_at_once_on_completion_and_on_cancellation(settings, shared):
    scope = f"host released-{uuid.uuid4().hex[:8]}"

    async def scenario():
        permit = await shared.acquire(scope, max_slots=1)
        assert list(shared.state(scope)["slots"]) == [permit.holder]
        await permit.release()
        assert shared.state(scope)["slots"] == {}

        one_slot = dataclasses.replace(settings, per_host_concurrency=1)
        hosts = limits.HostLimits(one_slot, shared)
        entered = asyncio.Event()

        async def hold():
            async with hosts.slot(scope.removeprefix("host ")):
                entered.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(hold())
        await entered.wait()
        assert len(shared.state(scope)["slots"]) == 1
        waiter = asyncio.create_task(shared.acquire(scope, max_slots=1))
        await asyncio.sleep(0.1)
        waiter.cancel()  # a cancelled waiter leaves nothing behind
        task.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
        await asyncio.sleep(0.1)  # a grant racing the cancellation is undone in its thread
        assert shared.state(scope)["slots"] == {}

    asyncio.run(scenario())


# ---------------------------------------------------------------- model endpoint


def _arrivals(server) -> list[float]:
    return sorted(arrived for arrived, _, _ in server.chat_log)


def test_llm_in_flight_cap_holds_across_processes(dsn, model_server):
    model_server.latency = 0.3
    env = _model_env(dsn, model_server, BLOGQA_LLM_MAX_IN_FLIGHT="2")
    outcomes = _run_workers([["chat", "4", "4"]] * WORKERS, env)
    assert _results(outcomes) == ["ok"] * 12
    # each process alone allows 2 in flight: 6 without the shared cap
    assert model_server.chat_max_inflight <= 2


def test_llm_in_flight_cap_counts_every_model_of_the_endpoint(dsn, model_server):
    model_server.latency = model_server.embedding_latency = 0.3
    env = _model_env(dsn, model_server, BLOGQA_LLM_MAX_IN_FLIGHT="2")
    outcomes = _run_workers([["chat", "4", "4"], ["embed", "4", "4"]] * 2, env)
    assert _results(outcomes) == ["ok"] * 16
    # each model alone kept to 2 would allow 4 at once
    assert model_server.model_max_inflight <= 2
    assert model_server.embedding_calls == 8


def test_requests_per_minute_hold_over_every_window(dsn, model_server):
    rpm = 240  # 4 a second, at most one second's worth at once
    env = _model_env(dsn, model_server, BLOGQA_LLM_RPM=str(rpm))
    outcomes = _run_workers([["chat", "4", "4"]] * WORKERS, env)
    assert _results(outcomes) == ["ok"] * 12
    arrivals = _arrivals(model_server)
    rate = rpm / 60
    allowed_burst = rate * limits.RATE_BURST_SECONDS + 1
    for i, j in itertools.combinations(range(len(arrivals)), 2):
        window = arrivals[j] - arrivals[i]
        # j - i + 1 requests arrived within `window` seconds
        assert j - i + 1 <= allowed_burst + rate * (window + SLACK), (i, j, window)


def _after_answer(server, answered: float) -> list[float]:
    """Arrival times of the calls that arrived after `answered`, relative to it."""
    return [t - answered for t in _arrivals(server) if t > answered]


# Requests admitted just before a pause was recorded may land just after it; from then on
# nothing may arrive from any process until the pause has passed. Each worker keeps 2 calls
# of 0.2 s in flight, so without a shared pause the others go on arriving every 0.2 s.
GRACE = 0.4


def test_429_with_retry_after_pauses_every_process(dsn, model_server):
    model_server.latency = 0.2
    model_server.retry_after = "2"
    model_server.script.extend(["ok"] * 4 + ["429"])
    outcomes = _run_workers([["chat", "12", "2"]] * WORKERS, _model_env(dsn, model_server))
    results = _results(outcomes)
    assert results.count("ok") == 35 and len(results) == 36  # the 429 fails its call
    (answered,) = [done for _, done, behaviour in model_server.chat_log if behaviour == "429"]
    after = _after_answer(model_server, answered)
    assert [t for t in after if GRACE < t < 2.0 - SLACK] == [], after
    assert any(t >= 2.0 - SLACK for t in after)


def test_exhausted_remaining_requests_pause_until_reset(dsn, model_server):
    model_server.latency = 0.2
    exhausted = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    model_server.header_script.extend([{}] * 4 + [exhausted])
    outcomes = _run_workers([["chat", "12", "2"]] * WORKERS, _model_env(dsn, model_server))
    assert _results(outcomes) == ["ok"] * 36
    fifth = sorted(model_server.chat_log)[4]  # answered with the exhausted count
    after = _after_answer(model_server, fifth[1])
    assert [t for t in after if GRACE < t < 2.0 - SLACK] == [], after
    assert any(t >= 2.0 - SLACK for t in after)


def test_tokens_per_minute_charge_is_the_estimate_corrected_by_usage(model_server, monkeypatch):
    tpm = 60_000  # 1000 tokens a second
    monkeypatch.setenv("OPENAI_BASE_URL", f"{model_server.base_url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", model_server.api_key)
    monkeypatch.setenv("BLOGQA_CHAT_MODEL", "test-chat-model")
    monkeypatch.setenv("BLOGQA_LLM_TPM", str(tpm))
    article = extract_article((ARTICLES / "01-sourdough-starter.html").read_text("utf-8"))

    async def one_call():
        provider = OpenAIChat(load_settings())
        try:
            charged = provider._tokens_to_charge(chat_messages(None, article.text))
            before = time.time()
            result = await provider.summarize(url="https://x.test/1", title=None, text=article.text)
            return provider.limits, charged, before, time.time(), result
        finally:
            await provider.aclose()

    endpoint, charged, before, after, result = asyncio.run(one_call())
    used = sum(c.prompt_tokens + c.completion_tokens for c in result.calls)
    assert charged > used  # the estimate reserves CHAT_OUTPUT_TOKENS for the reply
    tat = endpoint.shared.state(endpoint.scope)["tokens_tat"].timestamp()
    # the budget the request took: what it used, not the estimate (nor nothing)
    assert before + used / 1000 - 0.05 <= tat <= after + used / 1000 + 0.05


def test_tokens_per_minute_space_requests(shared):
    scope = f"model tpm-{uuid.uuid4().hex[:8]}"

    async def six_requests() -> list[float]:
        starts = []
        for _ in range(6):
            permit = await shared.acquire(scope, tpm=6000, tokens=50)  # half a second each
            starts.append(time.monotonic())
            await permit.release()
        return starts

    starts = asyncio.run(six_requests())
    # one second's worth at once (3 requests: the third starts as the second ends), then
    # 0.5 s apart
    assert starts[-1] - starts[0] >= 3 * 0.5 - 0.05


# ---------------------------------------------------------------- headers


def test_reset_durations_are_read_as_openai_writes_them():
    assert parse_duration("6m0s") == 360
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == 3723.5
    assert parse_duration("2") == 2
    assert parse_duration("soon") is None


def test_retry_after_ms_comes_before_retry_after():
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "9"}) == 9
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0
    assert retry_after_seconds({}) is None


def test_retry_after_value_reads_seconds_and_http_dates():
    """One Retry-After value, as the crawler and the model clients read it."""
    in_an_hour = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert 3500 < limits.retry_after_value(email.utils.format_datetime(in_an_hour, True)) <= 3600
    assert limits.retry_after_value("7") == 7
    assert limits.retry_after_value("-3") == 0
    # a date whose zone is -0000 parses without one: taken as UTC, not an error
    assert limits.retry_after_value("Wed, 21 Oct 2015 07:28:00 -0000") == 0
    assert limits.retry_after_value("soon") is None
    assert limits.retry_after_value(None) is None


def test_server_pause_from_status_and_headers():
    assert server_pause(200, {}) is None
    assert server_pause(200, {"x-ratelimit-remaining-requests": "3"}) is None
    seconds, reason = server_pause(
        200, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2s"}
    )
    assert seconds == 2 and "remaining-tokens" in reason
    assert server_pause(429, {"retry-after": "7"})[0] == 7
    assert server_pause(429, {})[0] == limits.DEFAULT_429_PAUSE_SECONDS
    assert server_pause(429, {"retry-after": "0"}) is None  # come back now
    assert server_pause(503, {}) is None
    assert server_pause(429, {"retry-after": "86400"})[0] == limits.MAX_SERVER_PAUSE_SECONDS


def test_a_database_that_cannot_keep_the_limits_is_passed_by(dsn, caplog):
    from psycopg.conninfo import make_conninfo

    read_only = SharedLimits(make_conninfo(dsn, options="-c default_transaction_read_only=on"))

    async def twice():
        for _ in range(2):
            permit = await read_only.acquire("host read-only.test", max_slots=1)
            await permit.release()

    asyncio.run(twice())  # the second would wait forever on a slot nobody released
    assert read_only.disabled
    assert "shared limits unavailable" in caplog.text
