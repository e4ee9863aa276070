"""Postgres side of the stages: work in progress between stages, and the final load.

Between stages a claimed URL's results live in blogqa.work_items (XCom carries only ids and
lease tokens). `load_document` replaces one document's output rows in one transaction that
also marks its queue row done, fenced by the lease token, so a re-run never duplicates rows
and a worker that lost its lease writes nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from blogqa import queue
from blogqa.leases import LeaseLostError
from blogqa.llm import ModelCall
from blogqa.queue import Lease


class IncompleteWorkError(RuntimeError):
    """A work item reached load without the results of an earlier stage."""


@dataclass(frozen=True)
class StoredResult:
    """What is already in the output tables for a URL: decides conditional GET and reuse."""

    document_id: int
    page: dict
    etag: str | None
    last_modified: str | None
    content_hash: str
    chat_model: str | None
    prompt_version: str | None
    embed_model: str | None

    def is_current(
        self, content_hash: str, chat_model: str, prompt_version: str, embed_model: str
    ) -> bool:
        return (
            self.content_hash == content_hash
            and self.chat_model == chat_model
            and self.prompt_version == prompt_version
            and self.embed_model == embed_model
        )


STORED_SQL = """
SELECT d.id, d.url, d.canonical_url, d.title, d.author, d.published, d.site_name, d.language,
       d.text, d.content_hash, d.etag, d.last_modified, s.model, s.prompt_version, s.embed_model
FROM blogqa.documents d LEFT JOIN blogqa.summaries s ON s.document_id = d.id
WHERE d.url = ANY(%s)
"""


def stored_results(conn: psycopg.Connection, urls: list[str]) -> dict[str, StoredResult]:
    found = {}
    for row in conn.execute(STORED_SQL, (urls,)):
        page = {
            "url": row[1],
            "final_url": row[1],
            "canonical_url": row[2],
            "title": row[3],
            "author": row[4],
            "published": row[5].isoformat() if row[5] else None,
            "site_name": row[6],
            "language": row[7],
            "text": row[8],
            "content_hash": row[9],
            "etag": row[10],
            "last_modified": row[11],
        }
        found[row[1]] = StoredResult(row[0], page, row[10], row[11], row[9], *row[12:15])
    return found


@dataclass
class WorkItem:
    lease: Lease
    page: dict | None
    unchanged: bool
    llm_result: dict | None
    chunks: list[dict] | None
    vectors: np.ndarray | None


def save_pages(conn: psycopg.Connection, pages: list[tuple[Lease, dict, bool]]) -> None:
    """Crawl results, one row per claimed URL (replacing an older lease's leftovers)."""
    if not pages:
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO blogqa.work_items (queue_id, lease_token, page, unchanged)"
            " VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (queue_id) DO UPDATE SET lease_token = EXCLUDED.lease_token,"
            " page = EXCLUDED.page, unchanged = EXCLUDED.unchanged, llm_result = NULL,"
            " chunks = NULL, vectors = NULL, updated_at = now()",
            [
                (lease.id, uuid.UUID(lease.token), Jsonb(page), unchanged)
                for lease, page, unchanged in pages
            ],
        )


def save_llm_results(conn: psycopg.Connection, results: list[tuple[Lease, dict]]) -> None:
    if not results:
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "UPDATE blogqa.work_items SET llm_result = %s, updated_at = now()"
            " WHERE queue_id = %s AND lease_token = %s",
            [(Jsonb(result), lease.id, uuid.UUID(lease.token)) for lease, result in results],
        )


def save_vectors(
    conn: psycopg.Connection, results: list[tuple[Lease, list[dict], np.ndarray]]
) -> None:
    """Chunk texts (jsonb) and all of a document's vectors as one float32 matrix (bytea)."""
    if not results:
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "UPDATE blogqa.work_items SET chunks = %s, vectors = %s, updated_at = now()"
            " WHERE queue_id = %s AND lease_token = %s",
            [
                (
                    Jsonb(chunks),
                    np.ascontiguousarray(m, dtype=np.float32).tobytes(),
                    lease.id,
                    uuid.UUID(lease.token),
                )
                for lease, chunks, m in results
            ],
        )


def work_items(conn: psycopg.Connection, leases: list[Lease], dim: int) -> list[WorkItem]:
    """Work rows written under the leases still held (an older lease's leftovers are ignored),
    in lease order."""
    if not leases:
        return []
    by_id = {lease.id: lease for lease in leases}
    rows = conn.execute(
        "SELECT w.queue_id, w.page, w.unchanged, w.llm_result, w.chunks, w.vectors"
        " FROM blogqa.work_items w JOIN unnest(%s::bigint[], %s::uuid[]) AS l(id, token)"
        " ON w.queue_id = l.id AND w.lease_token = l.token",
        ([lease.id for lease in leases], [uuid.UUID(lease.token) for lease in leases]),
    ).fetchall()
    items = []
    for queue_id, page, unchanged, llm_result, chunks, vectors in rows:
        matrix = None
        if vectors is not None:
            matrix = np.frombuffer(vectors, dtype=np.float32).reshape(-1, dim)
        items.append(WorkItem(by_id[queue_id], page, unchanged, llm_result, chunks, matrix))
    order = {lease.id: i for i, lease in enumerate(leases)}
    items.sort(key=lambda item: order[item.lease.id])
    return items


