"""The URL queue's row state machine: enqueue, claim with leases, renew, complete, fail,
release, refresh.

A row goes queued -> processing (claimed) -> done, or back to queued for a retry, or to a
terminal status (dead, skipped, cancelled, quarantined); a refresh puts done rows back in the
queue. The claim is one short transaction (expired leases recovered, then `FOR UPDATE SKIP
LOCKED`) committed before any network call, so concurrent workers never share a row and a
crashed worker's rows come back once its lease expires. Every write after the claim is fenced
by the lease token: a late finisher whose lease was taken over changes nothing.

Elsewhere: URL normalization (the queue key) in blogqa.urls, the retry delay in
blogqa.retry, counts for runners and dashboards in blogqa.queue_stats, and the operator's
cancel/redrive/error report in blogqa.queue_admin.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass, field

import psycopg

from blogqa import sql_queries
from blogqa.errors import PageError
from blogqa.retry import backoff_seconds
from blogqa.urls import InvalidURLError, normalize_url

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/queue.sql

ERROR_HISTORY_LIMIT = 20
# A claim's renewal (renew_claim) leaves a row alone while more than this share of a full
# lease is still ahead of it: the many stage ends of a large run then rewrite each row about
# once per tenth of a lease instead of at each of them, and a waiting chunk's rows are never
# more than a tenth of a lease short of the term they had before.
RENEW_CLAIM_FRESH = 0.9
# Final for the pipeline (a run's tally counts them). `quarantined` waits for a person (the
# review task, `blogqa quarantine`), not for a worker: see blogqa.quarantine.
TERMINAL_STATUSES = ("done", "dead", "skipped", "cancelled", "quarantined")
STATUSES = ("queued", "processing", *TERMINAL_STATUSES)


@dataclass(frozen=True)
class Lease:
    """A claimed row: what a stage needs to work on it and to write back (fenced)."""

    id: int
    url: str
    token: str
    attempts: int

    def ref(self) -> dict:
        return {"id": self.id, "token": self.token}


@dataclass
class EnqueueResult:
    new: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    already_queued: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "new": len(self.new),
            "requeued": len(self.requeued),
            "already_queued": len(self.already_queued),
            "already_done": len(self.already_done),
            "rejected": [{"url": url, "reason": reason} for url, reason in self.rejected],
        }


def enqueue(
    conn: psycopg.Connection,
    urls: list[str],
    *,
    priority: int = 0,
    force: bool = False,
    max_attempts: int = 5,
) -> EnqueueResult:
    """Add URLs; a bad one is rejected with its reason and the rest of the batch goes in."""
    result = EnqueueResult()
    wanted: list[str] = []
    for raw in urls:
        try:
            url = normalize_url(raw)
        except InvalidURLError as exc:
            result.rejected.append((raw, str(exc)))
            continue
        if url not in wanted:
            wanted.append(url)
    if not wanted:
        return result
    with conn.transaction():
        inserted = conn.execute(SQL.enqueue_new, (priority, max_attempts, wanted)).fetchall()
        result.new = [row[0] for row in inserted]
        rest = [url for url in wanted if url not in set(result.new)]
        if force and rest:
            requeued = conn.execute(SQL.enqueue_force, (max_attempts, priority, rest)).fetchall()
            result.requeued = [row[0] for row in requeued]
        rest = [url for url in rest if url not in set(result.requeued)]
        if rest:
            rows = conn.execute(SQL.status_of_urls, (rest,)).fetchall()
            for url, status in rows:
                bucket = result.already_queued if status in ("queued", "processing") else None
                (bucket if bucket is not None else result.already_done).append(url)
    return result


# A lapsed lease costs an attempt only when work had started under it (the `not_started`
# fragment of queries/queue.sql says what "started" means); the message of a refund:
LAPSED_UNSTARTED_MESSAGE = "lease expired and no work had started on this row: attempt refunded"


def claim(
    conn: psycopg.Connection,
    limit: int,
    *,
    owner: str,
    lease_seconds: int,
    run_id: str | None = None,
) -> list[Lease]:
    """Claim up to `limit` due rows (highest priority, then oldest) in one short transaction,
    for the DAG run `run_id` (kept on the rows as `last_run_id`).

    The commit does not wait for the WAL flush (synchronous_commit off for this transaction
    only): a claim lost to a server crash loses nothing, since the rows are simply still
    queued, and the worker's later writes are refused by the lease-token fence, so the price
    is redone work after a crash, not lost or duplicated rows. In exchange a claim does not
    queue behind the disk's fsync latency. Expired leases are recovered first; a row on which no
    work had started under the lapsed lease gets its attempt back (`not_started`).
    """
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")
        recovered = conn.execute(
            SQL.recover_expired,
            {"keep": ERROR_HISTORY_LIMIT, "unstarted": LAPSED_UNSTARTED_MESSAGE},
        ).fetchall()
        for row_id, url, unstarted in recovered:
            refund = "; no work had started, attempt refunded" if unstarted else ""
            log.warning(
                "url=%s stage=lease queue_id=%s lease expired; row released%s", url, row_id, refund
            )
        rows = conn.execute(
            SQL.claim,
            {"owner": owner, "lease_seconds": lease_seconds, "limit": limit, "run_id": run_id},
        ).fetchall()
    rows.sort(key=lambda r: (-r[4], r[0]))
    return [Lease(id=r[0], url=r[1], token=str(r[2]), attempts=r[3]) for r in rows]


def lease_params(refs: list[dict], lease_seconds: int) -> dict:
    """The parameters of SQL.renew and SQL.renew_claim (sync and async callers alike)."""
    return {
        "ids": [int(r["id"]) for r in refs],
        "tokens": [uuid.UUID(str(r["token"])) for r in refs],
        "seconds": lease_seconds,
        "fresh_until": lease_seconds * RENEW_CLAIM_FRESH,
    }


def renew(conn: psycopg.Connection, refs: list[dict], lease_seconds: int) -> list[Lease]:
    """Extend the leases still held (fenced by token); return those, dropping lost ones."""
    with conn.transaction():
        rows = conn.execute(SQL.renew, lease_params(refs, lease_seconds)).fetchall()
    held = {r[0] for r in rows}
    for ref in refs:
        if int(ref["id"]) not in held:
            log.warning("queue_id=%s lease lost (expired, cancelled or taken over)", ref["id"])
    order = {int(ref["id"]): i for i, ref in enumerate(refs)}
    rows.sort(key=lambda r: order[r[0]])
    return [Lease(id=r[0], url=r[1], token=str(r[2]), attempts=r[3]) for r in rows]


def renew_claim(conn: psycopg.Connection, refs: list[dict], lease_seconds: int) -> int:
    """Extend the leases of the rows claimed together with the held `refs` that are due
    for it (less than RENEW_CLAIM_FRESH of a lease left); returns how many it extended.

    Nothing runs for a chunk while its next task waits (for a `blogqa_llm` pool slot, a
    worker), so it cannot renew its own leases, and a wait longer than BLOGQA_LEASE_SECONDS
    would let another claim take its rows and redo them. What fills the pool and the workers
    during such a wait is mostly the same run's other chunks, so every stage end and every
    LeaseKeeper beat renew the whole claim: while any chunk of a run makes progress, none of
    its rows lapse, and once the run stops (crashed, given up) they come back at most
    BLOGQA_LEASE_SECONDS after its last sign of life (at least RENEW_CLAIM_FRESH of it).
    Rows recovered or re-claimed since are not touched (they have another owner and start);
    the token-fenced writes still guard each row.
    """
    if not refs:
        return 0
    cur = conn.execute(SQL.renew_claim, lease_params(refs, lease_seconds))
    return cur.rowcount


def complete(conn: psycopg.Connection, lease: Lease) -> bool:
    """Mark one row done, fenced by its lease token; False when the lease was lost."""
    cur = conn.execute(SQL.complete, (lease.id, uuid.UUID(lease.token)))
    return cur.rowcount == 1


def mark_done(conn: psycopg.Connection, ids: list[int]) -> None:
    """Mark rows done: only for rows the caller has locked and verified as held (the load)."""
    conn.execute(SQL.mark_done, (ids,))


def delete_work_items(conn: psycopg.Connection, ids: list[int]) -> int:
    """Drop the intermediate results (blogqa.work_items) of rows that will not read them
    again: a row that ends or starts afresh. Returns how many were dropped."""
    return conn.execute(SQL.delete_work_items, (ids,)).rowcount


def fail(
    conn: psycopg.Connection, lease: Lease, error: PageError, *, max_attempts: int, base: float
) -> str | None:
    """Record a per-URL failure: retry later (its work item, paid results included, is kept
    for the retry), or a terminal status (its work item goes). Returns the new status."""
    if error.permanent:
        status, delay = error.terminal_status, 0.0
    else:
        row = conn.execute(SQL.max_attempts, (lease.id,)).fetchone()
        limit = min(row[0], max_attempts) if row else max_attempts
        if lease.attempts >= limit:
            status, delay = "dead", 0.0
        else:
            status = "queued"
            delay = backoff_seconds(lease.attempts, base, retry_after=error.retry_after)
    entry = {
        "attempt": lease.attempts,
        "stage": error.stage,
        "class": "permanent" if error.permanent else "transient",
        "message": str(error)[:2000],
    }
    with conn.transaction():
        row = conn.execute(
            SQL.fail,
            {
                "status": status,
                "delay": delay,
                "message": str(error)[:2000],
                "stage": error.stage,
                "entry": json.dumps(entry),
                "keep": ERROR_HISTORY_LIMIT,
                "id": lease.id,
                "token": uuid.UUID(lease.token),
            },
        ).fetchone()
        if row is not None and row[0] != "queued":
            # A row that will not be retried never reads its work item again (a redrive
            # claims it under a new lease, and store.work_items ignores older leases' rows).
            delete_work_items(conn, [lease.id])
    if row is None:
        log.warning("url=%s stage=%s lease lost; failure not recorded", lease.url, error.stage)
        return None
    log.warning(
        "url=%s stage=%s attempt=%s -> %s: %s",
        lease.url,
        error.stage,
        lease.attempts,
        status,
        error,
    )
    return row[0]


def release(
    conn: psycopg.Connection, leases: list[Lease], *, delay: float, stage: str, reason: str
) -> int:
    """Give claimed rows back untried: queued again after `delay`, the claim's attempt refunded.

    For work deliberately not attempted (an open circuit breaker), which must not push a URL
    towards `dead`. Fenced by lease token; returns how many rows were released.
    """
    if not leases:
        return 0
    entry = {"attempt": None, "stage": stage, "class": "deferred", "message": reason[:2000]}
    with conn.transaction():
        rows = conn.execute(
            SQL.release,
            {
                "delay": max(delay, 0.0),
                "message": reason[:2000],
                "stage": stage,
                "entry": json.dumps(entry),
                "keep": ERROR_HISTORY_LIMIT,
                "ids": [lease.id for lease in leases],
                "tokens": [uuid.UUID(lease.token) for lease in leases],
            },
        ).fetchall()
    for lease in leases:
        log.info("url=%s stage=%s released untried for %.0fs: %s", lease.url, stage, delay, reason)
    return len(rows)


def requeue_stale(conn: psycopg.Connection, *, older_than: dt.timedelta, limit: int) -> int:
    """Refresh: put done rows finished longer ago than `older_than` back in the queue, oldest
    first, at most `limit`. Their stored validators make the refetch a conditional GET."""
    return conn.execute(SQL.requeue_stale, (older_than, limit)).rowcount
