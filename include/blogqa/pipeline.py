"""The DAG's task bodies: enqueue, claim, the four per-chunk stages, finalize.

Each stage takes the chunk's lease refs ({"id", "token"}), renews the leases still held,
does its work for the rows that need it (so an Airflow retry of the task redoes nothing that
is already stored; summarize and embed store each model result as it arrives, so a task that
fails half-way keeps what it paid for), records per-URL failures on the queue, and returns
the refs that go on. Every write after the claim is fenced by the lease (the crawl's too), a
ref whose work item is missing is failed with that reason rather than dropped, and each stage
end renews the leases of the run's claim (`queue.renew_claim`) so a chunk waiting for its
next task does not lose its rows.
Exceptions other than per-URL `PageError` (database down, bad credentials) fail the task so
Airflow retries it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import socket
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self

import psycopg

from blogqa import db, dedupe, politeness, queue, queue_stats, reprocess, store
from blogqa.breaker import CircuitBreaker, CircuitOpenError
from blogqa.config import (
    MAX_CHUNKS_PER_RUN,
    MAX_URLS_PER_RUN,
    Settings,
    checked_llm_mode,
    load_settings,
)
from blogqa.crawl import Validators, content_hash, fetch, http_client
from blogqa.embed import EmbeddingDimensionError, embedder
from blogqa.errors import BlogqaError, PageError, StageStalledError
from blogqa.extraction_pool import ExtractionPool
from blogqa.leases import LeaseKeeper, LeaseLostError
from blogqa.llm import PROMPT_VERSION, chat_provider
from blogqa.politeness import CrawlPolicy
from blogqa.queue import Lease
from blogqa.tokens import chunk_text, tokenizer_for

log = logging.getLogger(__name__)


class NothingProcessedError(BlogqaError):
    """A run claimed URLs and not one of them reached a final status: every one is waiting
    to be retried (site or model endpoint down, leases lost). The run must not look green."""


def task_settings() -> Settings:
    """Settings of a DAG task: the results database must be configured (BLOGQA_DATABASE_URL
    or the Airflow connection `blogqa_db`); no embedded fallback in a worker."""
    return db.resolve(load_settings(), in_airflow=True)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def plan_chunks(
    n: int, chunk_size: int, max_chunks: int = MAX_CHUNKS_PER_RUN, *, lanes: int = 1
) -> int:
    """Chunk size actually used for `n` URLs: at most `chunk_size`, unless `n` would need
    more than `max_chunks` chunks.

    The number of chunks is rounded up to a multiple of `lanes` (the `blogqa_llm` pool's
    slots, how many model-calling tasks run at once), so every slot has a chunk and the last
    round is not one chunk running alone: 100 URLs with 4 slots are 4 chunks of 25, not one
    chunk of 100 with 8 requests in flight while 3 slots stay idle.
    """
    if not n:
        return chunk_size
    count = math.ceil(n / chunk_size)
    count = math.ceil(count / max(lanes, 1)) * max(lanes, 1)
    count = min(count, n, max_chunks)
    return max(math.ceil(n / count), math.ceil(n / max_chunks))


def enqueue_urls(urls: list[str], settings: Settings | None = None, *, force: bool = False) -> dict:
    """Add URLs; with `force`, URLs already finished go back to the queue (a refetch is a
    conditional GET, so an unchanged page still costs no model call)."""
    settings = settings or task_settings()
    if not urls:
        return queue.EnqueueResult().as_dict()
    with db.connect(settings) as conn:
        result = queue.enqueue(conn, list(urls), force=force, max_attempts=settings.max_attempts)
    for url, reason in result.rejected:
        log.warning("url=%s stage=enqueue rejected: %s", url, reason)
    return result.as_dict()


def refresh_stale(days: int, limit: int, settings: Settings | None = None) -> int:
    """Requeue up to `limit` done URLs last finished more than `days` ago (0: none)."""
    if days <= 0 or limit <= 0:
        return 0
    settings = settings or task_settings()
    with db.connect(settings) as conn:
        count = queue.requeue_stale(conn, older_than=dt.timedelta(days=days), limit=limit)
    log.info("stage=enqueue requeued %d urls done more than %d days ago", count, days)
    return count


class NoIntervalError(BlogqaError):
    """A `reprocess` was asked of a run without a data interval (triggered with no logical
    date, or BLOGQA_SCHEDULE=none, whose manual runs get an empty one): there is no window
    to pick documents from, and reprocessing everything silently could be costly."""


def reprocess_interval(
    cause: str,
    start: dt.datetime | None,
    end: dt.datetime | None,
    settings: Settings | None = None,
) -> dict:
    """The DAG's `reprocess` param: flag the documents first fetched in the run's data
    interval [start, end) for `cause` (`reprocess.reprocess_window`), before the claim.

    Idempotent for `summaries` and `embeddings` (only documents whose stored rows do not
    match the current models and prompt are picked: once the run has redone them, a second
    run over the window finds nothing); `all` picks every document of the window each time a
    run asks, so a rerun after a finished run redoes them again (a retry of the same task
    before the claim finds them already flagged and adds nothing)."""
    if cause == "none":
        return {"cause": "none"}
    if start is None or end is None or end <= start:
        raise NoIntervalError(
            f"reprocess={cause} needs a data interval and this run has "
            f"{'none' if start is None or end is None else f'an empty one ({start})'}: "
            "trigger it with a logical date under a cron BLOGQA_SCHEDULE, or use "
            "`blogqa reprocess --cause CAUSE --since ... --until ...`"
        )
    settings = settings or task_settings()
    return reprocess.reprocess_window(cause, start, end, settings)


def discover(settings: Settings | None = None) -> dict:
    """Poll the registered feeds, sitemaps and sites for new or changed URLs (one query when
    none is registered). Never fails the run: a source that cannot be read is recorded on its
    row by `sources.poll_all`, and anything else that stops the polling is logged, so the
    backlog is processed all the same."""
    from blogqa import sources

    settings = settings or task_settings()
    try:
        results = sources.poll_all(settings)
    except Exception as exc:  # discovery is best-effort: the run goes on without it
        log.exception("stage=discover polling stopped")
        return {"sources": None, "enqueued": 0, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "sources": len(results),
        "enqueued": sum(r.enqueued for r in results),
        "failed": [r.url for r in results if r.status == "error"],
    }


def claim_chunks(
    max_urls: int,
    chunk_size: int,
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
    lanes: int | None = None,
) -> list[list]:
    """Claim up to `max_urls` rows for the DAG run `run_id` and split them into chunks for
    the mapped task group, spread over `lanes` (chunks that can run at once; default the
    `blogqa_llm` pool's slots) as `plan_chunks` says."""
    settings = settings or task_settings()
    max_urls = max(0, min(int(max_urls), MAX_URLS_PER_RUN))
    with db.connect(settings) as conn:
        leases = queue.claim(
            conn,
            max_urls,
            owner=worker_name(),
            lease_seconds=settings.lease_seconds,
            run_id=run_id,
        )
    lanes = settings.llm_pool_slots if lanes is None else lanes
    size = plan_chunks(len(leases), max(1, int(chunk_size)), lanes=lanes)
    chunks = [[lease.ref() for lease in leases[i : i + size]] for i in range(0, len(leases), size)]
    log.info("stage=claim claimed %d urls in %d chunks of up to %d", len(leases), len(chunks), size)
    return chunks


def chunk_label(refs: list[dict]) -> str:
    if not refs:
        return "empty chunk"
    return f"{len(refs)} urls, queue ids {refs[0]['id']}..{refs[-1]['id']}"


NO_WORK_ITEM = "no work item for this row: the crawl result was lost or never saved"


def fail_missing(conn, leases: list[Lease], items, stage: str, settings: Settings) -> None:
    """Record a failure on every held row that has no work item, instead of dropping its ref.

    A held lease past the crawl always has one (a crawl failure, a refused write or a lost
    lease takes the ref out), so its absence means the result was lost; dropping the ref
    silently would leave the row `processing` until its lease expires, with no reason given.
    Transient: the next claim crawls it again. `queue.fail` is fenced, so a row whose lease
    went meanwhile is left to its new holder.
    """
    have = {item.lease.id for item in items}
    missing = [lease for lease in leases if lease.id not in have]
    for lease in missing:
        log.error("url=%s stage=%s %s", lease.url, stage, NO_WORK_ITEM)
    fail_all(
        conn,
        [(lease, PageError(NO_WORK_ITEM, stage=stage, permanent=False)) for lease in missing],
        settings,
    )


def held_work_items(
    conn: psycopg.Connection, refs: list[dict], stage: str, settings: Settings
) -> list[store.WorkItem]:
    """How every stage after the crawl starts: renew the chunk's leases, read the work items
    written under the ones still held, and fail the held rows that have none
    (`fail_missing`). Returns the items, in the order of the held leases."""
    leases = queue.renew(conn, refs, settings.lease_seconds)
    items = store.work_items(conn, leases, settings.embed_dim)
    fail_missing(conn, leases, items, stage, settings)
    return items


def hand_off(conn, refs: list[dict], settings: Settings) -> list[dict]:
    """The refs that go on, with the leases of their whole claim extended as the stage ends:
    the next task may wait a long time for a pool slot or a worker (`queue.renew_claim`)."""
    queue.renew_claim(conn, refs, settings.lease_seconds)
    return refs


def fail_all(conn, failures: list[tuple[Lease, PageError]], settings: Settings) -> None:
    for lease, error in failures:
        queue.fail(
            conn,
            lease,
            error,
            max_attempts=settings.max_attempts,
            base=settings.retry_base_seconds,
        )


# ---------------------------------------------------------------- crawl


def _page(fetched, article, text_hash: str) -> dict:
    return {
        "url": fetched.url,
        "final_url": fetched.final_url,
        "canonical_url": article.canonical_url,
        "title": article.title,
        "author": article.author,
        "published": article.published.isoformat() if article.published else None,
        "site_name": article.site_name,
        "language": article.language,
        "text": article.text,
        "content_hash": text_hash,
        "etag": fetched.etag,
        "last_modified": fetched.last_modified,
    }


async def _crawl_one(
    client, pool: ExtractionPool, lease: Lease, previous, policy: CrawlPolicy, settings
) -> dict:
    validators = Validators(previous.etag, previous.last_modified) if previous else None
    fetched = await fetch(client, lease.url, settings, validators, policy)
    if fetched.not_modified:
        if previous is None:
            raise PageError("HTTP 304 without a stored copy", stage="crawl", permanent=False)
        log.info("url=%s stage=crawl not modified (conditional GET)", lease.url)
        return dict(previous.page)
    article = await pool.extract(fetched)
    page = _page(fetched, article, content_hash(article.text))
    log.info("url=%s stage=crawl extracted %d words", lease.url, len(article.text.split()))
    return page


async def _each_bounded(work, items: list, limit: int, *, stage: str, stall_seconds: float) -> list:
    """`await work(item)` for every item, at most `limit` at a time. A PageError or
    LeaseLostError is returned in the item's place so one URL's failure never stops the
    others. Any other exception stops the stage (the other items are cancelled) and is
    raised, failing the task; so is StageStalledError when no item has finished for
    `stall_seconds`, so a stuck stage fails now instead of at Airflow's execution_timeout."""
    gate = asyncio.Semaphore(limit)
    loop = asyncio.get_running_loop()
    last_finish = loop.time()

    async def one(item):
        nonlocal last_finish
        async with gate:
            try:
                outcome = await work(item)
            except (PageError, LeaseLostError) as exc:
                outcome = exc
        last_finish = loop.time()
        return outcome

    tasks = [asyncio.create_task(one(item)) for item in items]
    try:
        await _until_done(tasks, lambda: last_finish, stage, stall_seconds)
    finally:
        for task in tasks:
            task.cancel()  # no-op for the finished ones
        await asyncio.gather(*tasks, return_exceptions=True)
    return [task.result() for task in tasks]


async def _until_done(tasks, last_finish, stage: str, stall_seconds: float) -> None:
    """Wait for every task, raising the first exception one raises, or StageStalledError once
    `last_finish()` (a loop time) is `stall_seconds` old."""
    loop = asyncio.get_running_loop()
    pending = set(tasks)
    while pending:
        idle = loop.time() - last_finish()
        if idle >= stall_seconds:
            finished = len(tasks) - len(pending)
            log.error(
                "stage=%s no item finished in %gs (%d of %d done); failing the task",
                stage,
                stall_seconds,
                finished,
                len(tasks),
            )
            raise StageStalledError(
                f"stage {stage}: no item finished in {stall_seconds:g}s "
                f"(BLOGQA_STAGE_STALL_SECONDS), {finished} of {len(tasks)} done"
            )
        done, pending = await asyncio.wait(
            pending, timeout=stall_seconds - idle, return_when=asyncio.FIRST_EXCEPTION
        )
        for task in done:
            task.result()


async def _crawl_all(leases, previous, policy, settings):
    """Fetch and extract every lease's page. The extraction workers live as long as this
    stage (started while the first pages are fetched, stopped when it ends)."""
    workers = min(settings.extract_workers, len(leases))
    async with (
        http_client(settings) as client,
        LeaseKeeper(settings, leases) as keeper,
        ExtractionPool(settings, size=workers) as pool,
    ):

        async def work(lease):
            keeper.ensure_held(lease)
            previous_page = previous.get(lease.url)
            return await _crawl_one(client, pool, lease, previous_page, policy, settings)

        return await _each_bounded(
            work,
            leases,
            settings.crawl_concurrency,
            stage="crawl",
            stall_seconds=settings.stage_stall_seconds,
        )


def _origins(urls: list[str]) -> list[str]:
    return sorted({politeness.origin_of(url) for url in urls})


def crawl_chunk(refs: list[dict], settings: Settings | None = None) -> list[dict]:
    """Fetch and extract the chunk's pages, and decide what each needs (`reprocess`): a row
    flagged for a summaries/embeddings reprocess with a fresh stored copy is not fetched,
    an unchanged page whose summary is current needs nothing, one whose embedding model
    changed only its embeddings (its stored summary and questions go to the embed stage).
    A new URL that copies a stored document is skipped as a duplicate (`dedupe`)."""
    settings = settings or task_settings()
    fresh = reprocess.FreshSettings.load()
    with db.connect(settings) as conn:
        leases = queue.renew(conn, refs, settings.lease_seconds)
        done = {item.lease.id for item in store.work_items(conn, leases, settings.embed_dim)}
        todo = [lease for lease in leases if lease.id not in done]
        previous = store.stored_results(conn, [lease.url for lease in todo])
        redo = reprocess.redo_flags(conn, todo, fresh.fresh_days)
        reused = {
            lease.id
            for lease in todo
            if reprocess.reuses_stored_text(redo.get(lease.id), previous.get(lease.url))
        }
        fetch_now = [lease for lease in todo if lease.id not in reused]
        validators = {  # `all` fetches unconditionally: the stored copy is not trusted
            lease.url: previous[lease.url]
            for lease in fetch_now
            if lease.url in previous and getattr(redo.get(lease.id), "cause", None) != "all"
        }
        cached = politeness.load_cached(
            conn, _origins([lease.url for lease in fetch_now]), settings.robots_ttl_seconds
        )
        policy = CrawlPolicy(settings, cached=cached)
        fetched = (
            asyncio.run(_crawl_all(fetch_now, validators, policy, settings)) if fetch_now else []
        )
        politeness.save_fetched(conn, policy.fetched)
        outcome_of = {lease.id: outcome for lease, outcome in zip(fetch_now, fetched, strict=True)}
        pages, failures, lost, plans = [], [], set(), {}
        for lease in todo:
            if lease.id in reused:
                log.info("url=%s stage=crawl reprocess: stored text reused, not fetched", lease.url)
                outcome = dict(previous[lease.url].page)
            else:
                outcome = outcome_of[lease.id]
            if isinstance(outcome, LeaseLostError):
                lost.add(lease.id)
            elif isinstance(outcome, PageError):
                failures.append((lease, outcome))
            else:
                plans[lease.id] = reprocess.stage_plan(
                    previous.get(lease.url),
                    outcome,
                    redo.get(lease.id),
                    chat_model=settings.chat_model,
                    prompt_version=PROMPT_VERSION,
                    embed_model=settings.embed_model,
                )
                pages.append((lease, outcome, plans[lease.id] == "unchanged"))
        if fresh.dedupe:
            pages, duplicates = _drop_duplicates(conn, pages, previous, fresh)
            failures += duplicates
        reuse = [lease for lease, _, _ in pages if plans[lease.id] == "embed"]
        stored_qa = reprocess.stored_llm_results(conn, [lease.url for lease in reuse])
        with conn.transaction():
            for lease in store.save_pages(conn, pages):
                log.warning("url=%s stage=crawl lease gone; result not saved", lease.url)
                lost.add(lease.id)
            # embeddings only: the stored summary and questions stand in for the chat call
            store.save_llm_results(
                conn,
                [(lease, stored_qa[lease.url]) for lease in reuse if lease.url in stored_qa],
            )
        for lease in reuse:
            log.info("url=%s stage=crawl embedding model changed: re-embed only", lease.url)
        fail_all(conn, failures, settings)
        return hand_off(conn, refs_going_on(leases, failures, lost), settings)


def _drop_duplicates(conn, pages: list, previous: dict, fresh) -> tuple[list, list]:
    """Pages of new URLs that copy a stored document (or an earlier page of the chunk) are
    linked to their original and end `skipped`: no model call is made for them."""
    dedupe.backfill(conn)
    new = [(lease, page) for lease, page, _ in pages if lease.url not in previous]
    found = dedupe.find_duplicates(conn, new, fresh.dedupe_threshold)
    if not found:
        return pages, []
    dedupe.record(
        conn, [(lease, page, found[lease.id]) for lease, page in new if lease.id in found]
    )
    failures = [
        (
            lease,
            PageError(
                found[lease.id].message(), stage="dedupe", permanent=True, terminal_status="skipped"
            ),
        )
        for lease, _, _ in pages
        if lease.id in found
    ]
    return [p for p in pages if p[0].id not in found], failures


def refs_going_on(leases: list[Lease], failures, dropped: set[int]) -> list[dict]:
    """Refs that go on to the next stage: neither failed, released nor lost."""
    gone = dropped | {lease.id for lease, _ in failures}
    return [lease.ref() for lease in leases if lease.id not in gone]


def _load_breaker(conn, settings: Settings, items, todo, stage: str):
    """The model endpoint's breaker as other tasks left it. When it is open, the rows this
    stage would call the model for go back untried, and the refs that go on are returned
    with it (else None)."""
    breaker = CircuitBreaker(settings)
    breaker.load(conn)
    if not todo or breaker.seconds_left() == 0:
        return breaker, None
    released = _release(conn, [item.lease for item in todo], breaker, stage)
    return breaker, refs_going_on([item.lease for item in items], [], released)


def _release(conn, leases: list[Lease], breaker: CircuitBreaker, stage: str) -> set[int]:
    """Put untried rows back (the breaker is open) without spending their attempts."""
    reason = f"model endpoint circuit breaker open; deferred {breaker.seconds_left():.0f}s"
    queue.release(conn, leases, delay=breaker.seconds_left(), stage=stage, reason=reason)
    return {lease.id for lease in leases}


# ---------------------------------------------------------------- results as they arrive


class ProgressWriter:
    """Saves a stage's model results, with the charges of their calls, as they arrive.

    Saving only when a stage ended meant that a task failing half-way (the stall watchdog, an
    unclassified error, a timeout, a killed worker) threw away every result already paid for,
    and Airflow's retry of the task paid for them again. Now the item that got a result awaits
    `save`: when it returns, the result is committed (fenced by the lease) and the item
    counts as finished, so the retry's `todo` leaves it out.

    The writes go through the stage's own connection, idle while the event loop runs, in a
    worker thread (psycopg's sync calls must stay off the loop), one transaction at a time:
    no second connection per task against max_connections. Results that arrive while a write
    is in flight go together in the next one, so the batches grow with the arrival rate and
    no fixed wait is added to a result that arrives alone. Whatever was handed over is
    written before the block exits, even when the stage is failing and its items are being
    cancelled. A failed write fails every save waiting for it, and so the stage (the database
    is down: the task fails and is retried).
    """

    def __init__(self, conn: psycopg.Connection, stage: str) -> None:
        self.conn = conn
        self.stage = stage
        self.lost: list[Lease] = []  # results not written: their lease is gone
        self._pending: list[tuple[store.Progress, asyncio.Future]] = []
        self._arrived = asyncio.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._closing = True
        self._arrived.set()
        await asyncio.shield(self._task)
        if exc is None and self._error is not None:
            raise self._error

    async def save(self, progress: store.Progress) -> None:
        """Hand results over and wait until they are committed. Shielded: an item cancelled
        while it waits still has its results written."""
        if self._error is not None:
            raise self._error
        if not (progress.llm_results or progress.vectors or progress.usage):
            return
        written = asyncio.get_running_loop().create_future()
        self._pending.append((progress, written))
        self._arrived.set()
        error = await asyncio.shield(written)
        if error is not None:
            raise error

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            batch, self._pending = self._pending, []
            if batch:
                merged = store.Progress.merge([progress for progress, _ in batch])
                try:
                    lost = await asyncio.to_thread(store.save_progress, self.conn, merged)
                except Exception as exc:  # noqa: BLE001 - handed to every waiting item
                    self._error = exc
                    for _, written in batch + self._pending:
                        written.set_result(exc)
                    self._pending = []
                    return
                for lease in lost:
                    log.warning(
                        "url=%s stage=%s lease gone; result not saved", lease.url, self.stage
                    )
                self.lost += lost
                for _, written in batch:
                    written.set_result(None)
            if self._closing and not self._pending:
                return


# ---------------------------------------------------------------- summarize


async def _summarize_all(conn, items, settings, breaker: CircuitBreaker, on_saved=None):
    """Each item's QAResult, or its PageError/LeaseLostError, and the leases whose results
    were not saved. Every result and its calls are saved as soon as they arrive, failed calls'
    usage too (it was paid for); the failures themselves are recorded by the caller.
    `on_saved(ids)` hears of each saved result (the enrich task's waves take it on from
    there, so this stage stops renewing its lease: the later stages hold it themselves)."""
    provider = chat_provider(settings)

    async def work(item):
        keeper.ensure_held(item.lease)
        breaker.check("summarize")
        page = item.page
        try:
            result = await provider.summarize(
                url=item.lease.url, title=page.get("title"), text=page["text"]
            )
        except PageError as exc:
            breaker.record(exc)
            calls = getattr(exc, "calls", [])
            if calls:
                usage = [store.whole_charge(item.lease, call) for call in calls]
                await writer.save(store.Progress(usage=usage))
            raise
        breaker.record(None)
        await writer.save(
            store.Progress(
                llm_results=[(item.lease, result.as_json())],
                usage=[store.whole_charge(item.lease, call) for call in result.calls],
            )
        )
        if on_saved is not None:
            keeper.let_go(item.lease)
            on_saved([item.lease.id])
        return result

    try:
        async with (
            LeaseKeeper(settings, [item.lease for item in items]) as keeper,
            ProgressWriter(conn, "summarize") as writer,
        ):
            outcomes = await _each_bounded(
                work,
                items,
                settings.llm_concurrency,
                stage="summarize",
                stall_seconds=settings.stage_stall_seconds,
            )
        return outcomes, writer.lost
    finally:
        await provider.aclose()


def summarize_chunk(
    refs: list[dict],
    settings: Settings | None = None,
    *,
    on_saved: Callable[[list[int]], None] | None = None,
) -> list[dict]:
    """The summarize stage in sync mode: one Chat Completions call per page, results saved
    as they arrive (batch mode: blogqa.batch_stage). `on_saved(ids)` hears of every held
    item that is ready for embedding: at once for those that need no call, then of each
    result as it is saved (`waves`)."""
    settings = settings or task_settings()
    with db.connect(settings) as conn:
        items = held_work_items(conn, refs, "summarize", settings)
        # Rows whose result a failed earlier try of this task saved are not called again.
        todo = [i for i in items if not i.unchanged and i.llm_result is None and i.page]
        breaker, passed_on = _load_breaker(conn, settings, items, todo, "summarize")
        if passed_on is not None:
            return hand_off(conn, passed_on, settings)
        if on_saved is not None:
            calling = {item.lease.id for item in todo}
            on_saved([item.lease.id for item in items if item.lease.id not in calling])
        outcomes, unsaved = (
            asyncio.run(_summarize_all(conn, todo, settings, breaker, on_saved))
            if todo
            else ([], [])
        )
        lost = {lease.id for lease in unsaved}
        results, failures, deferred, calls = 0, [], [], 0
        for item, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, LeaseLostError):
                lost.add(item.lease.id)
            elif isinstance(outcome, CircuitOpenError):
                deferred.append(item.lease)
            elif isinstance(outcome, PageError):
                failures.append((item.lease, outcome))
                calls += len(getattr(outcome, "calls", []))
            else:
                results += 1
                calls += len(outcome.calls)
        fail_all(conn, failures, settings)
        breaker.save(conn, reason=str(failures[-1][1]) if failures else "")
        released = _release(conn, deferred, breaker, "summarize") if deferred else set()
        survivors = refs_going_on([item.lease for item in items], failures, released | lost)
        hand_off(conn, survivors, settings)
    log.info(
        "stage=summarize %d documents, %d model calls, %d deferred, %d failed",
        results,
        calls,
        len(deferred),
        len(failures),
    )
    return survivors


