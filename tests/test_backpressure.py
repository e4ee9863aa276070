"""Back-pressure on the model endpoint: the circuit breaker, the blogqa_llm pool, and leases
kept alive (and given up) while a stage works."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from blogqa import pipeline, queue, queue_admin
from blogqa.config import load_settings
from blogqa.leases import LeaseKeeper, LeaseLostError
from tests.fakes import ARTICLE_FILES


def claim_and_crawl(conn, settings, urls: list[str]) -> list[dict]:
    queue.enqueue(conn, urls)
    leases = queue.claim(conn, 100, owner="test", lease_seconds=300)
    return pipeline.crawl_chunk([lease.ref() for lease in leases], settings)


def rows(conn) -> dict[str, tuple]:
    found = conn.execute(
        "SELECT url, status, attempts, last_stage, error_history->-1->>'class',"
        " run_after > now() + interval '20 seconds' FROM blogqa.url_queue"
    ).fetchall()
    return {r[0]: r[1:] for r in found}


@pytest.fixture
def llm_settings(openai_env):
    return dataclasses.replace(
        load_settings(),
        breaker_threshold=3,
        breaker_cooldown=30,
        llm_concurrency=1,  # one call at a time: the breaker's count is deterministic
        llm_max_retries=0,
        retry_base_seconds=0.01,
    )


def test_breaker_opens_and_defers_the_rest_without_spending_attempts(
    conn, llm_settings, page_server, openai_env
):
    urls = [page_server.base_url + "/articles/" + name for name in ARTICLE_FILES[:8]]
    refs = claim_and_crawl(conn, llm_settings, urls)
    openai_env.draw_fault.rates = {"500": 1.0}  # the endpoint is down
    before = openai_env.chat_calls

    survivors = pipeline.summarize_chunk(refs, llm_settings)

    assert survivors == []
    assert openai_env.chat_calls - before == 3  # threshold reached, then no more calls
    state = rows(conn)
    failed = [u for u, r in state.items() if r[3] == "transient"]
    deferred = [u for u, r in state.items() if r[3] == "deferred"]
    assert len(failed) == 3 and len(deferred) == 5
    for url in failed:
        assert state[url][:2] == ("queued", 1)  # the attempt was spent
    for url in deferred:
        status, attempts, stage, _, due_later = state[url]
        assert (status, attempts, stage, due_later) == ("queued", 0, "summarize", True)
    open_until = conn.execute(
        "SELECT open_until > now() + interval '20 seconds', opened_count"
        " FROM blogqa.circuit_breakers WHERE name = 'llm'"
    ).fetchone()
    assert open_until == (True, 1)


def test_open_breaker_is_respected_by_the_next_task_without_calling(
    conn, llm_settings, page_server, openai_env
):
    conn.execute(
        "INSERT INTO blogqa.circuit_breakers (name, open_until) VALUES"
        " ('llm', now() + interval '1 minute')"
    )
    url = page_server.base_url + "/articles/" + ARTICLE_FILES[0]
    refs = claim_and_crawl(conn, llm_settings, [url])
    before = openai_env.chat_calls

    assert pipeline.summarize_chunk(refs, llm_settings) == []

    assert openai_env.chat_calls == before
    status, attempts, stage, kind, due_later = rows(conn)[url]
    assert (status, attempts, stage, kind, due_later) == (
        "queued",
        0,
        "summarize",
        "deferred",
        True,
    )


def test_breaker_resets_on_success(conn, llm_settings, page_server, openai_env):
    urls = [page_server.base_url + "/articles/" + name for name in ARTICLE_FILES[:6]]
    refs = claim_and_crawl(conn, llm_settings, urls)
    openai_env.script.extend(["500", "500", "ok", "500", "500", "ok"])  # never 3 in a row

    survivors = pipeline.summarize_chunk(refs, llm_settings)

    assert len(survivors) == 2
    assert conn.execute("SELECT count(*) FROM blogqa.circuit_breakers").fetchone()[0] == 0


def test_lease_keeper_renews_while_work_goes_on_and_notices_a_cancel(conn, settings):
    short = dataclasses.replace(settings, lease_seconds=3)  # renewed every second
    queue.enqueue(conn, ["https://example.com/a", "https://example.com/b"])
    leases = queue.claim(conn, 10, owner="test", lease_seconds=3)

    def lease_left(url: str) -> float:
        return conn.execute(
            "SELECT extract(epoch FROM lease_until - now()) FROM blogqa.url_queue WHERE url = %s",
            (url,),
        ).fetchone()[0]

    async def work():
        async with LeaseKeeper(short, leases) as keeper:
            await asyncio.sleep(4.5)  # longer than the lease itself
            still_held = float(lease_left("https://example.com/a"))
            queue_admin.cancel(conn, "https://example.com/b")
            await asyncio.sleep(1.5)
            keeper.ensure_held(leases[0])
            with pytest.raises(LeaseLostError, match="example.com/b"):
                keeper.ensure_held(leases[1])
            return still_held

    assert asyncio.run(work()) > 1.0
    assert dict(conn.execute("SELECT url, status FROM blogqa.url_queue").fetchall()) == {
        "https://example.com/a": "processing",
        "https://example.com/b": "cancelled",
    }
