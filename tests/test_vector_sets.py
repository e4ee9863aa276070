"""Embedding vector sets (issue 14, item 2): a new embedding model and dimension embedded
beside the active set, switched over when complete while the API answers similarity searches
throughout, the old set dropped on command; the pipeline refuses settings that do not name
the active set.

Each test has a database of its own on the embedded server (the sets change the output
tables' columns). Stages run directly with the real `openai` client against the test server,
which records each embeddings request's model and dimensions; the API is served by uvicorn on
127.0.0.1 and queried over HTTP.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
import uuid

import httpx
import psycopg
import pytest

from blogqa import cli, db, embedded, pipeline, vector_sets
from blogqa.api import create_app
from blogqa.config import load_settings
from blogqa.errors import SchemaMismatchError
from tests.browser import serve_app
from tests.fakes import ARTICLE_FILES
from tests.test_reprocess import run_stages

NEW_MODEL, NEW_DIM = "text-embedding-3-large", 256
TABLES = ("summaries", "questions", "chunks")


@pytest.fixture
def own_database(openai_env, monkeypatch):
    """A fresh database for this test: BLOGQA_DATABASE_URL points every component at it."""
    base = load_settings()
    name = f"vectors_{uuid.uuid4().hex[:10]}"
    admin = embedded.uri(base, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    monkeypatch.setenv("BLOGQA_DATABASE_URL", embedded.uri(base, name))
    yield load_settings()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def load(settings, urls: list[str]) -> None:
    pipeline.enqueue_urls(urls, settings)
    assert len(run_stages(settings)) == len(urls)


def column_types(conn, table: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
        (f"blogqa.{table}",),
    )
    return {name: kind for name, kind in rows if name.startswith(("embedding", "embed_model"))}


def index_names(conn, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'blogqa' AND tablename = %s"
        " AND indexname LIKE '%%embedding%%'",
        (table,),
    )
    return {row[0] for row in rows}


def cli_json(*args: str, capsys) -> object:
    capsys.readouterr()
    assert cli.main(["vectors", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_new_model_is_built_beside_switched_to_while_the_api_serves_and_dropped(
    own_database, openai_env, page_server, monkeypatch, capsys
) -> None:
    settings = own_database
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES]
    load(settings, urls[:3])

    made = cli_json("create", "--model", NEW_MODEL, "--dim", str(NEW_DIM), capsys=capsys)
    assert (made["id"], made["state"], made["embed_dim"]) == (2, "building", NEW_DIM)
    with db.connect(settings) as conn:
        totals = {t: conn.execute(f"SELECT count(*) FROM blogqa.{t}").fetchone()[0] for t in TABLES}
        first_usage = conn.execute("SELECT max(id) FROM blogqa.llm_usage").fetchone()[0]
    openai_env.embedding_requests.clear()
    chat_before = openai_env.chat_calls

    built = cli_json("build", "2", capsys=capsys)
    assert built["embedded_now"] == totals
    assert built["built_at"] is not None
    # every request went to the new model at the new size, and no chat call was made
    assert set(openai_env.embedding_requests) == {(NEW_MODEL, NEW_DIM)}
    assert built["requests"] == len(openai_env.embedding_requests)
    assert openai_env.chat_calls == chat_before

    with db.connect(settings) as conn:
        # charged per URL it served, under its own stage
        usage = conn.execute(
            "SELECT url, model, sum(inputs), count(DISTINCT request_id) FROM blogqa.llm_usage"
            " WHERE id > %s AND stage = 'vectors' GROUP BY 1, 2 ORDER BY 1",
            (first_usage,),
        ).fetchall()
        assert {row[1] for row in usage} == {NEW_MODEL}
        assert sum(row[2] for row in usage) == sum(totals.values())
        assert {row[0] for row in usage} == {
            r[0] for r in conn.execute("SELECT url FROM blogqa.documents")
        }
        # the active set is untouched, the new one sits beside it with its own index
        assert column_types(conn, "chunks") == {
            "embedding": "vector(1536)",
            "embedding_s2": f"vector({NEW_DIM})",
        }
        assert index_names(conn, "chunks") == {"chunks_embedding_idx", "chunks_embedding_s2_idx"}
        lengths = conn.execute(
            "SELECT DISTINCT vector_dims(embedding), vector_dims(embedding_s2) FROM blogqa.chunks"
        ).fetchall()
        assert lengths == [(1536, NEW_DIM)]

    # a page loaded after the build (by the pipeline, still on set 1) lacks a set-2 vector
    load(settings, urls[3:4])

    unlimited = dataclasses.replace(settings, api_rate_limit_per_minute=0)
    with serve_app(create_app(unlimited, api_token="")) as base:
        answers: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def search_until_stopped() -> None:
            with httpx.Client(base_url=base, timeout=30) as client:
                while not stop.is_set():
                    response = client.post(
                        "/api/v1/search/similar", json={"text": "git rebase", "k": 3}
                    )
                    body = response.json()
                    answers.append((response.status_code, body.get("embed_model")))

        searcher = threading.Thread(target=search_until_stopped)
        searcher.start()
        deadline = time.monotonic() + 120
        try:
            while len(answers) < 5:
                assert searcher.is_alive() and time.monotonic() < deadline, answers
                stop.wait(0.05)
            assert {status for status, _ in answers} == {200}, answers
            switched = cli_json("switch", "2", capsys=capsys)
            seen = len(answers)
            while len(answers) < seen + 10 or answers[-1][1] != NEW_MODEL:
                assert searcher.is_alive() and time.monotonic() < deadline, answers[-5:]
                stop.wait(0.05)
        finally:
            stop.set()
            searcher.join(30)

    # every search answered, first from the old set, then from the new one
    assert {status for status, _ in answers} == {200}, answers
    models = [model for _, model in answers]
    assert models[0] == "text-embedding-3-small" and models[-1] == NEW_MODEL
    flips = sum(1 for a, b in itertools.pairwise(models) if a != b)
    assert flips == 1, models
    assert (NEW_MODEL, NEW_DIM) in openai_env.embedding_requests[-3:]

    assert switched["active"]["id"] == 2 and switched["retired"]["id"] == 1
    assert switched["caught_up"] > 0  # the page loaded after the build
    with db.connect(settings) as conn:
        assert column_types(conn, "summaries") == {
            "embedding": f"vector({NEW_DIM})",
            "embed_model": "text",
            "embedding_s1": "vector(1536)",
            "embed_model_s1": "text",
        }
        assert index_names(conn, "summaries") == {
            "summaries_embedding_idx",
            "summaries_embedding_s1_idx",
        }
        assert conn.execute(
            "SELECT DISTINCT embed_model, vector_dims(embedding) FROM blogqa.summaries"
        ).fetchall() == [(NEW_MODEL, NEW_DIM)]
        checks = conn.execute(
            "SELECT conname, convalidated FROM pg_constraint WHERE conname LIKE '%%_present'"
        ).fetchall()
        assert sorted(checks) == [(f"{t}_embedding_present", True) for t in sorted(TABLES)]

        # the pipeline, still configured for the old model, refuses to start
        with pytest.raises(SchemaMismatchError, match="active vector set is set 2"):
            db.migrate(load_settings())  # what every task's first connection runs

    # configured for the new set, it loads new pages into it
    monkeypatch.setenv("BLOGQA_EMBED_MODEL", NEW_MODEL)
    monkeypatch.setenv("BLOGQA_EMBED_DIM", str(NEW_DIM))
    now = load_settings()
    db.migrate(now)
    load(now, urls[4:5])
    with db.connect(now) as conn:
        newest = conn.execute(
            "SELECT s.embed_model, vector_dims(s.embedding), s.embedding_s1 IS NULL"
            " FROM blogqa.summaries s JOIN blogqa.documents d ON d.id = s.document_id"
            " WHERE d.url LIKE %s",
            (f"%{ARTICLE_FILES[4]}",),
        ).fetchone()
        assert newest == (NEW_MODEL, NEW_DIM, True)

        with pytest.raises(vector_sets.VectorSetError, match="switch to another set first"):
            vector_sets.drop(conn, 2)
    # blogqa's views were re-created on the new columns by the switch: a view still reading
    # set 1's columns would make this drop fail
    dropped = cli_json("drop", "1", capsys=capsys)
    assert dropped["state"] == "dropped"
    with db.connect(now) as conn:
        for table in TABLES:
            assert set(column_types(conn, table)) <= {"embedding", "embed_model"}
            assert index_names(conn, table) == {f"{table}_embedding_idx"}
        with pytest.raises(vector_sets.VectorSetError, match="was dropped"):
            vector_sets.switch(conn, now, 1)
    listed = cli_json("list", capsys=capsys)
    assert [(s["id"], s["state"]) for s in listed] == [(1, "dropped"), (2, "active")]
    assert listed[1]["embedded"] == {t: n for t, n in zip(TABLES, count_rows(now), strict=True)}


def count_rows(settings) -> list[int]:
    with db.connect(settings) as conn:
        return [conn.execute(f"SELECT count(*) FROM blogqa.{t}").fetchone()[0] for t in TABLES]


def test_switching_back_and_the_guards(own_database, openai_env, page_server, capsys) -> None:
    settings = own_database
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES[:2]]
    load(settings, urls[:1])
    with db.connect(settings) as conn:
        # only set 1: the settings' model is followed (in-place re-embedding stays possible)
        assert [(s.id, s.embed_model) for s in vector_sets.list_sets(conn)] == [
            (1, "text-embedding-3-small")
        ]
        with pytest.raises(vector_sets.VectorSetError, match="--dim 0"):
            vector_sets.create(conn, NEW_MODEL, 0)
        second = vector_sets.create(conn, NEW_MODEL, NEW_DIM)
        with pytest.raises(vector_sets.VectorSetError, match="already building"):
            vector_sets.create(conn, "another-model", 64)
        with pytest.raises(vector_sets.VectorSetError, match="no index on summaries yet"):
            vector_sets.switch(conn, settings, second.id)
        with pytest.raises(vector_sets.VectorSetError, match="already the active set"):
            vector_sets.switch(conn, settings, 1)
        with pytest.raises(vector_sets.VectorSetError, match="no vector set 9"):
            vector_sets.build(conn, settings, 9)
        with db.connect(settings) as other:  # another session building the same set
            lock = (vector_sets.BUILD_LOCK, second.id)
            assert other.execute("SELECT pg_try_advisory_lock(%s, %s)", lock).fetchone()[0]
            with pytest.raises(vector_sets.VectorSetError, match="being built by another"):
                vector_sets.build(conn, settings, second.id)
    done = cli_json("build", "2", "--switch", capsys=capsys)
    assert done["build"]["built_at"] is not None
    assert (done["switch"]["active"]["id"], done["switch"]["caught_up"]) == (2, 0)

    # back to set 1: the page loaded meanwhile (into set 2 only) is embedded for set 1 by the
    # switch, with set 1's model
    two = dataclasses.replace(load_settings(), embed_model=NEW_MODEL, embed_dim=NEW_DIM)
    load(two, urls[1:2])
    openai_env.embedding_requests.clear()
    with db.connect(settings, check_vectors=False) as conn:
        report = vector_sets.switch(conn, settings, 1)
        assert sum(report.caught_up.embedded.values()) > 0
        assert set(openai_env.embedding_requests) == {("text-embedding-3-small", 1536)}
        assert [(s.id, s.state) for s in vector_sets.list_sets(conn)] == [
            (1, "active"),
            (2, "retired"),
        ]
        assert (
            conn.execute(
                "SELECT count(*) FROM blogqa.chunks WHERE embedding IS NULL OR embedding_s2 IS NULL"
            ).fetchone()[0]
            == 0
        )
        db.migrate(settings)  # the original settings name the active set again