# ---------------------------------------------------------------- embed


def embedding_inputs(item: store.WorkItem, settings: Settings) -> tuple[list[str], list[dict]]:
    """Texts to embed for one document: its summary, its questions, its retrieval chunks."""
    llm = item.llm_result
    tokenizer = tokenizer_for(settings.embed_model)
    chunks = [
        {"text": text, "tokens": tokens}
        for text, tokens in chunk_text(
            item.page["text"],
            tokenizer,
            max_tokens=settings.chunk_tokens,
            overlap_tokens=settings.chunk_overlap_tokens,
        )
    ]
    texts = [llm["summary"]] + [p["question"] for p in llm["qa"]] + [c["text"] for c in chunks]
    return texts, chunks


@dataclass
class _EmbedDoc:
    """One document's part of the embed stage."""

    item: store.WorkItem
    chunks: list[dict]
    span: range  # its inputs' positions in the stage's list of texts
    tokens: list[int]  # per input, as counted by the embed model's tokenizer
    waiting: int = 0  # requests with its inputs not back yet
    error: PageError | None = None

    def share_of(self, request: range) -> tuple[int, int]:
        """(inputs, tokens) of this document in `request`."""
        start, stop = max(request.start, self.span.start), min(request.stop, self.span.stop)
        if start >= stop:
            return 0, 0
        offset = self.span.start
        return stop - start, sum(self.tokens[start - offset : stop - offset])


