"""Operator actions on queue rows, behind `blogqa cancel|requeue|errors`: cancel a queued or
processing row, redrive dead rows, and list the latest failures for triage.

They act on rows a person names, outside the pipeline's own transitions (blogqa.queue), but
keep its guarantees: a cancel clears the lease token so a worker still holding the row is
fenced out, and every action appends to the row's bounded error history.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass

import psycopg

from blogqa import queue, sql_queries
from blogqa.errors import BlogqaError
from blogqa.queue import ERROR_HISTORY_LIMIT, TERMINAL_STATUSES
from blogqa.urls import InvalidURLError, normalize_url

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/queue_admin.sql

# Stages a row can fail at (PageError.stage values, and "lease" for an expired lease):
# what `requeue_dead(stage=...)` filters on.
FAILURE_STAGES = ("crawl", "summarize", "embed", "load", "lease")
CANCEL_MESSAGE = "cancelled by operator"
REDRIVE_MESSAGE = "requeued by operator (redrive of a dead row)"
MAX_ERRORS_LIMIT = 1000


class QueueRowNotFoundError(BlogqaError, LookupError):
    """No queue row matches the id or URL an operator gave; the message says what to check."""


@dataclass(frozen=True)
class CancelResult:
    """What `cancel` did to one row: `cancelled` is False when it was already finished."""

    id: int
    url: str
    previous_status: str
    cancelled: bool
    discarded_work: bool

    @property
    def reason(self) -> str:
        if self.cancelled:
            return CANCEL_MESSAGE
        return f"already {self.previous_status}: only queued or processing rows can be cancelled"

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "url": self.url,
            "previous_status": self.previous_status,
            "cancelled": self.cancelled,
            "discarded_work": self.discarded_work,
            "reason": self.reason,
        }


def _lock_target(conn: psycopg.Connection, target: str) -> tuple | None:
    """The row an operator named (a queue id, or a URL normalized as the queue keys are),
    locked so a worker's fenced write cannot interleave with the cancel."""
    text = target.strip()
    if text.isascii() and text.isdigit():
        return conn.execute(SQL.lock_by_id, (int(text),)).fetchone()
    try:
        url = normalize_url(text)
    except InvalidURLError as exc:
        raise InvalidURLError(f"{target!r} is neither a queue id nor a valid URL: {exc}") from None
    return conn.execute(SQL.lock_by_url, (url,)).fetchone()


def cancel(conn: psycopg.Connection, target: str) -> CancelResult:
    """Cancel a queued or processing row, given its queue id or its URL.

    The lease token is cleared, so every later write of a worker still holding the row
    (renew, fail, complete, the load transaction) is fenced out and its result is discarded;
    the row's intermediate results in blogqa.work_items are deleted in the same transaction.
    A finished row is left alone and the result says why. Raises QueueRowNotFoundError when
    nothing matches and InvalidURLError when `target` is neither an id nor a valid URL.
    """
    with conn.transaction():
        row = _lock_target(conn, target)
        if row is None:
            raise QueueRowNotFoundError(
                f"no queue row matches {target.strip()!r}: give a queue id or a URL that was"
                " enqueued (URLs are matched in normalized form)"
            )
        row_id, url, status, owner = row
        if status in TERMINAL_STATUSES:
            return CancelResult(row_id, url, status, cancelled=False, discarded_work=False)
        detail = f"was {status}" + (f", lease owner {owner}" if owner else "")
        entry = {"stage": "cancel", "class": "operator", "message": f"{CANCEL_MESSAGE} ({detail})"}
        conn.execute(
            SQL.cancel,
            {
                "id": row_id,
                "message": CANCEL_MESSAGE,
                "entry": json.dumps(entry),
                "keep": ERROR_HISTORY_LIMIT,
            },
        )
        discarded = queue.delete_work_items(conn, [row_id])
    log.info("url=%s stage=cancel queue_id=%s cancelled (%s)", url, row_id, detail)
    return CancelResult(row_id, url, status, cancelled=True, discarded_work=discarded > 0)


def requeue_dead(
    conn: psycopg.Connection, *, stage: str | None = None, since: dt.datetime | None = None
) -> list[tuple[int, str]]:
    """Redrive dead rows (optionally only those that died at `stage`, or at or after `since`).

    They go back to queued with a fresh attempt budget, due now; their error history is kept
    (with a redrive entry, still bounded) so the earlier failures stay visible, and leftover
    intermediate results are dropped so the retry starts clean. Returns (id, url) by id.
    """
    if stage is not None and stage not in FAILURE_STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(FAILURE_STAGES)}")
    if since is not None and since.tzinfo is None:
        raise ValueError("since must be timezone-aware (a naive time is ambiguous)")
    entry = {"stage": "redrive", "class": "operator", "message": REDRIVE_MESSAGE}
    with conn.transaction():
        rows = conn.execute(
            SQL.redrive,
            {
                "stage": stage,
                "since": since,
                "entry": json.dumps(entry),
                "keep": ERROR_HISTORY_LIMIT,
            },
        ).fetchall()
        ids = [row[0] for row in rows]
        if ids:
            queue.delete_work_items(conn, ids)
    rows.sort()
    log.info("stage=redrive requeued %d dead row(s) (stage=%s since=%s)", len(rows), stage, since)
    return [(row_id, url) for row_id, url in rows]


def recent_errors(conn: psycopg.Connection, limit: int = 20) -> list[dict]:
    """The latest rows that carry a failure reason, newest first, for an operator to triage.

    Covers dead, skipped and cancelled rows, and rows waiting for (or in) a retry; `run_after`
    is when a queued row will be retried (None for the others).
    """
    if not 1 <= limit <= MAX_ERRORS_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_ERRORS_LIMIT}")
    keys = (
        "id",
        "url",
        "status",
        "stage",
        "attempts",
        "max_attempts",
        "last_error",
        "updated_at",
        "run_after",
    )
    return [dict(zip(keys, row, strict=True)) for row in conn.execute(SQL.recent_errors, (limit,))]
