"""What operators read: the figures of the UI view (`GET /ui`) and of `GET /metrics`.

Every figure comes from blogqa's own tables and the views of migration 009
(blogqa.recent_runs, blogqa.cost_per_day, blogqa.dead_letters), on the API's read-only
connections. Quality results are shown when blogqa.quality_results exists (a later migration
adds it); without it that part of the page says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from blogqa.queue import STATUSES

# Queue rows per status: how many, the oldest (by enqueue time) and how many in each age band.
QUEUE_BY_STATUS_SQL = """
SELECT status,
       count(*) AS n,
       extract(epoch FROM now() - min(enqueued_at))::double precision AS oldest_seconds,
       count(*) FILTER (WHERE enqueued_at > now() - interval '1 hour') AS under_1h,
       count(*) FILTER (WHERE enqueued_at <= now() - interval '1 hour'
                          AND enqueued_at > now() - interval '1 day') AS under_1d,
       count(*) FILTER (WHERE enqueued_at <= now() - interval '1 day') AS over_1d
FROM blogqa.url_queue
GROUP BY status
"""
RECENT_RUNS_SQL = """
SELECT run_id, urls, done, dead, skipped, in_progress, first_started_at, last_finished_at,
       seconds, done_per_minute
FROM blogqa.recent_runs
ORDER BY first_started_at DESC NULLS LAST, run_id DESC
LIMIT %(limit)s
"""
DEAD_LETTERS_SQL = """
SELECT id, url, status, stage, reason, error_class, attempts, finished_at
FROM blogqa.dead_letters
ORDER BY finished_at DESC NULLS LAST, id DESC
LIMIT %(limit)s
"""
DEAD_LETTER_COUNT_SQL = "SELECT count(*) AS n FROM blogqa.dead_letters"
COST_PER_DAY_SQL = """
SELECT day, provider, model, requests, prompt_tokens, completion_tokens, cost_usd
FROM blogqa.cost_per_day
WHERE day > (now() AT TIME ZONE 'UTC')::date - %(days)s
ORDER BY day DESC, provider, model
"""
QUALITY_TABLE_SQL = "SELECT to_regclass('blogqa.quality_results') IS NOT NULL AS present"
QUALITY_COLUMNS_SQL = """
SELECT column_name, data_type FROM information_schema.columns
WHERE table_schema = 'blogqa' AND table_name = 'quality_results'
ORDER BY ordinal_position
"""

# /metrics: counters over the whole ledger and queue.
MODEL_TOTALS_SQL = """
SELECT stage, provider, model,
       count(DISTINCT request_id) AS requests,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
       coalesce(sum(cost_usd), 0)::double precision AS cost_usd
FROM blogqa.llm_usage
GROUP BY 1, 2, 3
"""
# Every recorded failed attempt (url_queue.error_history), by stage and error class.
FAILURES_SQL = """
SELECT coalesce(e->>'stage', 'unknown') AS stage, coalesce(e->>'class', 'unknown') AS class,
       count(*) AS n
FROM blogqa.url_queue q, jsonb_array_elements(q.error_history) e
GROUP BY 1, 2
"""
OUTPUT_COUNTS_SQL = """
SELECT (SELECT count(*) FROM blogqa.documents) AS documents,
       (SELECT count(*) FROM blogqa.questions) AS questions,
       (SELECT count(*) FROM blogqa.chunks) AS chunks
"""

RECENT_RUNS = 12
DEAD_LETTERS_SHOWN = 50
COST_DAYS = 14
QUALITY_ROWS = 20


async def _rows(conn: psycopg.AsyncConnection, query: str, params: dict | None = None) -> list:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


@dataclass
class QueueStatus:
    status: str
    count: int = 0
    oldest_seconds: float | None = None
    under_1h: int = 0
    under_1d: int = 0
    over_1d: int = 0


@dataclass
class Quality:
    """The newest rows of blogqa.quality_results, whatever its columns are."""

    present: bool
    columns: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)


@dataclass
class Overview:
    """Everything the UI view shows, read in one go."""

    generated_at: datetime
    queue: list[QueueStatus]
    runs: list[dict]
    dead_total: int
    dead: list[dict]
    cost: list[dict]
    quality: Quality

    @property
    def queue_total(self) -> int:
        return sum(q.count for q in self.queue)


async def queue_by_status(conn: psycopg.AsyncConnection) -> list[QueueStatus]:
    """One entry per queue status (in the queue's own order), zeros for absent ones."""
    found = {row["status"]: row for row in await _rows(conn, QUEUE_BY_STATUS_SQL)}
    result = []
    for status in [*STATUSES, *sorted(set(found) - set(STATUSES))]:
        row = found.get(status)
        if row is None:
            result.append(QueueStatus(status))
            continue
        result.append(
            QueueStatus(
                status,
                row["n"],
                row["oldest_seconds"],
                row["under_1h"],
                row["under_1d"],
                row["over_1d"],
            )
        )
    return result


async def quality(conn: psycopg.AsyncConnection) -> Quality:
    """The newest quality results, newest first by their first timestamp column."""
    present = (await _rows(conn, QUALITY_TABLE_SQL))[0]["present"]
    if not present:
        return Quality(False)
    columns = await _rows(conn, QUALITY_COLUMNS_SQL)
    names = [c["column_name"] for c in columns]
    stamps = [c["column_name"] for c in columns if c["data_type"].startswith("timestamp")]
    order = sql.Identifier(stamps[0]) if stamps else sql.Identifier(names[0])
    query = sql.SQL(
        "SELECT * FROM blogqa.quality_results ORDER BY {} DESC NULLS LAST LIMIT {}"
    ).format(order, sql.Literal(QUALITY_ROWS))
    async with conn.cursor() as cur:
        await cur.execute(query)
        rows = await cur.fetchall()
        names = [d.name for d in cur.description]
    return Quality(True, names, [list(r) for r in rows])


async def overview(conn: psycopg.AsyncConnection) -> Overview:
    return Overview(
        generated_at=datetime.now(UTC),
        queue=await queue_by_status(conn),
        runs=await _rows(conn, RECENT_RUNS_SQL, {"limit": RECENT_RUNS}),
        dead_total=(await _rows(conn, DEAD_LETTER_COUNT_SQL))[0]["n"],
        dead=await _rows(conn, DEAD_LETTERS_SQL, {"limit": DEAD_LETTERS_SHOWN}),
        cost=await _rows(conn, COST_PER_DAY_SQL, {"days": COST_DAYS}),
        quality=await quality(conn),
    )


@dataclass
class Counters:
    """The figures of /metrics."""

    queue: list[QueueStatus]
    models: list[dict]
    failures: list[dict]
    outputs: dict


async def counters(conn: psycopg.AsyncConnection) -> Counters:
    return Counters(
        queue=await queue_by_status(conn),
        models=await _rows(conn, MODEL_TOTALS_SQL),
        failures=await _rows(conn, FAILURES_SQL),
        outputs=(await _rows(conn, OUTPUT_COUNTS_SQL))[0],
    )