def _embed_docs(
    todo: list[store.WorkItem], settings: Settings
) -> tuple[list[_EmbedDoc], list[str]]:
    tokenizer = tokenizer_for(settings.embed_model)
    docs, texts = [], []
    for item in todo:
        doc_texts, chunks = embedding_inputs(item, settings)
        head = doc_texts[: len(doc_texts) - len(chunks)]  # the summary and the questions
        tokens = [tokenizer.count(text) for text in head] + [c["tokens"] for c in chunks]
        span = range(len(texts), len(texts) + len(doc_texts))
        docs.append(_EmbedDoc(item, chunks, span, [max(t, 1) for t in tokens]))
        texts += doc_texts
    return docs, texts


async def _embed_all(
    conn, docs: list[_EmbedDoc], texts: list[str], settings, breaker
) -> list[Lease]:
    """Embed the chunk's inputs in requests of up to BLOGQA_EMBED_BATCH_SIZE inputs, which
    carry inputs of several documents. As each request comes back, its usage is charged to
    the documents it served (`store.split_charges`: shares in proportion to their inputs'
    tokens) and every document whose last request it was is saved, both at once; a document
    with an input in a failed request gets that request's PageError. Returns the leases whose
    vectors were not saved (lease gone)."""
    import numpy as np

    provider = embedder(settings)
    size = settings.embed_batch_size
    matrix = np.zeros((len(texts), provider.dim), dtype=np.float32)
    requests = []  # (input range, [(document, its inputs in it, their tokens)])
    for start in range(0, len(texts), size):
        request = range(start, min(start + size, len(texts)))
        shares = [(doc, *doc.share_of(request)) for doc in docs]
        requests.append((request, [share for share in shares if share[1]]))
        for doc, _, _ in requests[-1][1]:
            doc.waiting += 1

    async def work(job: tuple[range, list]) -> None:
        request, shares = job
        try:
            block, call = await provider.embed([texts[i] for i in request])
            error = None
        except EmbeddingDimensionError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: per-URL error, or raised
            block, call, error = None, None, _as_page_error(exc)
        breaker.record(error)
        progress = store.Progress()
        if call is not None:
            progress.usage = store.split_charges(call, [(d.item.lease, n, t) for d, n, t in shares])
        if block is not None:
            matrix[request.start : request.stop] = block
        for doc, _, _ in shares:
            doc.waiting -= 1
            doc.error = doc.error or error
            if doc.waiting == 0 and doc.error is None:
                vectors = matrix[doc.span.start : doc.span.stop]
                progress.vectors.append((doc.item.lease, doc.chunks, vectors))
        await writer.save(progress)

    try:
        async with ProgressWriter(conn, "embed") as writer:
            await _each_bounded(
                work,
                requests,
                settings.llm_concurrency,
                stage="embed",
                stall_seconds=_embed_stall_seconds(settings),
            )
        return writer.lost
    finally:
        await provider.aclose()


