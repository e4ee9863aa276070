"""Similarity search over the pgvector HNSW indexes (cosine distance)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import psycopg

from blogqa.config import Settings
from blogqa.embed import embedder
from blogqa.llm import ModelCall

# The chunks nearest a vector, leaving out one document (the query document of a "more like
# this URL" search; NULL leaves out none).
NEAREST_CHUNKS_SQL = """
SELECT c.id, c.document_id, c.position, d.url, d.title, c.text,
       1 - (c.embedding <=> %(v)s) AS score
FROM blogqa.chunks c JOIN blogqa.documents d ON d.id = c.document_id
WHERE c.document_id IS DISTINCT FROM %(exclude)s
ORDER BY c.embedding <=> %(v)s
LIMIT %(n)s
"""


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


def _best_per_document(chunks: list[ChunkMatch], k: int) -> list[Match]:
    """Documents ranked by their best-matching chunk; the passage is that chunk."""
    best: dict[int, Match] = {}
    for chunk in chunks:
        if chunk.document_id not in best:
            best[chunk.document_id] = Match(
                chunk.document_id, chunk.url, chunk.title, chunk.score, chunk.text
            )
    return sorted(best.values(), key=lambda m: -m.score)[:k]


def _chunk_matches(rows) -> list[ChunkMatch]:
    return [
        ChunkMatch(cid, doc_id, pos, url, title, text, float(score))
        for cid, doc_id, pos, url, title, text, score in rows
    ]


def similar_documents(conn: psycopg.Connection, vector: np.ndarray, k: int = 5) -> list[Match]:
    """Documents ranked by their best-matching chunk; the passage is that chunk."""
    rows = conn.execute(NEAREST_CHUNKS_SQL, {"v": vector, "n": max(k * 8, 40), "exclude": None})
    return _best_per_document(_chunk_matches(rows), k)


async def embed_query_async(settings: Settings, text: str) -> tuple[np.ndarray, ModelCall]:
    """`embed_query` inside a running event loop (the API); also returns the model call."""
    provider = embedder(settings)
    try:
        matrix, call = await provider.embed([text])
    finally:
        await provider.aclose()
    return matrix[0], call


async def nearest_chunks_async(
    conn: psycopg.AsyncConnection,
    vector: np.ndarray,
    n: int,
    *,
    exclude_document: int | None = None,
) -> list[ChunkMatch]:
    """The `n` chunks nearest to `vector` (cosine, HNSW), best first."""
    cur = await conn.execute(NEAREST_CHUNKS_SQL, {"v": vector, "n": n, "exclude": exclude_document})
    return _chunk_matches(await cur.fetchall())


async def similar_documents_async(
    conn: psycopg.AsyncConnection,
    vector: np.ndarray,
    k: int = 5,
    *,
    exclude_document: int | None = None,
) -> list[Match]:
    """`similar_documents` on an async connection, optionally leaving out one document."""
    chunks = await nearest_chunks_async(
        conn, vector, max(k * 8, 40), exclude_document=exclude_document
    )
    return _best_per_document(chunks, k)