USAGE_INSERT_SQL = """
INSERT INTO blogqa.llm_usage (queue_id, url, stage, provider, model, prompt_tokens,
    completion_tokens, inputs, latency_ms, cost_usd)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def usage_row(call: ModelCall, queue_id: int | None = None, url: str | None = None) -> tuple:
    """Parameters of USAGE_INSERT_SQL for one model call."""
    return (
        queue_id,
        url,
        call.stage,
        call.provider,
        call.model,
        call.prompt_tokens,
        call.completion_tokens,
        call.inputs,
        call.latency_ms,
        call.cost_usd,
    )


def record_usage(conn: psycopg.Connection, calls: list[tuple[Lease, ModelCall]]) -> None:
    """Append model calls to the blogqa.llm_usage ledger."""
    if not calls:
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(USAGE_INSERT_SQL, [usage_row(c, lease.id, lease.url) for lease, c in calls])


UPSERT_DOCUMENT_SQL = """
INSERT INTO blogqa.documents (url, canonical_url, title, author, published, site_name,
    language, text, word_count, content_hash, etag, last_modified, fetched_at)
VALUES (%(url)s, %(canonical_url)s, %(title)s, %(author)s, %(published)s, %(site_name)s,
    %(language)s, %(text)s, %(word_count)s, %(content_hash)s, %(etag)s, %(last_modified)s,
    %(fetched_at)s)
ON CONFLICT (url) DO UPDATE SET canonical_url = EXCLUDED.canonical_url, title = EXCLUDED.title,
    author = EXCLUDED.author, published = EXCLUDED.published, site_name = EXCLUDED.site_name,
    language = EXCLUDED.language, text = EXCLUDED.text, word_count = EXCLUDED.word_count,
    content_hash = EXCLUDED.content_hash, etag = EXCLUDED.etag,
    last_modified = EXCLUDED.last_modified, fetched_at = EXCLUDED.fetched_at, updated_at = now()
RETURNING id
"""

TOUCH_DOCUMENT_SQL = """
UPDATE blogqa.documents SET fetched_at = %s, etag = coalesce(%s, etag),
    last_modified = coalesce(%s, last_modified)
WHERE url = %s
"""


def load_document(
    conn: psycopg.Connection,
    item: WorkItem,
    *,
    embed_model: str,
    fetched_at: dt.datetime,
    timeout_seconds: float | None = None,
) -> int | None:
    """Write one document's outputs and mark its queue row done, all in one transaction.

    Raises LeaseLostError (rolling everything back) when the lease is no longer held, and
    psycopg.errors.QueryCanceled when the transaction runs past `timeout_seconds` (a lock
    held elsewhere, an overloaded server) rather than hanging the task.
    """
    page = item.page or {}
    with conn.transaction():
        if timeout_seconds:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                (f"{int(timeout_seconds * 1000)}ms",),
            )
        if item.unchanged:
            conn.execute(
                TOUCH_DOCUMENT_SQL,
                (fetched_at, page.get("etag"), page.get("last_modified"), item.lease.url),
            )
            document_id = None
        else:
            document_id = _replace_outputs(conn, item, page, embed_model, fetched_at)
        if not queue.complete(conn, item.lease):
            raise LeaseLostError(f"lease on {item.lease.url} was lost; result discarded")
        conn.execute("DELETE FROM blogqa.work_items WHERE queue_id = %s", (item.lease.id,))
    return document_id


def _replace_outputs(
    conn: psycopg.Connection, item: WorkItem, page: dict, embed_model: str, fetched_at: dt.datetime
) -> int:
    llm, chunks, vectors = item.llm_result, item.chunks, item.vectors
    if llm is None or chunks is None or vectors is None:
        raise IncompleteWorkError(f"work item for {item.lease.url} lacks an earlier stage")
    qa = llm["qa"]
    if vectors.shape[0] != 1 + len(qa) + len(chunks):
        raise IncompleteWorkError(f"work item for {item.lease.url} has {len(vectors)} vectors")
    values = {
        key: page.get(key)
        for key in ("canonical_url", "title", "author", "published", "site_name", "language")
    }
    values.update(
        url=item.lease.url,
        text=page["text"],
        word_count=len(page["text"].split()),
        content_hash=page["content_hash"],
        etag=page.get("etag"),
        last_modified=page.get("last_modified"),
        fetched_at=fetched_at,
    )
    document_id = conn.execute(UPSERT_DOCUMENT_SQL, values).fetchone()[0]
    for table in ("summaries", "questions", "chunks"):
        conn.execute(
            sql.SQL("DELETE FROM blogqa.{} WHERE document_id = %s").format(sql.Identifier(table)),
            (document_id,),
        )
    conn.execute(
        "INSERT INTO blogqa.summaries (document_id, summary, model, prompt_version, content_hash,"
        " embed_model, embedding) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            document_id,
            llm["summary"],
            llm["model"],
            llm["prompt_version"],
            page["content_hash"],
            embed_model,
            vectors[0],
        ),
    )
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO blogqa.questions (document_id, position, question, answer, embedding)"
            " VALUES (%s, %s, %s, %s, %s)",
            [
                (document_id, i, p["question"], p["answer"], vectors[1 + i])
                for i, p in enumerate(qa)
            ],
        )
        offset = 1 + len(qa)
        cur.executemany(
            "INSERT INTO blogqa.chunks (document_id, position, text, tokens, embedding)"
            " VALUES (%s, %s, %s, %s, %s)",
            [
                (document_id, i, c["text"], c["tokens"], vectors[offset + i])
                for i, c in enumerate(chunks)
            ],
        )
    return document_id
