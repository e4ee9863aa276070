"""Similarity search over the pgvector HNSW indexes (cosine distance)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import psycopg

from blogqa.config import Settings
from blogqa.embed import embedder

SIMILAR_CHUNKS_SQL = """
SELECT c.document_id, d.url, d.title, c.text, 1 - (c.embedding <=> %(v)s) AS score
FROM blogqa.chunks c JOIN blogqa.documents d ON d.id = c.document_id
ORDER BY c.embedding <=> %(v)s
LIMIT %(n)s
"""


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