def _embed_stall_seconds(settings: Settings) -> float:
    """The stall watchdog's limit for the embed stage: BLOGQA_STAGE_STALL_SECONDS, but never
    less than a healthy request may take with its client retries (the settings check the
    stall time against the other stages' timeouts, not BLOGQA_EMBED_TIMEOUT_SECONDS)."""
    return max(
        settings.stage_stall_seconds, settings.embed_timeout * (1 + settings.llm_max_retries)
    )


def embed_chunk(refs: list[dict], settings: Settings | None = None) -> list[dict]:
    settings = settings or task_settings()
    with db.connect(settings) as conn:
        items = held_work_items(conn, refs, "embed", settings)
        # Documents whose vectors a failed earlier try of this task saved are left out.
        todo = [i for i in items if not i.unchanged and i.vectors is None and i.llm_result]
        breaker, passed_on = _load_breaker(conn, settings, items, todo, "embed")
        if passed_on is not None:
            return hand_off(conn, passed_on, settings)
        docs, texts = _embed_docs(todo, settings)
        unsaved = asyncio.run(_embed_all(conn, docs, texts, settings, breaker)) if texts else []
        failures = [(doc.item.lease, doc.error) for doc in docs if doc.error is not None]
        fail_all(conn, failures, settings)
        breaker.save(conn, reason=str(failures[-1][1]) if failures else "")
        lost = {lease.id for lease in unsaved}
        survivors = hand_off(
            conn, refs_going_on([item.lease for item in items], failures, lost), settings
        )
    requests = math.ceil(len(texts) / settings.embed_batch_size)
    log.info("stage=embed %d inputs in %d requests", len(texts), requests)
    return survivors


