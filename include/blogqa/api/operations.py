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

from blogqa import sql_queries
from blogqa.queue import STATUSES

SQL = sql_queries.load(__name__)  # queries/api/operations.sql

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
    found = {row["status"]: row for row in await _rows(conn, SQL.queue_by_status)}
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
    """The newest quality results, newest first by their first timestamp column (an
    identifier found at run time, so this one statement is composed here with psycopg.sql)."""
    present = (await _rows(conn, SQL.quality_table))[0]["present"]
    if not present:
        return Quality(False)
    columns = await _rows(conn, SQL.quality_columns)
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
        runs=await _rows(conn, SQL.recent_runs, {"limit": RECENT_RUNS}),
        dead_total=(await _rows(conn, SQL.dead_letter_count))[0]["n"],
        dead=await _rows(conn, SQL.dead_letters, {"limit": DEAD_LETTERS_SHOWN}),
        cost=await _rows(conn, SQL.cost_per_day, {"days": COST_DAYS}),
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
        models=await _rows(conn, SQL.model_totals),
        failures=await _rows(conn, SQL.failures),
        outputs=(await _rows(conn, SQL.output_counts))[0],
    )
