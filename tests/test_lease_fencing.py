"""Fenced, never silently dropped (issue 11, item 2): the crawl's write is fenced by the lease,
a ref whose work item is missing is failed with its reason, a lease that lapses before any
work started costs no attempt, and a chunk waiting for its next task keeps its leases while
the rest of its claim works. Against the embedded PostgreSQL, stages called directly."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

import psycopg
import pytest

from blogqa import db, pipeline, queue, queue_admin, store
from blogqa.errors import PageError
from blogqa.leases import LeaseKeeper
from tests.conftest import queue_row

ARTICLES = ["01-sourdough-starter.html", "02-overnight-focaccia.html"]


def _urls(page_server) -> list[str]:
    return [f"{page_server.base_url}/articles/{name}" for name in ARTICLES]


def _expire(conn, row_id: int) -> None:
    conn.execute(
        "UPDATE blogqa.url_queue SET lease_until = now() - interval '1 second' WHERE id = %s",
        (row_id,),
    )


def _claim(conn, limit: int = 10, owner: str = "test-worker"):
    return queue.claim(conn, limit, owner=owner, lease_seconds=60)


def _lease_left(conn, row_id: int) -> float:
    return float(
        conn.execute(
            "SELECT extract(epoch FROM lease_until - now()) FROM blogqa.url_queue WHERE id = %s",
            (row_id,),
        ).fetchone()[0]
    )


# ---------------------------------------------------------------- 1. the crawl's write is fenced


def test_save_pages_writes_only_under_a_held_lease(conn) -> None:
    queue.enqueue(conn, ["https://example.com/held", "https://example.com/cancelled"])
    held, gone = _claim(conn)
    queue_admin.cancel(conn, gone.url)

    refused = store.save_pages(conn, [(held, {"n": 1}, False), (gone, {"n": 2}, False)])

    assert refused == [gone]
    rows = conn.execute("SELECT queue_id, lease_token, page FROM blogqa.work_items").fetchall()
    assert rows == [(held.id, uuid.UUID(held.token), {"n": 1})]


def test_crawl_that_lost_its_lease_mid_fetch_leaves_the_new_holders_row_alone(
    conn, settings, page_server, monkeypatch, caplog
) -> None:
    [url] = _urls(page_server)[:1]
    queue.enqueue(conn, [url])
    [chunk] = pipeline.claim_chunks(10, 5, settings)
    crawl_all = pipeline._crawl_all
    rescuer = []

    async def fetch_then_lose_the_lease(leases, previous, policy, s):
        outcomes = await crawl_all(leases, previous, policy, s)
        # While the page was fetched, the lease lapsed; another worker claimed the row and
        # saved its own crawl result.
        _expire(conn, chunk[0]["id"])
        [new] = _claim(conn, owner="rescuer")
        assert store.save_pages(conn, [(new, {"saved_by": "rescuer"}, False)]) == []
        rescuer.append(new)
        return outcomes

    monkeypatch.setattr(pipeline, "_crawl_all", fetch_then_lose_the_lease)
    with caplog.at_level(logging.WARNING, logger="blogqa.pipeline"):
        assert pipeline.crawl_chunk(chunk, settings) == []

    assert f"url={url} stage=crawl lease gone; result not saved" in caplog.text
    [new] = rescuer
    assert new.attempts == 2  # the crawl had started under the lost lease: it counts
    rows = conn.execute("SELECT lease_token, page FROM blogqa.work_items").fetchall()
    assert rows == [(uuid.UUID(new.token), {"saved_by": "rescuer"})]
    row = queue_row(conn, url)
    assert (row["status"], row["lease_owner"]) == ("processing", "rescuer")


# ---------------------------------------------------------------- 2. missing work item: failed


def _run_until(stage: str, chunk: list[dict], settings) -> list[dict]:
    refs = pipeline.crawl_chunk(chunk, settings)
    for name in ("summarize", "embed", "load"):
        if name == stage:
            return refs
        refs = getattr(pipeline, f"{name}_chunk")(refs, settings)
    raise AssertionError(stage)


@pytest.mark.parametrize("stage", ["summarize", "embed", "load"])
def test_a_ref_whose_work_item_is_missing_is_failed_with_its_reason(
    conn, settings, page_server, caplog, stage: str
) -> None:
    lost_url, kept_url = _urls(page_server)
    queue.enqueue(conn, [lost_url, kept_url])
    one_slot = dataclasses.replace(settings, llm_pool_slots=1)  # one chunk of both URLs
    [chunk] = pipeline.claim_chunks(10, 5, one_slot)
    refs = _run_until(stage, chunk, settings)
    assert len(refs) == 2
    lost_id = queue_row(conn, lost_url)["id"]
    conn.execute("DELETE FROM blogqa.work_items WHERE queue_id = %s", (lost_id,))

    with caplog.at_level(logging.WARNING):
        passed_on = getattr(pipeline, f"{stage}_chunk")(refs, settings)

    kept_id = queue_row(conn, kept_url)["id"]
    if stage == "load":
        assert passed_on == [kept_id]
        assert queue_row(conn, kept_url)["status"] == "done"
    else:
        assert [ref["id"] for ref in passed_on] == [kept_id]
    row = queue_row(conn, lost_url)
    assert row["status"] == "queued" and row["later"]  # retried after a backoff
    assert (row["last_stage"], row["last_error"]) == (stage, pipeline.NO_WORK_ITEM)
    assert row["lease_token"] is None and row["attempts"] == 1
    [entry] = row["error_history"]
    assert (entry["stage"], entry["class"], entry["attempt"]) == (stage, "transient", 1)
    assert entry["message"] == pipeline.NO_WORK_ITEM
    assert f"url={lost_url} stage={stage} {pipeline.NO_WORK_ITEM}" in caplog.text


def test_a_missing_work_item_of_a_lost_lease_is_left_to_its_new_holder(conn, settings) -> None:
    queue.enqueue(conn, ["https://example.com/taken-over"])
    [chunk] = pipeline.claim_chunks(10, 5, settings)
    _expire(conn, chunk[0]["id"])
    [new] = _claim(conn, owner="rescuer")

    assert pipeline.summarize_chunk(chunk, settings) == []

    row = queue_row(conn, new.url)
    assert (row["status"], row["lease_owner"], row["last_stage"]) == (
        "processing",
        "rescuer",
        "lease",
    )


# ---------------------------------------------------------------- 3. lapse before any work: free


def test_a_lease_lapsing_before_any_work_started_costs_no_attempt(conn, caplog) -> None:
    url = "https://example.com/waited"
    queue.enqueue(conn, [url], max_attempts=1)
    [first] = _claim(conn, owner="run-that-died")
    _expire(conn, first.id)

    with caplog.at_level(logging.WARNING, logger="blogqa.queue"):
        [second] = _claim(conn, owner="next-run")

    # With one attempt allowed, a counted lapse would have made the row dead.
    assert (second.id, second.attempts) == (first.id, 1)
    row = queue_row(conn, url)
    assert (row["status"], row["attempts"], row["last_stage"]) == ("processing", 1, "lease")
    assert row["last_error"] == queue.LAPSED_UNSTARTED_MESSAGE
    [entry] = row["error_history"]
    assert (entry["stage"], entry["class"], entry["attempt"]) == ("lease", "lease", 1)
    assert "no work had started" in entry["message"]
    assert "run-that-died" in entry["message"]
    assert "attempt refunded" in caplog.text and f"url={url} stage=lease" in caplog.text


@pytest.mark.parametrize("work", ["stage renewed the lease", "work item saved"])
def test_a_lease_lapsing_after_work_started_costs_its_attempt(conn, work: str) -> None:
    url = "https://example.com/started"
    queue.enqueue(conn, [url], max_attempts=1)
    [lease] = _claim(conn)
    if work == "stage renewed the lease":
        assert queue.renew(conn, [lease.ref()], 60) == [lease]
    else:
        assert store.save_pages(conn, [(lease, {"text": "x"}, False)]) == []
    _expire(conn, lease.id)

    assert _claim(conn) == []

    row = queue_row(conn, url)
    assert (row["status"], row["attempts"]) == ("dead", 1)
    [entry] = row["error_history"]
    assert (entry["stage"], entry["class"]) == ("lease", "transient")


def test_an_older_leases_work_item_does_not_count_as_work_under_this_one(conn) -> None:
    url = "https://example.com/leftovers"
    queue.enqueue(conn, [url])
    [first] = _claim(conn)
    store.save_pages(conn, [(first, {"text": "x"}, False)])
    _expire(conn, first.id)
    [second] = _claim(conn)  # the first lapse counted: work had been saved
    assert second.attempts == 2
    _expire(conn, second.id)  # nothing done under the second lease

    [third] = _claim(conn)

    assert third.attempts == 2
    history = queue_row(conn, url)["error_history"]
    assert [e["class"] for e in history] == ["transient", "lease"]


# ---------------------------------------------------------------- 4. waiting chunks keep leases


def _shorten_leases(conn, seconds: float = 5, ids: list[int] | None = None) -> None:
    """Leave `seconds` on the leases of the rows `ids` (default: every processing row)."""
    conn.execute(
        "UPDATE blogqa.url_queue SET lease_until = now() + make_interval(secs => %s)"
        " WHERE status = 'processing' AND (%s::bigint[] IS NULL OR id = ANY(%s))",
        (seconds, ids, ids),
    )


def test_a_stage_end_renews_the_leases_of_chunks_waiting_for_their_next_task(
    conn, settings, page_server
) -> None:
    urls = _urls(page_server)
    queue.enqueue(conn, [*urls, "https://example.com/other-claim"])
    crawling, waiting = pipeline.claim_chunks(2, 1, settings)
    [other] = _claim(conn, owner="another-run")
    _shorten_leases(conn)
    started = {
        row[0]: row[1:]
        for row in conn.execute("SELECT id, started_at, updated_at FROM blogqa.url_queue")
    }

    [ref] = pipeline.crawl_chunk(crawling, settings)

    assert ref["id"] == crawling[0]["id"]
    assert _lease_left(conn, waiting[0]["id"]) > settings.lease_seconds - 60
    assert _lease_left(conn, crawling[0]["id"]) > settings.lease_seconds - 60
    assert _lease_left(conn, other.id) < 10  # another claim's rows are not ours to renew
    # Kept alive is not started: if the run dies now, the waiting row's lapse is refunded.
    after = conn.execute(
        "SELECT started_at, updated_at FROM blogqa.url_queue WHERE id = %s", (waiting[0]["id"],)
    ).fetchone()
    assert after == started[waiting[0]["id"]] and after[0] == after[1]


def test_the_lease_keeper_renews_the_whole_claim_while_a_stage_works(conn, settings) -> None:
    queue.enqueue(conn, ["https://example.com/working", "https://example.com/waiting"])
    working, waiting = _claim(conn)
    _shorten_leases(conn)

    async def beat() -> None:
        keeper = LeaseKeeper(settings, [working])
        dsn = db.database_dsn(settings)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            await keeper.renew_once(aconn)

    asyncio.run(beat())

    assert _lease_left(conn, waiting.id) > settings.lease_seconds - 60
    _shorten_leases(conn)
    assert queue.renew_claim(conn, [working.ref()], 60) == 2
    queue_admin.cancel(conn, waiting.url)
    _shorten_leases(conn)
    assert queue.renew_claim(conn, [working.ref()], 60) == 1  # a cancelled row stays out
    queue_admin.cancel(conn, working.url)
    assert queue.renew_claim(conn, [working.ref()], 60) == 0  # no held ref, nothing renewed


def _row_versions(conn) -> dict[int, str]:
    """Each queue row's current version (xmin changes whenever the row is rewritten)."""
    return dict(conn.execute("SELECT id, xmin::text FROM blogqa.url_queue").fetchall())


