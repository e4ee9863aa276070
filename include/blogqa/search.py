"""Similarity search over the pgvector HNSW indexes (cosine distance)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import psycopg

from blogqa import sql_queries
from blogqa.config import HNSW_EF_SEARCH_DEFAULT, Settings
from blogqa.embed import OpenAIEmbedder, embedder
from blogqa.llm import ModelCall

SQL = sql_queries.load(__name__)  # queries/search.sql

# pgvector (0.6 in the embedded server) returns at most hnsw.ef_search rows from an HNSW index
# scan: a LIMIT above it silently returns fewer rows. Each search therefore runs with the value
# raised to its LIMIT (capped at pgvector's maximum). A caller that knows the value already in
# force for its connection's session (the API's pool sets it when connecting) passes it as
# `session_ef_search`: when that is the value needed, the search is the one statement. Otherwise
# the search sets the value for its own transaction (SQL.ef_search): BEGIN, set_config, the
# search, COMMIT, four round trips instead of one.
MAX_EF_SEARCH = 1000


@dataclass(frozen=True)
class ChunkMatch:
    chunk_id: int
    document_id: int
    position: int
    url: str
    title: str | None
    text: str
    score: float


@dataclass(frozen=True)
class Match:
    document_id: int
    url: str
    title: str | None
    score: float
    passage: str


def embed_query(settings: Settings, text: str) -> np.ndarray:
    """The query embedded by the configured provider (same space as the stored vectors)."""
    return asyncio.run(embed_query_async(settings, text))[0]


def _best_chunk_ids(ranked: list[tuple[int, int]], k: int) -> list[int]:
    """The best chunk of each of the first `k` documents of (chunk id, document id) rows
    ranked best first."""
    best: dict[int, int] = {}
    for chunk_id, document_id in ranked:
        if len(best) == k:
            break
        best.setdefault(document_id, chunk_id)
    return list(best.values())


def _document_matches(rows) -> list[Match]:
    """Documents ranked by their best-matching chunk; the passage is that chunk."""
    chunks = _chunk_matches(rows)
    matches = [Match(c.document_id, c.url, c.title, c.score, c.text) for c in chunks]
    return sorted(matches, key=lambda m: -m.score)


def _chunk_matches(rows) -> list[ChunkMatch]:
    return [
        ChunkMatch(cid, doc_id, pos, url, title, text, float(score))
        for cid, doc_id, pos, url, title, text, score in rows
    ]


def similar_candidates(k: int) -> int:
    """Chunks ranked to find `k` documents: 8 per document (a document has several chunks
    near the query), at least 40."""
    return max(k * 8, 40)


def ef_search_for(n: int, ef_search: int) -> int:
    """The hnsw.ef_search for a query returning `n` rows: the configured value, raised to `n`
    so the index scan can return them all."""
    return min(max(ef_search, n), MAX_EF_SEARCH)


def similar_documents(
    conn: psycopg.Connection,
    vector: np.ndarray,
    k: int = 5,
    *,
    ef_search: int = HNSW_EF_SEARCH_DEFAULT,
) -> list[Match]:
    """Documents ranked by their best-matching chunk; the passage is that chunk."""
    n = similar_candidates(k)
    with conn.transaction():
        conn.execute(SQL.ef_search, (str(ef_search_for(n, ef_search)),))
        ranked = conn.execute(SQL.nearest_ids, {"v": vector, "n": n, "exclude": None}).fetchall()
    ids = _best_chunk_ids(ranked, k)
    return _document_matches(conn.execute(SQL.chunks_by_id, {"v": vector, "ids": ids}))


async def embed_query_async(
    settings: Settings, text: str, *, client=None
) -> tuple[np.ndarray, ModelCall]:
    """`embed_query` inside a running event loop (the API); also returns the model call.

    `client`: an AsyncOpenAI the caller keeps open and reuses (the API holds one per event
    loop). Building one per call costs a new HTTP pool, TLS context and connection, more CPU
    than the rest of a search. Without it (the CLI, one query) a client is made for this call
    and closed after it."""
    if client is not None and not settings.offline:
        matrix, call = await OpenAIEmbedder(settings, client=client).embed([text])
        return matrix[0], call
    provider = embedder(settings)
    try:
        matrix, call = await provider.embed([text])
    finally:
        await provider.aclose()
    return matrix[0], call


async def _search(
    conn: psycopg.AsyncConnection,
    query: str,
    params: dict,
    *,
    ef_search: int,
    session_ef_search: int | None,
) -> list[tuple]:
    """Rows of an HNSW search returning up to `params["n"]` rows, with hnsw.ef_search raised
    to that number: in one statement when the session's value is already the one needed."""
    needed = ef_search_for(params["n"], ef_search)
    if needed == session_ef_search:
        cur = await conn.execute(query, params)
        return await cur.fetchall()
    async with conn.transaction():
        await conn.execute(SQL.ef_search, (str(needed),))
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def nearest_chunks_async(
    conn: psycopg.AsyncConnection,
    vector: np.ndarray,
    n: int,
    *,
    exclude_document: int | None = None,
    ef_search: int = HNSW_EF_SEARCH_DEFAULT,
    session_ef_search: int | None = None,
) -> list[ChunkMatch]:
    """The `n` chunks nearest to `vector` (cosine, HNSW, searched with `ef_search` raised to
    `n`), best first. `session_ef_search`: the hnsw.ef_search of the connection's session,
    when the caller knows it (see SQL.ef_search)."""
    params = {"v": vector, "n": n, "exclude": exclude_document}
    rows = await _search(
        conn,
        SQL.nearest_chunks,
        params,
        ef_search=ef_search,
        session_ef_search=session_ef_search,
    )
    return _chunk_matches(rows)


async def nearest_chunk_ids_async(
    conn: psycopg.AsyncConnection,
    vector: np.ndarray,
    n: int,
    *,
    exclude_document: int | None = None,
    ef_search: int = HNSW_EF_SEARCH_DEFAULT,
    session_ef_search: int | None = None,
) -> list[tuple[int, int]]:
    """(chunk id, document id) of the `n` chunks nearest to `vector`, best first: the ranking
    of `nearest_chunks_async` without reading texts or stored vectors."""
    params = {"v": vector, "n": n, "exclude": exclude_document}
    rows = await _search(
        conn, SQL.nearest_ids, params, ef_search=ef_search, session_ef_search=session_ef_search
    )
    return [(chunk_id, document_id) for chunk_id, document_id in rows]


async def similar_documents_async(
    conn: psycopg.AsyncConnection,
    vector: np.ndarray,
    k: int = 5,
    *,
    exclude_document: int | None = None,
    ef_search: int = HNSW_EF_SEARCH_DEFAULT,
    session_ef_search: int | None = None,
) -> list[Match]:
    """`similar_documents` on an async connection, optionally leaving out one document."""
    ranked = await nearest_chunk_ids_async(
        conn,
        vector,
        similar_candidates(k),
        exclude_document=exclude_document,
        ef_search=ef_search,
        session_ef_search=session_ef_search,
    )
    ids = _best_chunk_ids(ranked, k)
    cur = await conn.execute(SQL.chunks_by_id, {"v": vector, "ids": ids})
    return _document_matches(await cur.fetchall())


async def document_chunks_async(
    conn: psycopg.AsyncConnection, vector: np.ndarray, document_id: int, n: int
) -> list[ChunkMatch]:
    """The `n` chunks of one document nearest to `vector` (exact cosine), best first."""
    cur = await conn.execute(SQL.document_chunks, {"v": vector, "document": document_id, "n": n})
    return _chunk_matches(await cur.fetchall())
