"""`blogqa export` (Parquet and JSON Lines through pandas) and the SQL views of migration 009,
on rows written directly so every expected value is known."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest

from tests.test_cli import run_cli

DIM = 1536


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def seed_outputs(conn, rng: np.random.Generator) -> dict:
    """Two documents with summaries, 3 chunks and 2 questions each. Question j of a document
    is chunk j's vector plus a little noise, so its supporting passage is chunk j."""
    expected = []
    for d in range(2):
        url = f"https://blog.example/post-{d}"
        doc = conn.execute(
            "INSERT INTO blogqa.documents (url, title, text, word_count, content_hash,"
            " fetched_at) VALUES (%s, %s, 'text', 1, 'h', now()) RETURNING id",
            (url, None if d else f"Post {d}"),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO blogqa.summaries (document_id, summary, model, prompt_version,"
            " content_hash, embed_model, embedding) VALUES (%s, 'sum', 'gpt-4o-mini', 'qa-v1',"
            " 'h', 'text-embedding-3-small', %s)",
            (doc, unit(rng)),
        )
        chunks = [unit(rng) for _ in range(3)]
        for position, vector in enumerate(chunks):
            conn.execute(
                "INSERT INTO blogqa.chunks (document_id, position, text, tokens, embedding)"
                " VALUES (%s, %s, %s, 10, %s)",
                (doc, position, f"passage {position} of post {d}", vector),
            )
        for j in range(2):
            noisy = chunks[j] + 0.05 * unit(rng)
            conn.execute(
                "INSERT INTO blogqa.questions (document_id, position, question, answer,"
                " embedding) VALUES (%s, %s, %s, %s, %s)",
                (
                    doc,
                    j,
                    f"question {j} of post {d}?",
                    f"answer {j}",
                    noisy / np.linalg.norm(noisy),
                ),
            )
            expected.append(
                {
                    "url": url,
                    "title": None if d else f"Post {d}",
                    "question": f"question {j} of post {d}?",
                    "answer": f"answer {j}",
                    "supporting_passage": f"passage {j} of post {d}",
                    "model": "gpt-4o-mini",
                    "prompt_version": "qa-v1",
                    "document_id": doc,
                    "position": j,
                }
            )
    return {"rows": expected}


@pytest.fixture
def seeded(conn):
    return seed_outputs(conn, np.random.default_rng(5))


def _plain(record: dict) -> dict:
    return {k: record[k] for k in record if k != "created_at"}


def test_export_jsonl_has_the_dataset_columns(seeded, tmp_path):
    out = tmp_path / "qa.jsonl"
    result = run_cli("export", "--format", "jsonl", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote 4 rows to {out}" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [_plain(r) for r in records] == seeded["rows"]
    assert all(r["created_at"].endswith("Z") or "+00:00" in r["created_at"] for r in records)


def test_export_parquet_reads_back_with_pandas(seeded, tmp_path):
    out = tmp_path / "qa.parquet"
    result = run_cli("export", "--out", str(out))  # parquet is the default
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out)
    assert list(frame.columns) == [
        "url",
        "title",
        "question",
        "answer",
        "supporting_passage",
        "model",
        "prompt_version",
        "document_id",
        "position",
        "created_at",
    ]
    assert str(frame["created_at"].dtype).startswith("datetime64") and frame["created_at"].dt.tz
    rows = frame.drop(columns="created_at").to_dict("records")
    for row in rows:
        row["title"] = None if pd.isna(row["title"]) else row["title"]
    assert rows == seeded["rows"]


def test_export_since_and_stdout(seeded, conn, tmp_path):
    conn.execute(
        "UPDATE blogqa.questions SET created_at = '2026-01-01T00:00:00Z' WHERE position = 0"
    )
    result = run_cli("export", "--format", "jsonl", "--since", "2026-06-01", "--out", "-")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["position"] for r in records] == [1, 1]
    assert "wrote 2 rows to stdout" in result.stderr

    empty = tmp_path / "none.parquet"
    result = run_cli("export", "--since", "2999-01-01T00:00:00+02:00", "--out", str(empty))
    assert result.returncode == 0, result.stderr
    assert len(pd.read_parquet(empty)) == 0  # a valid file with the schema

    assert run_cli("export", "--since", "yesterday").returncode == 2
    refused = run_cli("export", "--format", "parquet", "--out", "-")
    assert refused.returncode == 2 and "--out" in refused.stderr