def test_renewing_a_claim_leaves_rows_renewed_moments_ago_alone(conn, settings) -> None:
    """Every stage end of every chunk renews the whole claim: at N = 2000 that rewrote each
    of the claim's rows 40 times. Only rows with less than RENEW_CLAIM_FRESH of a lease
    left are extended; the rest are not even rewritten."""
    queue.enqueue(conn, [f"https://example.com/{name}" for name in ("a", "b", "c")])
    first, lapsing, third = queue.claim(conn, 10, owner="test-worker", lease_seconds=600)
    claimed = _row_versions(conn)

    assert queue.renew_claim(conn, [first.ref()], 600) == 0  # the claim's own lease is fresh
    assert _row_versions(conn) == claimed

    due = 600 * queue.RENEW_CLAIM_FRESH - 5  # just under the share that counts as fresh
    _shorten_leases(conn, due, ids=[first.id])
    _shorten_leases(conn, 5, ids=[lapsing.id])
    before = _row_versions(conn)
    assert queue.renew_claim(conn, [first.ref()], 600) == 2
    assert _lease_left(conn, first.id) > 590 and _lease_left(conn, lapsing.id) > 590
    assert _row_versions(conn)[third.id] == before[third.id] == claimed[third.id]


def test_renewing_a_claim_skips_rows_another_task_holds_instead_of_waiting(conn, settings) -> None:
    """Tasks of one run lock overlapping sets of rows at once (a chunk's own rows while it
    saves, the whole claim at every stage end). Waiting for each other's rows in two orders
    made PostgreSQL abort tasks with `deadlock detected` under the scheduler; the claim's
    renewal now skips a row another transaction holds (that task renews it itself)."""
    queue.enqueue(conn, [f"https://example.com/{name}" for name in ("a", "b", "c")])
    first, busy, third = _claim(conn)
    _shorten_leases(conn)
    with db.connect(settings) as other, other.transaction():
        other.execute("SELECT 1 FROM blogqa.url_queue WHERE id = %s FOR UPDATE", (busy.id,))
        conn.execute("SET lock_timeout = '3s'")  # a wait would fail the test, not hang it
        renewed = queue.renew_claim(conn, [first.ref()], 600)
        conn.execute("RESET lock_timeout")
    assert renewed == 2
    assert _lease_left(conn, first.id) > 500 and _lease_left(conn, third.id) > 500
    assert _lease_left(conn, busy.id) < 10  # left to the transaction that holds it


def test_a_row_that_will_not_be_retried_leaves_no_work_item(conn) -> None:
    """A transient failure keeps the row's work item (its paid results serve the retry); a
    terminal one removes it: nothing would read it again, and dead rows kept page text and
    model results in work_items for good."""
    queue.enqueue(conn, ["https://example.com/retried", "https://example.com/dead"])
    retried, dead = _claim(conn)
    assert store.save_pages(conn, [(retried, {"n": 1}, False), (dead, {"n": 2}, False)]) == []

    transient = PageError("model endpoint busy", stage="summarize", permanent=False)
    permanent = PageError("model output still invalid", stage="summarize", permanent=True)
    assert queue.fail(conn, retried, transient, max_attempts=3, base=1) == "queued"
    assert queue.fail(conn, dead, permanent, max_attempts=3, base=1) == "dead"

    rows = conn.execute("SELECT queue_id FROM blogqa.work_items").fetchall()
    assert rows == [(retried.id,)]