def _as_page_error(exc: Exception) -> PageError:
    """OpenAI errors become per-URL errors (or raise for bad credentials); others are bugs."""
    import openai

    from blogqa.llm import classify_openai_error

    if isinstance(exc, PageError):
        return exc
    if isinstance(exc, openai.OpenAIError):
        return classify_openai_error(exc, "embed")
    raise exc


# ---------------------------------------------------------------- load


def load_chunk(refs: list[dict], settings: Settings | None = None) -> list[int]:
    """Load the chunk's complete items; returns the queue ids now done."""
    return load_chunk_counted(refs, settings)["loaded"]


# The output tables the enrich task (its last stage loads) declares as Airflow Assets (the
# DAG's OUTPUT_ASSETS).
ASSET_TABLES = ("documents", "summaries", "questions", "chunks")


def loaded_rows(items: list[store.WorkItem]) -> dict[str, dict]:
    """Per output table, what a load wrote, for its asset event's extra: `rows` inserted or
    replaced, `documents` rewritten, and `unchanged` documents only marked as fetched again
    (an unchanged page: no row of any table rewritten). A downstream DAG can skip its work
    when `rows` is 0."""
    written = [item for item in items if not item.unchanged]
    rows = {
        "documents": len(written),
        "summaries": len(written),
        "questions": sum(len(item.llm_result["qa"]) for item in written),
        "chunks": sum(len(item.chunks) for item in written),
    }
    unchanged = len(items) - len(written)
    return {
        table: {"rows": rows[table], "documents": len(written), "unchanged": unchanged}
        for table in ASSET_TABLES
    }