def test_views_cost_dead_letters_and_runs(conn):
    """blogqa.cost_per_day counts a request once across its rows; dead_letters gives the
    reason; recent_runs groups by the run that claimed each URL."""
    shared = uuid.uuid4()
    rows = [
        # one embedding request split over two documents (migration 006), and a chat call
        ("embed", "openai", "text-embedding-3-small", 60, 0, "0.0000012", shared),
        ("embed", "openai", "text-embedding-3-small", 40, 0, "0.0000008", shared),
        ("summarize", "openai", "gpt-4o-mini", 1000, 200, "0.00027", uuid.uuid4()),
        ("ask", "local", "local-extractive-v1", 30, 10, None, uuid.uuid4()),
    ]
    for stage, provider, model, prompt, completion, cost, request_id in rows:
        conn.execute(
            "INSERT INTO blogqa.llm_usage (stage, provider, model, prompt_tokens,"
            " completion_tokens, latency_ms, cost_usd, request_id)"
            " VALUES (%s, %s, %s, %s, %s, 5, %s, %s)",
            (stage, provider, model, prompt, completion, cost, request_id),
        )
    cost = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT model, requests, prompt_tokens, completion_tokens, cost_usd::text, stages"
            " FROM blogqa.cost_per_day WHERE day = (now() AT TIME ZONE 'UTC')::date"
        )
    }
    assert cost["text-embedding-3-small"] == (1, 100, 0, "0.000002", ["embed"])
    assert cost["gpt-4o-mini"] == (1, 1000, 200, "0.000270", ["summarize"])
    assert cost["local-extractive-v1"] == (1, 30, 10, None, ["ask"])

    history = json.dumps([{"stage": "crawl", "class": "permanent", "message": "HTTP 404"}])
    conn.execute(
        "INSERT INTO blogqa.url_queue (url, status, attempts, last_stage, last_error,"
        " error_history, finished_at, last_run_id) VALUES"
        " ('https://a.example/gone', 'dead', 1, 'crawl', 'HTTP 404 Not Found', %s, now(), 'r1'),"
        " ('https://a.example/ok', 'done', 1, NULL, NULL, '[]', now(), 'r1'),"
        " ('https://a.example/ok2', 'done', 1, NULL, NULL, '[]', now(), 'r2'),"
        " ('https://a.example/new', 'queued', 0, NULL, NULL, '[]', NULL, NULL)",
        (history,),
    )
    conn.execute(
        "UPDATE blogqa.url_queue SET started_at = finished_at - interval '30 seconds'"
        " WHERE finished_at IS NOT NULL"
    )
    dead = conn.execute(
        "SELECT url, status, stage, reason, error_class, attempts FROM blogqa.dead_letters"
    ).fetchall()
    assert dead == [
        ("https://a.example/gone", "dead", "crawl", "HTTP 404 Not Found", "permanent", 1)
    ]
    runs = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT run_id, urls, done, dead, in_progress, round(seconds) FROM blogqa.recent_runs"
        )
    }
    assert runs == {"r1": (2, 1, 1, 0, 30), "r2": (1, 1, 0, 0, 30)}
    # the reader role (migration 003) reads the views
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL ROLE blogqa_reader")
        for view in ("cost_per_day", "dead_letters", "recent_runs"):
            conn.execute(f"SELECT count(*) FROM blogqa.{view}").fetchone()
