"""The API's read queries, shared by the routes and the CLI (`blogqa questions|search|ask`).

Every function takes an async connection that is read-only (the pool's connections are opened
with `default_transaction_read_only = on`), and none calls a model: a text search gets its
query vector from the caller, and the answer flow with its usage ledger (the API's one write)
is blogqa.api.answers.

Each request costs few round trips: a statement per lookup in autocommit (no BEGIN/COMMIT),
a document read with its summary and questions in one statement, the vector searches in one
statement when the session's hnsw.ef_search is the one needed (search.SQL.ef_search).

The statements are in queries/api/queries.sql; `list_documents` alone assembles its WHERE
clause here, from fixed fragments, for the filters a request gives.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import psycopg
from pgvector import Vector
from psycopg.rows import dict_row

from blogqa import queue, search, sql_queries
from blogqa.api import models
from blogqa.config import Settings
from blogqa.urls import InvalidURLError, normalize_url

SQL = sql_queries.load(__name__)  # queries/api/queries.sql


class NotFoundError(LookupError):
    """No row with that id or URL; the message is shown to the client."""


class InvalidInputError(ValueError):
    """Input the route validators cannot catch (a URL the queue would refuse)."""


async def _rows(conn: psycopg.AsyncConnection, query: str, params=None) -> list[dict]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def _row(conn: psycopg.AsyncConnection, query: str, params=None) -> dict | None:
    rows = await _rows(conn, query, params)
    return rows[0] if rows else None


def normalized(url: str) -> str:
    """The URL as the queue stores it, or InvalidInputError with the queue's reason."""
    try:
        return normalize_url(url)
    except InvalidURLError as exc:
        raise InvalidInputError(f"invalid URL: {exc}") from None


# ---------------------------------------------------------------- health


INIT_HINT = "run `blogqa init`"
SCHEMA_MISMATCH = (
    "the blogqa schema lacks a table or column this API reads although its version is current:"
    f" {INIT_HINT}, and look for manual changes to schema blogqa"
)


@dataclasses.dataclass(frozen=True)
class SchemaState:
    """The schema version found against the newest migration this code ships.

    The API is read-only and never migrates; a database that is reachable but not migrated is
    a set-up step still to do (`blogqa init`), not an outage, so it gets its own answer."""

    version: int  # 0: no blogqa.schema_migrations
    expected: int

    @property
    def status(self) -> str:
        if self.version >= self.expected:
            return "ready"
        return "missing" if self.version == 0 else "behind"

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def message(self) -> str:
        if self.status == "missing":
            return (
                f"the blogqa schema is not initialised (version 0 of {self.expected}): {INIT_HINT}"
            )
        if self.status == "behind":
            return (
                f"the blogqa schema is at version {self.version} of {self.expected}, older than"
                f" this API: {INIT_HINT} to upgrade it"
            )
        return f"the blogqa schema is at version {self.version}"


async def schema_state(conn: psycopg.AsyncConnection, expected: int) -> SchemaState:
    """The schema's version, 0 when blogqa.schema_migrations does not exist. `to_regclass`
    first, so a database nobody has initialised is an answer here rather than an error (and
    works on a read-only connection)."""
    from blogqa.db import schema_version_async

    present = await _row(conn, SQL.schema_present)
    version = await schema_version_async(conn) if present["present"] else 0
    return SchemaState(version=version, expected=expected)


async def health(conn: psycopg.AsyncConnection, expected: int) -> tuple[models.Health, SchemaState]:
    """The health body (status `unavailable` when the schema is not ready) and the schema
    state it saw, for the caller's cache."""
    state = await schema_state(conn, expected)
    body = models.Health(
        status="ok" if state.ready else "unavailable",
        database=True,
        schema_status=state.status,
        schema_version=state.version,
        schema_expected_version=expected,
    )
    if not state.ready:
        body.detail = state.message
        return body, state
    row = await _row(conn, SQL.queue_depth)
    body.queue_depth = row["n"]
    return body, state


# ---------------------------------------------------------------- documents

