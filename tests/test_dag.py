"""The DAG parses and runs end to end through Airflow on the embedded Postgres."""

from __future__ import annotations

from datetime import timedelta

import pytest

from blogqa import queue, queue_stats, runner
from tests.conftest import table_counts

ARTICLE_NAMES = [
    "01-sourdough-starter.html",
    "02-overnight-focaccia.html",
    "03-home-network-vlans.html",
    "04-self-hosting-mini-pc.html",
    "05-half-marathon-plan.html",
]


def test_dag_file_defines_the_pipeline():
    dag = runner.load_dag()  # the file the dag-processor parses, imported as `blogqa run` does
    assert set(dag.task_ids) == {
        "claim",  # enqueue, then claim: one task process
        "process.crawl",
        "process.enrich",  # summarize, embed, validate, load: one task process per chunk
        "finalize",
        "validate_tables",
        "review",
    }
    assert set(dag.params) >= {"urls", "max_urls", "chunk_size", "refresh_days"}
    assert dag.params["chunk_size"] == 250
    assert dag.timetable.expression == "0 2 * * *"  # nightly refresh and backlog
    assert dag.max_active_runs == 1  # runs would only compete for the pool and the workers
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
        assert task.retry_exponential_backoff, task.task_id
        assert task.execution_timeout is not None, task.task_id
        assert task.execution_timeout <= timedelta(hours=1)
    assert dag.get_task("process.crawl").map_index_template == "{{ chunk_label }}"
    # the model-calling task takes a slot of the pool BLOGQA_LLM_POOL_SLOTS sizes (`blogqa init`)
    assert dag.get_task("process.enrich").pool == runner.LLM_POOL
    assert dag.get_task("process.crawl").pool == "default_pool"
    # just enough chunks crawled at once to fill the model cap (32 in flight, 16 per task),
    # not every chunk at once
    assert dag.get_task("process.crawl").max_active_tis_per_dagrun == 2


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"BLOGQA_LLM_CONCURRENCY": "32"}, 1),  # one task can fill the cap alone
        ({"BLOGQA_LLM_CONCURRENCY": "8"}, 4),  # 32 / 8: four tasks fill the cap
        ({"BLOGQA_LLM_CONCURRENCY": "10"}, 4),  # rounded up: three would leave 2 unused
        ({"BLOGQA_LLM_CONCURRENCY": "4"}, 4),  # never more than the pool's slots
        ({"BLOGQA_LLM_MAX_IN_FLIGHT": "0", "BLOGQA_LLM_POOL_SLOTS": "6"}, 6),  # no cap: slots
        ({"BLOGQA_LLM_POOL_SLOTS": "1"}, 1),
        ({"BLOGQA_CRAWLS_AT_ONCE": "3"}, 3),  # set: as given
    ],
)
def test_crawls_at_once_follow_the_model_settings(monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runner.load_dag().get_task("process.crawl").max_active_tis_per_dagrun == expected


def test_a_bad_crawls_at_once_is_refused(monkeypatch):
    from blogqa.config import crawls_at_once
    from blogqa.errors import ConfigError

    monkeypatch.setenv("BLOGQA_CRAWLS_AT_ONCE", "0")
    with pytest.raises(ConfigError, match="BLOGQA_CRAWLS_AT_ONCE"):
        crawls_at_once()


def test_chunks_stay_within_airflow_map_limit():
    from blogqa.pipeline import MAX_CHUNKS_PER_RUN, plan_chunks

    assert plan_chunks(10_000, 25) * MAX_CHUNKS_PER_RUN >= 10_000
    assert -(-10_000 // plan_chunks(10_000, 25)) <= MAX_CHUNKS_PER_RUN <= 1024
    assert plan_chunks(100, 25) == 25
    # every pool slot gets a chunk, and the chunks come in whole rounds of the slots
    assert plan_chunks(100, 100, lanes=4) == 25
    assert plan_chunks(500, 100, lanes=4) == 63  # 8 chunks, not 5 (4 + one alone)
    assert plan_chunks(2000, 100, lanes=4) == 100
    assert plan_chunks(3, 100, lanes=4) == 1


def test_end_to_end_run_fills_every_table_and_rerun_costs_nothing(
    conn, settings, page_server, openai_env
):
    from blogqa.config import load_settings

    settings = load_settings()
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_NAMES]
    calls_before, embeddings_before = openai_env.chat_calls, openai_env.embedding_calls

    tally = runner.run_pipeline(settings, urls=urls, chunk_size=2)

    assert tally.failed_runs == []
    assert tally.claimed == len(urls)
    assert tally.by_status == {"done": len(urls)}
    counts = table_counts(conn)
    assert counts["documents"] == counts["summaries"] == len(urls)
    assert counts["work_items"] == 0
    assert openai_env.chat_calls - calls_before == len(urls)  # exactly one chat call per page
    per_doc = conn.execute(
        "SELECT d.title, d.site_name, d.language, d.published, d.word_count,"
        " (SELECT count(*) FROM blogqa.questions q WHERE q.document_id = d.id),"
        " (SELECT count(*) FROM blogqa.chunks c WHERE c.document_id = d.id),"
        " (SELECT min(vector_dims(c.embedding)) FROM blogqa.chunks c WHERE c.document_id = d.id)"
        " FROM blogqa.documents d"
    ).fetchall()
    for title, site, language, published, words, n_questions, n_chunks, dims in per_doc:
        assert title and site and language == "en" and published is not None
        assert words > 300
        assert 3 <= n_questions <= 5
        assert n_chunks >= 2
        assert dims == 1536
    usage = dict(
        conn.execute(
            "SELECT stage, count(DISTINCT request_id) FROM blogqa.llm_usage"
            " WHERE prompt_tokens > 0 GROUP BY stage"
        ).fetchall()
    )
    assert usage["summarize"] == len(urls)
    assert usage["embed"] == openai_env.embedding_calls - embeddings_before
    # answers come from the article text
    for answer, text in conn.execute(
        "SELECT q.answer, d.text FROM blogqa.questions q JOIN blogqa.documents d"
        " ON d.id = q.document_id"
    ):
        assert answer in text
    n_docs, fewest = conn.execute(
        "SELECT count(*), min(jsonb_array_length(questions)) FROM blogqa.document_qa"
    ).fetchone()
    assert n_docs == len(urls) and 3 <= fewest <= 5

    # Second run over unchanged pages: zero model calls, no new rows, same document ids.
    doc_ids = conn.execute("SELECT id, url FROM blogqa.documents ORDER BY id").fetchall()
    chat, embeddings = openai_env.chat_calls, openai_env.embedding_calls
    result = queue.enqueue(conn, urls, force=True)
    assert len(result.requeued) == len(urls)

    tally = runner.run_pipeline(settings, chunk_size=2)

    assert tally.by_status == {"done": len(urls)}
    assert openai_env.chat_calls == chat, [
        r["messages"][1]["content"][:80] for r in openai_env.requests[-1:]
    ]
    assert openai_env.embedding_calls == embeddings
    assert table_counts(conn) == counts
    assert conn.execute("SELECT id, url FROM blogqa.documents ORDER BY id").fetchall() == doc_ids
    assert page_server.not_modified >= len(urls)  # conditional GET used the stored ETag


def test_broken_urls_do_not_stop_their_chunk(conn, settings, page_server):
    base = page_server.base_url
    good = [f"{base}/articles/{name}" for name in ARTICLE_NAMES[:3]]
    broken = {
        f"{base}/gone": ("dead", "HTTP 404"),
        f"{base}/report.pdf": ("skipped", "not an HTML page"),
        f"{base}/login": ("dead", "No article text"),
        f"{base}/unavailable": ("queued", "HTTP 503"),
        f"{base}/loop": ("dead", "redirects"),
    }
    queue.enqueue(conn, good + list(broken))

    tally = runner.run_pipeline(settings, chunk_size=20)

    assert tally.failed_runs == []  # per-URL failures are data, not task failures
    rows = {
        url: (status, error, stage, attempts, history, due)
        for url, status, error, stage, attempts, history, due in conn.execute(
            "SELECT url, status, last_error, last_stage, attempts, error_history,"
            " run_after > now() + interval '60 seconds' FROM blogqa.url_queue"
        )
    }
    for url in good:
        assert rows[url][0] == "done"
    for url, (status, message) in broken.items():
        got_status, error, stage, attempts, history, _due = rows[url]
        assert got_status == status, (url, rows[url])
        assert message in error and stage == "crawl"
        assert attempts == 1 and len(history) == 1 and history[0]["stage"] == "crawl"
    assert rows[f"{base}/unavailable"][5] is True  # Retry-After: 120 honoured
    assert table_counts(conn)["documents"] == len(good)


@pytest.mark.parametrize("max_urls", [2])
def test_run_respects_max_urls(conn, settings, page_server, max_urls):
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_NAMES]
    queue.enqueue(conn, urls)
    tally = runner.run_pipeline(settings, max_urls=max_urls, chunk_size=1)
    assert tally.claimed == max_urls
    assert queue_stats.stats(conn)["counts"]["queued"] == len(urls) - max_urls


