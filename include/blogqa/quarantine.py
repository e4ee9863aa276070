"""Quarantined documents: how a queue row gets there (the validate task) and the three ways
out that a reviewer chooses (the DAG's review task, `blogqa quarantine`).

A document that fails a blocking expectation is not loaded; its queue row goes from
`processing` to `quarantined` (fenced by the lease, like every write of a stage) with the
failed expectations and their observed values, and its work item (page, summary, questions,
vectors) is kept. Then:
  release  -> done       the kept results are loaded as they are
  requeue  -> queued     processed afresh (attempts reset, kept results dropped)
  drop     -> cancelled  never loaded (kept results dropped); `enqueue --force` revives it
Each action appends an entry to the row's error history, so the decision stays visible.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

from blogqa import queue, sql_queries, store
from blogqa.errors import BlogqaError
from blogqa.queue import Lease
from blogqa.urls import normalize_url

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/quarantine.sql

ACTIONS = ("release", "requeue", "drop")


class NotQuarantinedError(BlogqaError, LookupError):
    """The row an operator named is not quarantined (or does not exist)."""


def describe(reasons: list[dict]) -> str:
    """One line a person reads: each failed expectation's reason and what was observed."""
    parts = []
    for r in reasons:
        observed = r.get("observed")
        if isinstance(observed, list) and len(observed) == 1:
            observed = observed[0]
        shown = json.dumps(observed, ensure_ascii=False, default=str)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        parts.append(f"{r.get('reason')} ({r.get('column')}: {shown})")
    return "; ".join(parts)


def quarantine(
    conn: psycopg.Connection, failures: list[tuple[Lease, list[dict]]], run_id: str
) -> list[int]:
    """Quarantine held rows with their reasons; returns the ids written (a row whose lease
    went meanwhile is left to its new holder)."""
    done = []
    with conn.transaction():
        for lease, reasons in failures:
            message = "quarantined: " + describe(reasons)
            entry = {
                "attempt": lease.attempts,
                "stage": "quality",
                "class": "quarantine",
                "message": message[:2000],
            }
            row = conn.execute(
                SQL.quarantine,
                {
                    "message": message[:2000],
                    "reasons": Jsonb(reasons),
                    "run_id": run_id,
                    "entry": json.dumps(entry),
                    "keep": queue.ERROR_HISTORY_LIMIT,
                    "id": lease.id,
                    "token": uuid.UUID(lease.token),
                },
            ).fetchone()
            if row is None:
                log.warning("url=%s stage=quality lease lost; not quarantined", lease.url)
            else:
                done.append(row[0])
                log.warning("url=%s stage=quality %s", lease.url, message)
    return done


def list_quarantined(conn: psycopg.Connection, ids: list[int] | None = None) -> list[dict]:
    """The quarantined rows (of `ids` when given), oldest id first, with their reasons."""
    keys = ("id", "url", "run_id", "quarantined_at", "attempts", "reasons")
    return [dict(zip(keys, row, strict=True)) for row in conn.execute(SQL.list, (ids, ids))]


@dataclass(frozen=True)
class ActionResult:
    action: str
    id: int
    url: str
    status: str  # the row's status afterwards

    def as_dict(self) -> dict:
        return {"action": self.action, "id": self.id, "url": self.url, "status": self.status}


def _lock_quarantined(conn: psycopg.Connection, target: str | int) -> tuple[int, str]:
    """The quarantined row named by queue id or URL, locked for the caller's transaction."""
    text = str(target).strip()
    if text.isascii() and text.isdigit():
        row = conn.execute(SQL.lock_by_id, (int(text),)).fetchone()
    else:
        url = normalize_url(text)
        row = conn.execute(SQL.lock_by_url, (url,)).fetchone()
    if row is None:
        raise NotQuarantinedError(f"no queue row matches {text!r}: give a queue id or a URL")
    if row[2] != "quarantined":
        raise NotQuarantinedError(f"queue id {row[0]} ({row[1]}) is {row[2]}, not quarantined")
    return row[0], row[1]


def _history(message: str, stage: str = "review") -> dict:
    return {
        "entry": json.dumps({"stage": stage, "class": "operator", "message": message}),
        "keep": queue.ERROR_HISTORY_LIMIT,
    }


RELEASE_MESSAGE = "released by reviewer: loaded as it is"
REQUEUE_MESSAGE = "requeued by reviewer: processed afresh"
DROP_MESSAGE = "dropped by reviewer: not loaded"


def release(
    conn: psycopg.Connection, target: str | int, *, embed_model: str, embed_dim: int
) -> ActionResult:
    """Load a quarantined document's kept results as they are; its row becomes done."""
    with conn.transaction():
        row_id, url = _lock_quarantined(conn, target)
        item = store.quarantined_item(conn, row_id, embed_dim)
        if item is None:
            raise NotQuarantinedError(
                f"queue id {row_id} ({url}) kept no results to load: requeue or drop it"
            )
        store.load_released(conn, item, embed_model=embed_model, fetched_at=dt.datetime.now(dt.UTC))
        queue.mark_done(conn, [row_id])
        conn.execute(SQL.released, {"id": row_id, **_history(RELEASE_MESSAGE)})
    log.info("url=%s stage=review queue_id=%s %s", url, row_id, RELEASE_MESSAGE)
    return ActionResult("release", row_id, url, "done")


def requeue(conn: psycopg.Connection, target: str | int) -> ActionResult:
    """Put a quarantined row back in the queue with a fresh attempt budget, due now."""
    with conn.transaction():
        row_id, url = _lock_quarantined(conn, target)
        conn.execute(SQL.requeue, {"id": row_id, **_history(REQUEUE_MESSAGE)})
        queue.delete_work_items(conn, [row_id])
    log.info("url=%s stage=review queue_id=%s %s", url, row_id, REQUEUE_MESSAGE)
    return ActionResult("requeue", row_id, url, "queued")


def drop(conn: psycopg.Connection, target: str | int) -> ActionResult:
    """Never load a quarantined document: its row is cancelled (reasons kept)."""
    with conn.transaction():
        row_id, url = _lock_quarantined(conn, target)
        conn.execute(SQL.drop, {"id": row_id, "message": DROP_MESSAGE, **_history(DROP_MESSAGE)})
        queue.delete_work_items(conn, [row_id])
    log.info("url=%s stage=review queue_id=%s %s", url, row_id, DROP_MESSAGE)
    return ActionResult("drop", row_id, url, "cancelled")


def apply(
    conn: psycopg.Connection, action: str, ids: list[int], *, embed_model: str, embed_dim: int
) -> list[ActionResult]:
    """`action` (release, requeue or drop) on each of `ids` that is still quarantined."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    results = []
    for row in list_quarantined(conn, ids):
        if action == "release":
            results.append(release(conn, row["id"], embed_model=embed_model, embed_dim=embed_dim))
        elif action == "requeue":
            results.append(requeue(conn, row["id"]))
        else:
            results.append(drop(conn, row["id"]))
    return results