# The one query kept in code: list_documents joins the filters a request gives (fixed
# fragments, values always as parameters) into its WHERE clause. A single static statement
# with `(%(url)s IS NULL OR d.url = %(url)s)` terms would, once psycopg prepares it, leave
# PostgreSQL a generic plan that cannot use the url index.
DOCUMENT_COLUMNS = """
d.id, d.url, d.title, d.author, d.published, d.site_name, d.language, d.word_count,
d.fetched_at,
(SELECT count(*) FROM blogqa.questions q WHERE q.document_id = d.id) AS question_count
"""


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def list_documents(
    conn: psycopg.AsyncConnection,
    *,
    url: str | None = None,
    site: str | None = None,
    q: str | None = None,
    limit: int = 20,
    offset: int = 0,
) -> models.DocumentList:
    """Documents, newest first; `url` exact (normalized), `site` = site_name, `q` a substring
    of the title or text (case-insensitive)."""
    where, params = ["TRUE"], {}
    if url is not None:
        where.append("d.url = %(url)s")
        params["url"] = normalized(url)
    if site:
        where.append("d.site_name = %(site)s")
        params["site"] = site
    if q:
        where.append("(d.title ILIKE %(q)s OR d.text ILIKE %(q)s)")
        params["q"] = _like(q)
    condition = " AND ".join(where)
    total = await _row(
        conn, f"SELECT count(*) AS n FROM blogqa.documents d WHERE {condition}", params
    )
    rows = await _rows(
        conn,
        f"SELECT {DOCUMENT_COLUMNS} FROM blogqa.documents d WHERE {condition}"
        " ORDER BY d.updated_at DESC, d.id DESC LIMIT %(limit)s OFFSET %(offset)s",
        {**params, "limit": limit, "offset": offset},
    )
    return models.DocumentList(
        total=total["n"],
        limit=limit,
        offset=offset,
        items=[models.DocumentItem(**row) for row in rows],
    )


async def _questions_of(conn: psycopg.AsyncConnection, document_ids: list[int]) -> dict:
    found: dict[int, list[models.QuestionItem]] = {i: [] for i in document_ids}
    for row in await _rows(conn, SQL.questions_of, (document_ids,)):
        found[row.pop("document_id")].append(models.QuestionItem(**row))
    return found


async def get_document(
    conn: psycopg.AsyncConnection,
    document_id: int | None = None,
    *,
    url: str | None = None,
    include_text: bool = False,
) -> models.DocumentDetail:
    """One document with its summary and questions, by id or by (normalized) URL."""
    if url is not None:
        query, value = SQL.document_by_url, normalized(url)
    else:
        query, value = SQL.document_by_id, document_id
    row = await _row(conn, query, {"include_text": include_text, "value": value})
    if row is None:
        raise NotFoundError(await _not_found_message(conn, document_id, url))
    summary = {k: row.pop(k) for k in ("summary", "model", "prompt_version", "embed_model")}
    summary["created_at"] = row.pop("summary_created_at")
    return models.DocumentDetail(
        **row,
        # NULL when the document has no summary yet (LEFT JOIN)
        summary=models.DocumentSummary(**summary) if summary["summary"] is not None else None,
    )


async def _not_found_message(
    conn: psycopg.AsyncConnection, document_id: int | None, url: str | None
) -> str:
    if url is None:
        return f"no document with id {document_id}"
    url = normalized(url)
    job = await _row(conn, SQL.job_by_url, (url,))
    if job is None:
        return f"no document for {url}: the URL has not been enqueued"
    detail = f"; last error: {job['last_error']}" if job["last_error"] else ""
    return f"no document for {url} yet: queue job {job['id']} is {job['status']}{detail}"


async def get_question(conn: psycopg.AsyncConnection, question_id: int) -> models.QuestionDetail:
    row = await _row(conn, SQL.question, (question_id,))
    if row is None:
        raise NotFoundError(f"no question with id {question_id}")
    return models.QuestionDetail(**row)


# ---------------------------------------------------------------- search


