"""Read-only counts over the URL queue: what the runner asks before and after a DAG run, and
what `blogqa stats` and the dashboards show. Nothing here changes a row (blogqa.queue does).
"""

from __future__ import annotations

import psycopg

from blogqa import sql_queries
from blogqa.queue import STATUSES

SQL = sql_queries.load(__name__)  # queries/queue_stats.sql


def stats(conn: psycopg.Connection) -> dict:
    """Counts per status and the age of the oldest queued row."""
    counts = dict.fromkeys(STATUSES, 0)
    for status, count in conn.execute(SQL.counts_by_status):
        counts[status] = count
    row = conn.execute(SQL.queued_age_and_claimable).fetchone()
    return {
        "counts": counts,
        "total": sum(counts.values()),
        "oldest_queued_age_seconds": round(float(row[0]), 1) if row[0] is not None else None,
        "claimable": int(row[1]),
    }


def next_due_seconds(conn: psycopg.Connection) -> float | None:
    """Seconds until a row becomes claimable (a retry's run_after, or a lease expiring);
    None when nothing is queued or in flight."""
    row = conn.execute(SQL.next_due).fetchone()
    return max(float(row[0]), 0.0) if row[0] is not None else None


def claimed_by_run(conn: psycopg.Connection, run_id: str) -> list[int]:
    """Queue ids the DAG run `run_id` claimed last."""
    rows = conn.execute(SQL.claimed_by_run, (run_id,)).fetchall()
    return [row[0] for row in rows]


def status_counts(conn: psycopg.Connection, ids: list[int]) -> dict[str, int]:
    """How many of the rows `ids` are in each status."""
    rows = conn.execute(SQL.status_counts, (ids,)).fetchall()
    return dict(rows)


def has_claimable(conn: psycopg.Connection) -> bool:
    """Whether a claim would take anything now: an index probe, not a count (the runner asks
    before every DAG run, and a count grows with the queue while a probe does not)."""
    row = conn.execute(SQL.has_claimable).fetchone()
    return bool(row[0])