def test_blogqa_run_does_not_split_a_small_claim_to_fill_the_pool(conn, settings, page_server):
    """Under the scheduler 5 URLs are spread over the `blogqa_llm` pool's slots, which run
    at once (plan_chunks: 3 chunks of at most 2 with 4 slots); `dag.test()` runs one task
    instance at a time, so there they stay one chunk: one crawl and one enrich."""
    assert settings.llm_pool_slots > 1  # else one chunk either way
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_NAMES]

    tally = runner.run_pipeline(settings, urls=urls)

    assert tally.runs == 1 and tally.by_status == {"done": len(urls)}
    chunks = conn.execute(
        "SELECT count(DISTINCT map_index) FROM blogqa.quality_results"
        " WHERE map_index >= 0 AND run_id IN"
        " (SELECT last_run_id FROM blogqa.url_queue WHERE url = ANY(%s))",
        (urls,),
    ).fetchone()[0]
    assert chunks == 1


def test_unreachable_database_fails_the_task_instead_of_the_urls(settings):
    """Infrastructure failure is an exception (Airflow retries the task), not per-URL data."""
    import dataclasses

    import psycopg

    from blogqa import pipeline

    down = dataclasses.replace(settings, database_url="postgresql://postgres@127.0.0.1:9/blogqa")
    with pytest.raises(psycopg.OperationalError):
        pipeline.crawl_chunk([{"id": 1, "token": "00000000-0000-0000-0000-000000000000"}], down)