def load_chunk_counted(refs: list[dict], settings: Settings | None = None) -> dict:
    """Load the chunk's complete items: {"loaded": the queue ids now done, "tables": the
    rows written per output table (`loaded_rows`)}.

    The writes are bound by PostgreSQL maintaining the HNSW indexes, which one backend does
    on one core: the items are split into BLOGQA_LOAD_PARALLELISM groups, each loaded on its
    own connection in transactions of at most BLOGQA_LOAD_BATCH documents (`_load_group`).
    """
    settings = settings or task_settings()
    with db.connect(settings) as conn:
        items = held_work_items(conn, refs, "load", settings)
        ready, failures = [], []
        for item in items:
            try:
                store.check_complete(item)
                ready.append(item)
            except store.IncompleteWorkError as exc:
                failures.append((item.lease, PageError(str(exc), stage="load", permanent=False)))
        groups = _split(ready, settings.load_parallelism)
        with ThreadPoolExecutor(max_workers=max(len(groups), 1)) as threads:
            outcomes = list(threads.map(lambda group: _load_group(group, settings), groups))
        loaded, lost = [], []
        for group_loaded, group_lost, group_failures in outcomes:
            loaded += group_loaded
            lost += group_lost
            failures += group_failures
        fail_all(conn, failures, settings)
    for item in lost:
        log.warning("url=%s stage=load lease lost; result discarded", item.lease.url)
    for item in loaded:
        log.info("url=%s stage=load done", item.lease.url)
    return {"loaded": [item.lease.id for item in loaded], "tables": loaded_rows(loaded)}


