"""The summarize stage in batch mode: one step each time the enrich task wakes up.

In batch mode (BLOGQA_LLM_MODE=batch, or a run's `llm_mode` param) the enrich task does not
call the model page by page. It calls `advance` when it starts and again each time the
triggerer reports that the batch it waits for has ended; `advance` works out from the
database where the chunk stands, so a retried or resumed task picks up where the last left:

- pages of an ended batch: results saved as they are parsed (with their half-price usage),
  failed lines recorded on their queue rows with the reason; a batch that ended failed,
  expired or cancelled fails its pages transiently (the queue retries them later);
- pages never submitted: submitted as one new batch, whose id is stored on their work items
  (a retry waits for that batch rather than paying for the pages again);
- while a batch runs, the chunk's leases are extended over the Batch API's completion window
  (nothing renews them while the task is deferred), and `Step.wait_for` names the batch.

When no page waits any more, the refs that go on are handed to embed, validate and load,
which run as in sync mode.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

import psycopg

from blogqa import batch, db, queue, sql_queries, store
from blogqa.config import Settings
from blogqa.errors import BlogqaError, PageError
from blogqa.llm import STAGE

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/batch_stage.sql

# The Batch API's completion window (24 h) and an hour to collect: while the task is deferred
# nothing renews the chunk's leases, and a lapsed lease would let a later run claim the rows
# and pay for them a second time.
BATCH_LEASE_SECONDS = 25 * 3600


class BatchPollError(BlogqaError):
    """The triggerer could not poll the batch for a reason waiting will not fix (credentials,
    an unknown batch id): the task fails with the endpoint's message."""


@dataclass(frozen=True)
class Step:
    """Where the chunk stands: `refs` go on to embed once `wait_for` is None; otherwise the
    task defers until batch `wait_for` has ended."""

    refs: list[dict]
    wait_for: str | None


def advance(refs: list[dict], settings: Settings) -> Step:
    """Collect what ended batches returned, submit the pages not yet submitted, and say
    which batch (if any) the task must wait for."""
    from blogqa import pipeline

    with db.connect(settings) as conn:
        items = pipeline.held_work_items(conn, refs, STAGE, settings)
        todo = [i for i in items if not i.unchanged and i.llm_result is None and i.page]
        submitted = _submitted(conn, todo)
        failures, lost, running = [], set(), []
        for batch_id, group in _by_batch(todo, submitted).items():
            outcome = _collect(conn, batch_id, group, settings)
            if outcome is None:
                running.append(batch_id)
            else:
                failures += outcome[0]
                lost |= outcome[1]
        fresh = [i for i in todo if i.lease.id not in submitted]
        if fresh:
            running.append(_submit(conn, fresh, settings))
        going_on = pipeline.refs_going_on([i.lease for i in items], failures, lost)
        if running:
            queue.renew(conn, going_on, BATCH_LEASE_SECONDS)
            log.info(
                "stage=%s %d pages wait for batch %s", STAGE, len(todo) - len(failures), running[0]
            )
            return Step(going_on, running[0])
        return Step(pipeline.hand_off(conn, going_on, settings), None)


def wait(batch_id: str, settings: Settings | None = None):
    """(trigger, timeout) for a task deferring until batch `batch_id` has ended: polled every
    BLOGQA_BATCH_POLL_SECONDS, for as long as the leases were extended."""
    from blogqa.batch_trigger import BatchTrigger
    from blogqa.config import load_settings

    poll = (settings or load_settings()).batch_poll_seconds
    return BatchTrigger(batch_id, poll_seconds=poll), timedelta(seconds=BATCH_LEASE_SECONDS)


def check_event(event: dict | None) -> None:
    """Raise BatchPollError for a trigger event that says the batch cannot be polled."""
    if event and event.get("status") == "error":
        raise BatchPollError(
            f"batch {event.get('batch_id')} could not be polled: {event.get('error')}; "
            "check OPENAI_API_KEY / OPENAI_BASE_URL, then clear the task to try again"
        )


def _page(item: store.WorkItem) -> batch.BatchPage:
    return batch.BatchPage(item.lease.id, item.lease.url, item.page.get("title"), item.page["text"])


def _fence(items: list[store.WorkItem]) -> dict:
    return {
        "ids": [i.lease.id for i in items],
        "tokens": [uuid.UUID(i.lease.token) for i in items],
    }


def _submitted(conn: psycopg.Connection, items: list[store.WorkItem]) -> dict[int, str]:
    """queue id -> the batch an earlier try submitted its page in."""
    if not items:
        return {}
    return dict(conn.execute(SQL.submitted, _fence(items)).fetchall())


def _by_batch(items: list[store.WorkItem], submitted: dict[int, str]) -> dict[str, list]:
    groups: dict[str, list] = defaultdict(list)
    for item in items:
        if item.lease.id in submitted:
            groups[submitted[item.lease.id]].append(item)
    return groups


def _submit(conn: psycopg.Connection, items: list[store.WorkItem], settings: Settings) -> str:
    """One new batch for `items`; its id is stored on their work items."""
    batch_id = batch.submit_pages([_page(i) for i in items], settings)
    marked = {
        row[0] for row in conn.execute(SQL.mark_submitted, {**_fence(items), "batch_id": batch_id})
    }
    for item in items:
        if item.lease.id not in marked:
            log.warning(
                "url=%s stage=%s lease gone; its line in batch %s will be ignored",
                item.lease.url,
                STAGE,
                batch_id,
            )
    return batch_id


def _collect(conn, batch_id: str, items: list[store.WorkItem], settings: Settings):
    """None while the batch runs; else (failures, queue ids whose lease is gone), with every
    result, charge and failure saved in one transaction: a retry after a crash half-way
    would otherwise find a failed line's charge saved but its row not failed, and collect
    (and charge) it again."""
    from blogqa import pipeline

    try:
        outcomes = batch.collect_pages(batch_id, [_page(i) for i in items], settings)
    except batch.BatchEndedError as exc:
        error = PageError(f"{exc} (it will be retried)", stage=STAGE, permanent=False)
        failures = [(item.lease, error) for item in items]
        pipeline.fail_all(conn, failures, settings)
        return failures, set()
    except batch.BatchError as exc:
        log.info("stage=%s %s", STAGE, exc)
        return None
    progress, failures = store.Progress(), []
    for item in items:
        outcome = outcomes[item.lease.id]
        calls = getattr(outcome, "calls", [])
        progress.usage += [store.whole_charge(item.lease, call) for call in calls]
        if isinstance(outcome, PageError):
            failures.append((item.lease, outcome))
        else:
            progress.llm_results.append((item.lease, outcome.as_json()))
    with conn.transaction():
        lost = store.save_progress(conn, progress)
        pipeline.fail_all(conn, failures, settings)
    for lease in lost:
        log.warning("url=%s stage=%s lease gone; batch result not saved", lease.url, STAGE)
    return failures, {lease.id for lease in lost}
