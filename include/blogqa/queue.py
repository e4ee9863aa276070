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

from blogqa.errors import PageError
from blogqa.retry import backoff_seconds
from blogqa.urls import InvalidURLError, normalize_url

log = logging.getLogger(__name__)

ERROR_HISTORY_LIMIT = 20
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
        inserted = conn.execute(
            "INSERT INTO blogqa.url_queue (url, priority, max_attempts)"
            " SELECT u, %s, %s FROM unnest(%s::text[]) AS u"
            " ON CONFLICT (url) DO NOTHING RETURNING url",
            (priority, max_attempts, wanted),
        ).fetchall()
        result.new = [row[0] for row in inserted]
        rest = [url for url in wanted if url not in set(result.new)]
        if force and rest:
            requeued = conn.execute(
                "UPDATE blogqa.url_queue SET status = 'queued', attempts = 0,"
                " max_attempts = %s, priority = %s, run_after = now(), lease_owner = NULL,"
                " lease_token = NULL, lease_until = NULL, last_error = NULL, last_stage = NULL,"
                " started_at = NULL, finished_at = NULL, processing_ms = NULL,"
                " enqueued_at = now(), updated_at = now()"
                " WHERE url = ANY(%s) AND status IN ('done', 'dead', 'skipped', 'cancelled')"
                " RETURNING url",
                (max_attempts, priority, rest),
            ).fetchall()
            result.requeued = [row[0] for row in requeued]
        rest = [url for url in rest if url not in set(result.requeued)]
        if rest:
            rows = conn.execute(
                "SELECT url, status FROM blogqa.url_queue WHERE url = ANY(%s)", (rest,)
            ).fetchall()
            for url, status in rows:
                bucket = result.already_queued if status in ("queued", "processing") else None
                (bucket if bucket is not None else result.already_done).append(url)
    return result


# Appends %(entry)s (plus the attempt and time) to a row's error history, keeping the last
# %(keep)s entries: the history stays bounded however often a row fails.
HISTORY_APPEND_SQL = """(
        SELECT coalesce(jsonb_agg(e ORDER BY i), '[]'::jsonb)
        FROM jsonb_array_elements(q.error_history || (%(entry)s::jsonb
                 || jsonb_build_object('attempt', q.attempts, 'at', now())))
             WITH ORDINALITY AS t(e, i)
        WHERE i > jsonb_array_length(q.error_history) + 1 - %(keep)s
    )"""

# A lapsed lease costs an attempt only when work had started under it. "Not started" means
# no stage ever picked the row up since the claim (every stage first renews its leases, which
# moves updated_at past the claim's started_at; RENEW_CLAIM_SQL, which keeps waiting rows
# alive, leaves updated_at alone) and no work item was saved under it. Such a row only waited
# (its chunk's crawl never ran, the run died) and is refunded. A row a stage had started on is
# charged, even without a work item: a page whose crawl hangs or kills the task every time
# must still reach `dead` rather than be refunded forever.
NOT_STARTED_SQL = """(q.updated_at = q.started_at AND NOT EXISTS (
        SELECT 1 FROM blogqa.work_items w
        WHERE w.queue_id = q.id AND w.lease_token = q.lease_token))"""
LAPSED_UNSTARTED_MESSAGE = "lease expired and no work had started on this row: attempt refunded"

RECOVER_EXPIRED_SQL = f"""
UPDATE blogqa.url_queue q
SET status = CASE WHEN NOT r.unstarted AND q.attempts >= q.max_attempts
                  THEN 'dead' ELSE 'queued' END,
    finished_at = CASE WHEN NOT r.unstarted AND q.attempts >= q.max_attempts THEN now() END,
    attempts = CASE WHEN r.unstarted THEN greatest(q.attempts - 1, 0) ELSE q.attempts END,
    run_after = now(),
    last_error = CASE WHEN r.unstarted THEN %(unstarted)s::text
                 ELSE 'lease expired: the worker holding it stopped or ran out of time' END,
    last_stage = 'lease',
    error_history = (
        SELECT coalesce(jsonb_agg(e ORDER BY i), '[]'::jsonb)
        FROM jsonb_array_elements(q.error_history || CASE WHEN r.unstarted
                 THEN jsonb_build_object(
                     'attempt', q.attempts, 'stage', 'lease', 'class', 'lease',
                     'message', %(unstarted)s::text || ' (owner '
                         || coalesce(q.lease_owner, '?') || ')',
                     'at', now())
                 ELSE jsonb_build_object(
                     'attempt', q.attempts, 'stage', 'lease', 'class', 'transient',
                     'message', 'lease expired (owner ' || coalesce(q.lease_owner, '?') || ')',
                     'at', now()) END) WITH ORDINALITY AS t(e, i)
        WHERE i > jsonb_array_length(q.error_history) + 1 - %(keep)s
    ),
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
FROM (
    SELECT q.id, {NOT_STARTED_SQL} AS unstarted
    FROM blogqa.url_queue q
    WHERE q.status = 'processing' AND q.lease_until < now()
    FOR UPDATE OF q SKIP LOCKED
) AS r
WHERE q.id = r.id
RETURNING q.id, q.url, r.unstarted
"""