async def similar_query(
    conn: psycopg.AsyncConnection, request: models.SimilarRequest
) -> tuple[str, int, Vector]:
    """For a `url` request: (normalized URL, document id, summary vector) of the query
    document, or NotFoundError."""
    query_url = normalized(request.url or "")
    async with conn.cursor(binary=True) as cur:
        await cur.execute(SQL.query_document, (query_url,))
        row = await cur.fetchone()
    if row is None:
        raise NotFoundError(await _not_found_message(conn, None, request.url))
    return query_url, row[0], row[1]


async def similar(
    conn: psycopg.AsyncConnection,
    settings: Settings,
    request: models.SimilarRequest,
    *,
    vector: np.ndarray | None = None,
    session_ef_search: int | None = None,
) -> models.SimilarResponse:
    """Documents ranked by cosine similarity of their best chunk to the query.

    `vector`: a text request's query embedding (search.embed_query_async), which the caller
    computes before it takes a pooled connection; a `url` request uses the stored document's
    summary vector. `session_ef_search`: the connection session's hnsw.ef_search, when known
    (see search.SQL.ef_search)."""
    exclude = None
    query_url = None
    if request.url is not None:
        query_url, exclude, vector = await similar_query(conn, request)
    elif vector is None:
        raise ValueError("a text request needs its query vector: embed the text first")
    matches = await search.similar_documents_async(
        conn,
        vector,
        request.k,
        exclude_document=exclude,
        ef_search=settings.hnsw_ef_search,
        session_ef_search=session_ef_search,
    )
    questions = (
        await _questions_of(conn, [m.document_id for m in matches])
        if request.include_questions
        else {}
    )
    return models.SimilarResponse(
        query_url=query_url,
        embed_model=settings.embed_model,
        results=[
            models.SimilarResult(
                document_id=m.document_id,
                url=m.url,
                title=m.title,
                score=round(m.score, 6),
                passage=m.passage,
                questions=questions.get(m.document_id) if request.include_questions else None,
            )
            for m in matches
        ],
    )


async def ask_sources(
    conn: psycopg.AsyncConnection,
    settings: Settings,
    request: models.AskRequest,
    vector: np.ndarray,
    *,
    session_ef_search: int | None = None,
) -> list[search.ChunkMatch]:
    """The top-k chunks for an embedded question (the database part of `answers.ask`)."""
    return await search.nearest_chunks_async(
        conn,
        vector,
        request.k,
        ef_search=settings.hnsw_ef_search,
        session_ef_search=session_ef_search,
    )


# ---------------------------------------------------------------- jobs


def _round(value, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


async def job_stats(conn: psycopg.AsyncConnection) -> models.JobStats:
    counts = dict.fromkeys(queue.STATUSES, 0)
    for row in await _rows(conn, SQL.job_counts):
        counts[row["status"]] = row["n"]
    oldest = await _row(conn, SQL.job_oldest)
    window = await _row(conn, SQL.job_window)
    finished = window["done"] + window["failed"]
    return models.JobStats(
        counts=counts,
        total=sum(counts.values()),
        oldest_queued_age_seconds=_round(oldest["age"], 1),
        claimable=oldest["claimable"],
        done_last_hour=window["done"],
        failed_last_hour=window["failed"],
        retries_last_hour=window["retries"],
        failure_rate_last_hour=round(window["failed"] / finished, 4) if finished else None,
        avg_wait_seconds=_round(window["wait"]),
        avg_processing_seconds=_round(window["processing"]),
    )


async def list_jobs(
    conn: psycopg.AsyncConnection, *, status: str | None = None, limit: int = 20, offset: int = 0
) -> models.JobList:
    """Queue rows, most recently updated first."""
    rows = await _rows(conn, SQL.list_jobs, {"status": status, "limit": limit, "offset": offset})
    return models.JobList(items=[models.JobItem(**row) for row in rows])


async def get_job(conn: psycopg.AsyncConnection, job_id: int) -> models.JobDetail:
    row = await _row(conn, SQL.job, (job_id,))
    if row is None:
        raise NotFoundError(f"no queue job with id {job_id}")
    return models.JobDetail(**row)
