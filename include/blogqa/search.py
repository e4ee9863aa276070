"""Similarity search over the pgvector HNSW indexes (cosine distance)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import psycopg

from blogqa.config import Settings
from blogqa.embed import embedder
from blogqa.llm import ModelCall

SIMILAR_CHUNKS_SQL = """
SELECT c.document_id, d.url, d.title, c.text, 1 - (c.embedding <=> %(v)s) AS score
FROM blogqa.chunks c JOIN blogqa.documents d ON d.id = c.document_id
ORDER BY c.embedding <=> %(v)s
LIMIT %(n)s
"""

# Like SIMILAR_CHUNKS_SQL, with the chunk id and position, leaving out one document
# (the query document of a "more like this URL" search; NULL leaves out none).
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

    async def embed_one() -> np.ndarray:
        provider = embedder(settings)
        try:
            matrix, _ = await provider.embed([text])
        finally:
            await provider.aclose()
        return matrix[0]

    return asyncio.run(embed_one())


def similar_documents(conn: psycopg.Connection, vector: np.ndarray, k: int = 5) -> list[Match]:
    """Documents ranked by their best-matching chunk; the passage is that chunk."""
    best: dict[int, Match] = {}
    for doc_id, url, title, text, score in conn.execute(
        SIMILAR_CHUNKS_SQL, {"v": vector, "n": max(k * 8, 40)}
    ):
        if doc_id not in best:
            best[doc_id] = Match(doc_id, url, title, float(score), text)
    return sorted(best.values(), key=lambda m: -m.score)[:k]


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
    return [
        ChunkMatch(cid, doc_id, pos, url, title, text, float(score))
        for cid, doc_id, pos, url, title, text, score in await cur.fetchall()
    ]


async def similar_documents_async(
    conn: psycopg.AsyncConnection,
    vector: np.ndarray,
    k: int = 5,
    *,
    exclude_document: int | None = None,
) -> list[Match]:
    """`similar_documents` on an async connection, optionally leaving out one document."""
    best: dict[int, Match] = {}
    for chunk in await nearest_chunks_async(
        conn, vector, max(k * 8, 40), exclude_document=exclude_document
    ):
        if chunk.document_id not in best:
            best[chunk.document_id] = Match(
                chunk.document_id, chunk.url, chunk.title, chunk.score, chunk.text
            )
    return sorted(best.values(), key=lambda m: -m.score)[:k]