CLAIM_SQL = """
UPDATE blogqa.url_queue q
SET status = 'processing',
    attempts = q.attempts + 1,
    lease_owner = %(owner)s,
    last_run_id = %(run_id)s,
    lease_token = gen_random_uuid(),
    lease_until = now() + make_interval(secs => %(lease_seconds)s),
    started_at = now(),
    updated_at = now()
WHERE q.id IN (
    SELECT id FROM blogqa.url_queue
    WHERE status = 'queued' AND run_after <= now()
    ORDER BY priority DESC, run_after, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING q.id, q.url, q.lease_token, q.attempts, q.priority
"""


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
    work had started under the lapsed lease gets its attempt back (NOT_STARTED_SQL).
    """
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")
        recovered = conn.execute(
            RECOVER_EXPIRED_SQL,
            {"keep": ERROR_HISTORY_LIMIT, "unstarted": LAPSED_UNSTARTED_MESSAGE},
        ).fetchall()
        for row_id, url, unstarted in recovered:
            refund = "; no work had started, attempt refunded" if unstarted else ""
            log.warning(
                "url=%s stage=lease queue_id=%s lease expired; row released%s", url, row_id, refund
            )
        rows = conn.execute(
            CLAIM_SQL,
            {"owner": owner, "lease_seconds": lease_seconds, "limit": limit, "run_id": run_id},
        ).fetchall()
    rows.sort(key=lambda r: (-r[4], r[0]))
    return [Lease(id=r[0], url=r[1], token=str(r[2]), attempts=r[3]) for r in rows]


# Every statement that locks several url_queue rows takes the locks in id order (ORDER BY
# q.id FOR UPDATE), and renewing a whole claim skips the rows another transaction holds:
# tasks of one run lock overlapping sets of rows at once (a chunk's own rows, the whole
# claim), and locks taken in two orders deadlock (PostgreSQL then aborts one task).
RENEW_SQL = """
WITH held AS (
    SELECT q.id FROM blogqa.url_queue q
    JOIN unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS r(id, token)
        ON q.id = r.id AND q.lease_token = r.token
    WHERE q.status = 'processing'
    ORDER BY q.id
    FOR UPDATE OF q
)
UPDATE blogqa.url_queue q
SET lease_until = now() + make_interval(secs => %(seconds)s), updated_at = now()
FROM held WHERE q.id = held.id
RETURNING q.id, q.url, q.lease_token, q.attempts
"""


def lease_params(refs: list[dict], lease_seconds: int) -> dict:
    """The parameters of RENEW_SQL and RENEW_CLAIM_SQL (sync and async callers alike)."""
    return {
        "ids": [int(r["id"]) for r in refs],
        "tokens": [uuid.UUID(str(r["token"])) for r in refs],
        "seconds": lease_seconds,
    }


def renew(conn: psycopg.Connection, refs: list[dict], lease_seconds: int) -> list[Lease]:
    """Extend the leases still held (fenced by token); return those, dropping lost ones."""
    with conn.transaction():
        rows = conn.execute(RENEW_SQL, lease_params(refs, lease_seconds)).fetchall()
    held = {r[0] for r in rows}
    for ref in refs:
        if int(ref["id"]) not in held:
            log.warning("queue_id=%s lease lost (expired, cancelled or taken over)", ref["id"])
    order = {int(ref["id"]): i for i, ref in enumerate(refs)}
    rows.sort(key=lambda r: order[r[0]])
    return [Lease(id=r[0], url=r[1], token=str(r[2]), attempts=r[3]) for r in rows]


# Leases of every row of the claims that `refs` came from (a claim is its rows' lease_owner
# and started_at, both set by CLAIM_SQL in one transaction), still processing under that
# claim: rows of chunks that are only waiting for their next task included. updated_at is
# left alone: a row kept alive this way has not been started (see NOT_STARTED_SQL).
# Rows another transaction holds are skipped, not waited for: that transaction is a task
# working on them (it renews them itself), and waiting would join a lock cycle.
RENEW_CLAIM_SQL = """
WITH claim AS (
    SELECT DISTINCT s.lease_owner, s.started_at
    FROM blogqa.url_queue s JOIN unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS r(id, token)
        ON s.id = r.id AND s.lease_token = r.token
    WHERE s.status = 'processing'
), free AS (
    SELECT q.id FROM blogqa.url_queue q
    JOIN claim c ON q.lease_owner = c.lease_owner AND q.started_at = c.started_at
    WHERE q.status = 'processing'
    ORDER BY q.id
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE blogqa.url_queue q
SET lease_until = greatest(q.lease_until, now() + make_interval(secs => %(seconds)s))
FROM free WHERE q.id = free.id
"""


def renew_claim(conn: psycopg.Connection, refs: list[dict], lease_seconds: int) -> int:
    """Extend the leases of every row claimed together with the held `refs`; returns how many.

    Nothing runs for a chunk while its next task waits (for a `blogqa_llm` pool slot, a
    worker), so it cannot renew its own leases, and a wait longer than BLOGQA_LEASE_SECONDS
    would let another claim take its rows and redo them. What fills the pool and the workers
    during such a wait is mostly the same run's other chunks, so every stage end and every
    LeaseKeeper beat renew the whole claim: while any chunk of a run makes progress, none of
    its rows lapse, and once the run stops (crashed, given up) they come back
    BLOGQA_LEASE_SECONDS after its last sign of life. Rows recovered or re-claimed since are
    not touched (they have another owner and start); the token-fenced writes still guard
    each row.
    """
    if not refs:
        return 0
    cur = conn.execute(RENEW_CLAIM_SQL, lease_params(refs, lease_seconds))
    return cur.rowcount


# `redo` (a reprocessing flag, migration 011) is spent once the row is done.
DONE_SET = """
SET status = 'done', finished_at = now(), last_error = NULL, last_stage = NULL, redo = NULL,
    processing_ms = (extract(epoch FROM now() - started_at) * 1000)::integer,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
"""
COMPLETE_SQL = f"""
UPDATE blogqa.url_queue {DONE_SET}
WHERE id = %s AND lease_token = %s AND status = 'processing'
"""
MARK_DONE_SQL = f"UPDATE blogqa.url_queue {DONE_SET} WHERE id = ANY(%s)"


def complete(conn: psycopg.Connection, lease: Lease) -> bool:
    """Mark one row done, fenced by its lease token; False when the lease was lost."""
    cur = conn.execute(COMPLETE_SQL, (lease.id, uuid.UUID(lease.token)))
    return cur.rowcount == 1


def mark_done(conn: psycopg.Connection, ids: list[int]) -> None:
    """Mark rows done: only for rows the caller has locked and verified as held (the load)."""
    conn.execute(MARK_DONE_SQL, (ids,))


FAIL_SQL = f"""
UPDATE blogqa.url_queue q
SET status = %(status)s,
    run_after = now() + make_interval(secs => %(delay)s),
    finished_at = CASE WHEN %(status)s = 'queued' THEN NULL ELSE now() END,
    processing_ms = (extract(epoch FROM now() - q.started_at) * 1000)::integer,
    last_error = %(message)s,
    last_stage = %(stage)s,
    error_history = {HISTORY_APPEND_SQL},
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
WHERE q.id = %(id)s AND q.lease_token = %(token)s AND q.status = 'processing'
RETURNING q.status
"""


DELETE_WORK_ITEM_SQL = "DELETE FROM blogqa.work_items WHERE queue_id = %s"


def fail(
    conn: psycopg.Connection, lease: Lease, error: PageError, *, max_attempts: int, base: float
) -> str | None:
    """Record a per-URL failure: retry later (its work item, paid results included, is kept
    for the retry), or a terminal status (its work item goes). Returns the new status."""
    if error.permanent:
        status, delay = error.terminal_status, 0.0
    else:
        row = conn.execute(
            "SELECT max_attempts FROM blogqa.url_queue WHERE id = %s", (lease.id,)
        ).fetchone()
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
            FAIL_SQL,
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
            conn.execute(DELETE_WORK_ITEM_SQL, (lease.id,))
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


RELEASE_SQL = f"""
UPDATE blogqa.url_queue q
SET status = 'queued',
    attempts = greatest(q.attempts - 1, 0),
    run_after = now() + make_interval(secs => %(delay)s),
    started_at = NULL,
    last_error = %(message)s,
    last_stage = %(stage)s,
    error_history = {HISTORY_APPEND_SQL},
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS r(id, token)
WHERE q.id = r.id AND q.lease_token = r.token AND q.status = 'processing'
RETURNING q.id
"""


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
            RELEASE_SQL,
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


REQUEUE_STALE_SQL = """
UPDATE blogqa.url_queue q
SET status = 'queued', attempts = 0, run_after = now(), finished_at = NULL, started_at = NULL,
    processing_ms = NULL, updated_at = now()
WHERE q.id IN (
    SELECT id FROM blogqa.url_queue
    WHERE status = 'done' AND finished_at < now() - %s
    ORDER BY finished_at
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
"""


def requeue_stale(conn: psycopg.Connection, *, older_than: dt.timedelta, limit: int) -> int:
    """Refresh: put done rows finished longer ago than `older_than` back in the queue, oldest
    first, at most `limit`. Their stored validators make the refetch a conditional GET."""
    return conn.execute(REQUEUE_STALE_SQL, (older_than, limit)).rowcount