def enrich_chunk(
    refs: list[dict],
    run_id: str,
    map_index: int,
    settings: Settings | None = None,
    *,
    llm_mode: str = "default",
) -> dict:
    """Summarize, embed, validate and load one crawled chunk in one task: the stages that
    need the model (one `blogqa_llm` pool slot held throughout) and the quality gate, which
    must run between embedding and load. What `load_chunk_counted` returns, or, in batch
    mode while a batch runs, {"wait_for": batch id}: the task defers until that batch has
    ended, then calls this again (`llm_mode`: the run's param; "default" is BLOGQA_LLM_MODE).

    Why one task and not four: on Airflow's executors every task instance is a process of its
    own that parses the DAG file and imports the pipeline (and the gate imports Great
    Expectations), and every hop waits for the scheduler; per chunk that cost as much CPU as
    the chunk's own work on a small machine. The stages stay resumable one by one (each skips
    what an earlier try stored), so a retry of this task pays for nothing twice; each stage's
    log lines name it (`stage=...`), and per-URL failures record their stage on the queue row.
    Great Expectations is imported in the background while the model calls are awaited.

    In sync mode the documents whose summaries are saved go on to embed, validate and load
    in waves while the chunk's other summaries are still being made (`waves`;
    BLOGQA_ENRICH_WAVES per chunk, 1: each stage over the whole chunk).
    """
    from blogqa import quality, waves

    settings = settings or task_settings()
    mode = settings.llm_mode if llm_mode == "default" else llm_mode
    batched = checked_llm_mode(mode, settings.llm_provider, source="llm_mode") == "batch"
    if batched:
        from blogqa import batch_stage

        step = batch_stage.advance(refs, settings)
        if step.wait_for is not None:  # deferring: nothing below runs in this process
            return {"wait_for": step.wait_for}
        refs = step.refs
    importing = quality.import_in_background()
    first = True

    def finish(wave: list[dict]) -> dict:
        """Embed, validate and load one wave (the first replaces the validations an earlier
        try of this task recorded; the others add theirs)."""
        nonlocal first
        wave = embed_chunk(wave, settings)
        importing.join()
        wave = validate_chunk(wave, run_id, map_index, settings, replace=first)
        first = False
        return load_chunk_counted(wave, settings)

    if batched or settings.enrich_waves == 1:
        if not batched:
            refs = summarize_chunk(refs, settings)
        return finish(refs)

    def summarize(chunk: list[dict], on_saved) -> list[dict]:
        return summarize_chunk(chunk, settings, on_saved=on_saved)

    min_wave = math.ceil(len(refs) / settings.enrich_waves)
    return merged_loads(waves.run(refs, summarize, finish, min_wave))


def merged_loads(loads: list[dict]) -> dict:
    """One result of `load_chunk_counted` from those of a chunk's waves (its counts added)."""
    tables = {table: Counter(zeros) for table, zeros in loaded_rows([]).items()}
    for load in loads:
        for table, counts in load["tables"].items():
            tables[table].update(counts)
    return {
        "loaded": [i for load in loads for i in load["loaded"]],
        "tables": {table: dict(counts) for table, counts in tables.items()},
    }


def _split(items: list, parts: int) -> list[list]:
    """At most `parts` non-empty groups of near-equal size, in order."""
    size = math.ceil(len(items) / max(parts, 1)) if items else 0
    return [items[i : i + size] for i in range(0, len(items), size)] if size else []


def _load_group(items: list[store.WorkItem], settings: Settings):
    """(loaded, lost, failures) of one group, loaded on its own connection in transactions of
    at most BLOGQA_LOAD_BATCH documents.

    Why batches: a load's statements insert into the HNSW indexes, whose cost per vector
    grows with the index and with the loads beside it, so one transaction per group made
    BLOGQA_LOAD_TIMEOUT_SECONDS a limit on the group's size: on a busy 2-core machine a group
    of 125 pages (half a chunk of 250, ~1,250 vectors) ran past 60 s and all of its pages
    went back to the queue. Now the timeout bounds a batch, and what was loaded before stays
    loaded. A batch past the timeout stops the group: its pages and the ones after it go
    back to the queue (their paid results kept) instead of each waiting out the timeout."""
    loaded, lost = [], []
    fetched_at = dt.datetime.now(dt.UTC)
    with db.connect(settings) as conn:
        for start in range(0, len(items), settings.load_batch):
            batch = items[start : start + settings.load_batch]
            try:
                done, gone = store.load_documents(
                    conn,
                    batch,
                    embed_model=settings.embed_model,
                    fetched_at=fetched_at,
                    timeout_seconds=settings.load_timeout,
                )
            except psycopg.errors.QueryCanceled as exc:
                return loaded, lost, _not_loaded(batch, items[start + len(batch) :], exc)
            loaded += done
            lost += gone
    return loaded, lost, []


def _not_loaded(batch: list[store.WorkItem], rest: list[store.WorkItem], exc: Exception):
    """The failures of a batch past the load's timeout and of the group's batches after it."""
    timed_out = PageError(f"load timed out: {exc}".strip(), stage="load", permanent=False)
    skipped = PageError(
        "load not attempted: an earlier batch of this chunk's load timed out",
        stage="load",
        permanent=False,
    )
    return [(i.lease, timed_out) for i in batch] + [(i.lease, skipped) for i in rest]


def finalize(chunks: list[list[dict]], settings: Settings | None = None) -> dict:
    """Tally what became of this run's URLs (by status)."""
    settings = settings or task_settings()
    ids = [int(ref["id"]) for chunk in chunks for ref in chunk]
    tally = {"claimed": len(ids)}
    with db.connect(settings) as conn:
        tally.update(queue_stats.status_counts(conn, ids))
    log.info("stage=finalize %s", tally)
    final = sum(tally.get(status, 0) for status in queue.TERMINAL_STATUSES)
    if ids and final == 0:
        raise NothingProcessedError(
            f"none of the {len(ids)} claimed URLs reached a final status ({tally}); they wait "
            "in the queue for a retry: see `blogqa errors` for the reasons"
        )
    return tally


# ---------------------------------------------------------------- quality gate


