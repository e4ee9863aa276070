"""hnsw.ef_search: the BLOGQA_HNSW_EF_SEARCH setting and how the vector searches apply it."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from pgvector.psycopg import register_vector_async

from blogqa import db, search
from blogqa.api import create_app
from blogqa.config import HNSW_EF_SEARCH_DEFAULT, load_settings
from blogqa.errors import ConfigError

CHUNKS = 120


def test_ef_search_setting_default_and_bounds(monkeypatch):
    monkeypatch.delenv("BLOGQA_HNSW_EF_SEARCH", raising=False)
    assert load_settings().hnsw_ef_search == HNSW_EF_SEARCH_DEFAULT
    monkeypatch.setenv("BLOGQA_HNSW_EF_SEARCH", "120")
    assert load_settings().hnsw_ef_search == 120
    for bad in ("0", "1001", "many"):
        monkeypatch.setenv("BLOGQA_HNSW_EF_SEARCH", bad)
        with pytest.raises(ConfigError, match="BLOGQA_HNSW_EF_SEARCH"):
            load_settings()


def test_ef_search_is_raised_to_the_limit():
    assert search.ef_search_for(10, 64) == 64
    assert search.ef_search_for(80, 64) == 80
    assert search.ef_search_for(5000, 64) == search.MAX_EF_SEARCH


@pytest.fixture
def chunk_vectors(conn, settings):
    """One document with CHUNKS random unit-vector chunks (no summary needed)."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((CHUNKS, settings.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    document = conn.execute(
        "INSERT INTO blogqa.documents (url, text, word_count, content_hash, fetched_at)"
        " VALUES ('https://example.com/a', 'x', 1, 'h', now()) RETURNING id"
    ).fetchone()[0]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO blogqa.chunks (document_id, position, text, tokens, embedding)"
            " VALUES (%s, %s, 'chunk', 1, %s)",
            [(document, i, v) for i, v in enumerate(vectors)],
        )
    return vectors


def _search_and_show(
    settings, vector, n: int, ef_search: int, *, session: int | None = None, told=None
) -> tuple[int, str, str]:
    """Rows returned through the HNSW index, hnsw.ef_search inside the caller's transaction
    (set_config is transaction-local) and after it. `session`: the connection's own
    hnsw.ef_search (as the API's pool sets it); `told`: what the search is told it is."""

    async def run():
        dsn = db.database_dsn(settings)
        options = f"-c hnsw.ef_search={session}" if session else ""
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, options=options
        ) as conn:
            await register_vector_async(conn)
            async with conn.transaction():
                await conn.execute("SET LOCAL enable_seqscan = off")  # a tiny table: force HNSW
                rows = await search.nearest_chunks_async(
                    conn, vector, n, ef_search=ef_search, session_ef_search=told
                )
                inside = await (await conn.execute("SHOW hnsw.ef_search")).fetchone()
            after = await (await conn.execute("SHOW hnsw.ef_search")).fetchone()
        return len(rows), inside[0], after[0]

    return asyncio.run(run())


def test_search_applies_ef_search_to_its_transaction_only(settings, chunk_vectors):
    assert _search_and_show(settings, chunk_vectors[0], 5, 150) == (5, "150", "40")


def test_search_returns_every_row_asked_beyond_ef_search(settings, chunk_vectors):
    # pgvector's index scan stops at ef_search rows: without raising it, 40 of the 100.
    assert _search_and_show(settings, chunk_vectors[0], 100, 40) == (100, "100", "40")


def test_search_is_one_statement_when_the_session_value_suffices(settings, chunk_vectors):
    # the session already has 100, the search needs max(40, 100) = 100: no SET
    assert _search_and_show(settings, chunk_vectors[0], 100, 40, session=100, told=100) == (
        100,
        "100",
        "100",
    )
    # it trusts what it is told and sets nothing (the API tells the value its pool sets when
    # connecting): told 100 on a session at pgvector's default, the value stays 40
    assert _search_and_show(settings, chunk_vectors[0], 100, 40, told=100)[1:] == ("40", "40")
    # told a session value that does not suffice: the search raises it for its transaction
    assert _search_and_show(settings, chunk_vectors[0], 100, 40, session=50, told=50) == (
        100,
        "100",
        "50",
    )


def test_api_pool_sessions_have_the_configured_ef_search(settings):
    app = create_app(dataclasses.replace(settings, hnsw_ef_search=77), api_token="")

    async def show(database):
        async with database.connection() as conn:
            cur = await conn.execute(
                "SELECT current_setting('hnsw.ef_search'),"
                " current_setting('default_transaction_read_only')"
            )
            return await cur.fetchone()

    with TestClient(app) as client:
        assert client.portal.call(show, app.state.database) == ("77", "on")


def test_similar_route_passes_the_setting(settings, conn, monkeypatch):
    seen = []

    async def spy(conn, vector, n, *, exclude_document=None, ef_search, session_ef_search):
        seen.append((n, ef_search, session_ef_search))
        return []

    monkeypatch.setattr(search, "nearest_chunk_ids_async", spy)  # the similar route
    monkeypatch.setattr(search, "nearest_chunks_async", spy)  # ask
    app = create_app(dataclasses.replace(settings, hnsw_ef_search=123), api_token="")
    with TestClient(app) as client:
        response = client.post("/api/v1/search/similar", json={"text": "tomatoes", "k": 10})
        assert response.status_code == 200
        response = client.post("/api/v1/qa/ask", json={"question": "how to grow tomatoes?"})
        assert response.status_code == 200
    # the pool's connections start with hnsw.ef_search = 123: the searches need no SET
    assert seen == [(80, 123, 123), (5, 123, 123)]


def test_similar_documents_keep_the_best_chunk_of_each_document(settings, conn, chunk_vectors):
    second = conn.execute(
        "INSERT INTO blogqa.documents (url, text, word_count, content_hash, fetched_at)"
        " VALUES ('https://example.com/b', 'x', 1, 'h', now()) RETURNING id"
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO blogqa.chunks (document_id, position, text, tokens, embedding)"
        " VALUES (%s, 0, 'near', 1, %s)",
        (second, chunk_vectors[3] + 0.2 * chunk_vectors[4]),
    )
    matches = search.similar_documents(conn, chunk_vectors[3], k=5, ef_search=40)
    assert [m.url for m in matches] == ["https://example.com/a", "https://example.com/b"]
    assert matches[0].score == pytest.approx(1.0, abs=1e-5)
    assert matches[0].passage == "chunk" and matches[1].passage == "near"
    assert matches[1].score == pytest.approx(1 / np.sqrt(1.04), abs=1e-3)