def validate_chunk(
    refs: list[dict],
    run_id: str,
    map_index: int,
    settings: Settings | None = None,
    *,
    replace: bool = True,
) -> list[dict]:
    """The quality gate between embed and load: run the expectation suites over the chunk's
    results, quarantine each document that fails a blocking expectation (with the failed
    expectations and observed values; not loaded), record every result in
    blogqa.quality_results, and return the refs that go on to load.

    Unchanged pages of a refresh carry no new results and pass (they were validated when
    first loaded). A suite that cannot be evaluated fails the task (QualityConfigError).
    `replace`: these results replace what was recorded for (run_id, map_index) before (an
    earlier try of the task); False adds them (the chunk's later waves)."""
    from blogqa import quality, quarantine

    settings = settings or task_settings()
    with db.connect(settings) as conn:
        items = held_work_items(conn, refs, "validate", settings)
        checked = [item for item in items if not item.unchanged]
        verdict = quality.validate_items(checked, settings)
        quality.record(conn, run_id, map_index, verdict, replace=replace)
        for queue_id, reasons in verdict.warnings.items():
            url = next(i.lease.url for i in checked if i.lease.id == queue_id)
            log.info("url=%s stage=validate warning: %s", url, quarantine.describe(reasons))
        failing = verdict.quarantined
        held = {item.lease.id: item.lease for item in checked}
        quarantined = quarantine.quarantine(
            conn, [(held[i], reasons) for i, reasons in failing.items() if i in held], run_id
        )
        survivors = hand_off(
            conn,
            refs_going_on([item.lease for item in items], [], set(failing) | set(quarantined)),
            settings,
        )
    log.info(
        "stage=validate %d documents checked, %d quarantined, %d with warnings",
        len(checked),
        len(quarantined),
        len(verdict.warnings),
    )
    return survivors


def validate_run_tables(
    chunks: list[list[dict]], run_id: str, settings: Settings | None = None
) -> dict:
    """Table-level validation of the documents this run loaded (GX on PostgreSQL through a
    SQL data source), then the Data Docs under $BLOGQA_HOME/quality. Raises
    TableValidationError when a blocking expectation failed (the task fails)."""
    from blogqa import quality

    settings = settings or task_settings()
    ids = [int(ref["id"]) for chunk in chunks or [] for ref in chunk]
    verdict = quality.validate_tables(settings, run_id, ids)
    try:
        index = quality.build_docs(settings, run_id)
    except Exception:
        log.exception("stage=quality run=%s Data Docs not built", run_id)
        index = None
    failed = quality.blocking_failures(verdict)
    for outcome in failed:
        log.error(
            "stage=quality run=%s table check failed: %s (%s) queue ids %s",
            run_id,
            outcome.reason,
            outcome.expectation,
            sorted(outcome.failing)[:20],
        )
    if failed:
        raise quality.TableValidationError(
            f"{len(failed)} table-level expectation(s) failed for run {run_id}: "
            + "; ".join(o.reason for o in failed)
            + " (see blogqa.quality_results or `blogqa quality --run`)"
        )
    return {"validated": sum(1 for _ in ids), "data_docs": str(index) if index else None}


REVIEW_OPTIONS = ("Release", "Requeue", "Drop", "Leave quarantined")
REVIEW_DEFAULT = "Leave quarantined"
REVIEW_ACTIONS = {"Release": "release", "Requeue": "requeue", "Drop": "drop"}


def review_request(
    chunks: list[list[dict]], run_id: str, *, under_test: bool, settings: Settings | None = None
) -> dict | None:
    """What the review task asks a person, or None when it has nothing to ask (it is then
    skipped): no document of this run is quarantined, BLOGQA_REVIEW is false, or the run is
    a `dag.test()` run (`blogqa run`), where no scheduler would ever enforce the response
    timeout and the run would wait forever; `blogqa quarantine` serves those."""
    from blogqa import quality, quarantine

    settings = settings or task_settings()
    options = quality.QualitySettings.load()
    ids = [int(ref["id"]) for chunk in chunks or [] for ref in chunk]
    with db.connect(settings) as conn:
        rows = quarantine.list_quarantined(conn, ids)
    if not rows:
        log.info("stage=review run=%s nothing quarantined: no review", run_id)
        return None
    if not options.review or under_test:
        why = "BLOGQA_REVIEW is false" if not options.review else "a dag.test() run"
        log.warning(
            "stage=review run=%s %d document(s) quarantined; no review (%s): see `blogqa "
            "quarantine list`",
            run_id,
            len(rows),
            why,
        )
        return None
    intro = (
        f"{len(rows)} document(s) of this run failed a blocking quality expectation and were "
        "not loaded. **Release** loads them as they are, **Requeue** processes them again, "
        "**Drop** never loads them; **Leave quarantined** (also the answer when "
        f"BLOGQA_REVIEW_TIMEOUT, {options.review_timeout:g} s, passes) keeps them for "
        "`blogqa quarantine`. To act on some of them only, list their queue ids in the form."
    )
    lines = [
        intro,
        "",
        "| queue id | URL | reasons |",
        "| --- | --- | --- |",
    ]
    for row in rows:
        reasons = quarantine.describe(row["reasons"] or []).replace("|", "\\|")
        lines.append(f"| {row['id']} | {row['url']} | {reasons} |")
    lines += ["", "Data Docs: `/blogqa/quality/` (plugin) or `/quality/` (`blogqa serve`)."]
    return {
        "subject": f"Review {len(rows)} quarantined document(s)",
        "body": "\n".join(lines),
        "timeout_seconds": options.review_timeout,
        "queue_ids": [row["id"] for row in rows],
    }


def apply_review(
    chunks: list[list[dict]],
    choice: str,
    queue_ids: list[int] | None,
    run_id: str,
    settings: Settings | None = None,
) -> dict:
    """Carry out a reviewer's answer on this run's quarantined documents (those listed in
    `queue_ids`, or all of them); rows released or requeued meanwhile are left alone."""
    from blogqa import quarantine

    settings = settings or task_settings()
    ids = [int(ref["id"]) for chunk in chunks or [] for ref in chunk]
    if queue_ids:
        ids = [i for i in ids if i in {int(q) for q in queue_ids}]
    action = REVIEW_ACTIONS.get(choice)
    if action is None:
        log.info("stage=review run=%s answer %r: documents stay quarantined", run_id, choice)
        return {"choice": choice, "applied": []}
    with db.connect(settings) as conn:
        results = quarantine.apply(
            conn, action, ids, embed_model=settings.embed_model, embed_dim=settings.embed_dim
        )
    log.info(
        "stage=review run=%s answer %r applied to %d document(s)", run_id, choice, len(results)
    )
    return {"choice": choice, "applied": [r.as_dict() for r in results]}
