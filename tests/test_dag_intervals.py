"""Issue 14 in the DAG: data intervals, the `reprocess` param applied to a run's interval,
discovery that does not fail the run, and the load task's asset events with row counts.

The runs go through `runner.run_pipeline` (Airflow's `dag.test()` on the test metadata
database), the real `openai` client against the OpenAI-compatible test server (which counts
chat calls) and the test page server (which counts fetches).
"""

from __future__ import annotations

import datetime as dt
import os

import psycopg
import pytest

from blogqa import pipeline, runner, sources
from blogqa.config import load_settings
from tests.fakes import ARTICLE_FILES

UTC = dt.UTC


def test_timetable_has_data_intervals_and_load_declares_assets(monkeypatch):
    from airflow.sdk import CronDataIntervalTimetable

    dag = runner.load_dag()
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert (dag.timetable.expression, str(dag.timetable.timezone)) == ("0 2 * * *", "UTC")
    assert dag.params["reprocess"] == "none"
    assert dag.params.get_param("reprocess").schema["enum"] == [
        "none",
        "summaries",
        "embeddings",
        "all",
    ]
    outlets = dag.get_task("process.enrich").outlets
    assert {a.name for a in outlets} == {f"blogqa.{t}" for t in pipeline.ASSET_TABLES}
    assert "postgres://blogqa:5432/blogqa/blogqa/questions" in {a.uri for a in outlets}

    monkeypatch.setenv("BLOGQA_SCHEDULE", "none")  # manual runs only, as before
    manual = runner.load_dag()
    assert manual.timetable.can_be_scheduled is False
    assert manual.get_task("process.enrich").outlets == outlets


def _asset_events(run_id: str) -> dict[str, list[dict]]:
    """The asset events the run's load instances emitted, from the metadata database the
    in-process `dag.test()` runs write to (asset name -> extras)."""
    dsn = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("+psycopg", "", 1)
    with psycopg.connect(dsn) as meta:
        rows = meta.execute(
            "SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
            " WHERE e.source_dag_id = %s AND e.source_run_id = %s AND e.source_task_id = %s",
            (runner.DAG_ID, run_id, "process.enrich"),
        ).fetchall()
    found: dict[str, list[dict]] = {}
    for name, extra in rows:
        found.setdefault(name, []).append(extra)
    return found


def test_reprocess_param_redoes_only_the_run_interval(conn, page_server, openai_env):
    settings = load_settings()
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES[:3]]
    assert runner.run_pipeline(settings, urls=urls, chunk_size=2).by_status == {"done": 3}

    # first fetched on three days; then the chat model changes for all of them
    firsts = [dt.datetime(2026, 3, 10, 12, tzinfo=UTC), dt.datetime(2026, 3, 9, 12, tzinfo=UTC)]
    for url, first in zip(urls, firsts, strict=False):
        conn.execute("UPDATE blogqa.documents SET created_at = %s WHERE url = %s", (first, url))
    conn.execute("UPDATE blogqa.summaries SET model = 'an-older-chat-model'")
    # a registered source that cannot be read must not fail the nightly run
    conn.execute("DELETE FROM blogqa.sources")
    broken = sources.add(conn, f"{page_server.base_url}/gone", kind="feed")["url"]
    chat, hits = openai_env.chat_calls, dict(page_server.hits)
    requests_before = len(openai_env.requests)

    # logical date 2026-03-11 03:00 -> data interval [03-10 02:00, 03-11 02:00): urls[0] only
    tally = runner.run_pipeline(
        settings,
        reprocess="summaries",
        discover=True,
        logical_date=dt.datetime(2026, 3, 11, 3, tzinfo=UTC),
    )

    assert tally.failed_runs == []
    assert (tally.claimed, tally.by_status) == (1, {"done": 1})
    assert openai_env.chat_calls - chat == 1
    title = conn.execute("SELECT title FROM blogqa.documents WHERE url = %s", (urls[0],))
    asked = openai_env.requests[requests_before]["messages"][1]["content"]
    assert asked.startswith(f"Title: {title.fetchone()[0]}\n")
    paths = [url.removeprefix(page_server.base_url) for url in urls]
    fetched = {path: page_server.hits.get(path, 0) - hits.get(path, 0) for path in paths}
    assert fetched == dict.fromkeys(paths, 0)  # the stored copy is fresh: nothing fetched
    models = dict(
        conn.execute(
            "SELECT d.url, s.model FROM blogqa.documents d JOIN blogqa.summaries s"
            " ON s.document_id = d.id"
        ).fetchall()
    )
    assert models == {
        urls[0]: "test-chat-model",
        urls[1]: "an-older-chat-model",
        urls[2]: "an-older-chat-model",
    }
    status, error = conn.execute(
        "SELECT last_status, last_error FROM blogqa.sources WHERE url = %s", (broken,)
    ).fetchone()
    assert status == "error" and "404" in error

    # the load's asset events carry what it wrote: one chunk, one document rewritten
    run_id = conn.execute(
        "SELECT last_run_id FROM blogqa.url_queue WHERE url = %s", (urls[0],)
    ).fetchone()[0]
    n_questions, n_chunks = conn.execute(
        "SELECT (SELECT count(*) FROM blogqa.questions q WHERE q.document_id = d.id),"
        " (SELECT count(*) FROM blogqa.chunks c WHERE c.document_id = d.id)"
        " FROM blogqa.documents d WHERE d.url = %s",
        (urls[0],),
    ).fetchone()
    events = _asset_events(run_id)
    expected_rows = {"documents": 1, "summaries": 1, "questions": n_questions, "chunks": n_chunks}
    assert events == {
        f"blogqa.{table}": [{"rows": rows, "documents": 1, "unchanged": 0}]
        for table, rows in expected_rows.items()
    }

    # the same interval again: nothing is stale any more, nothing is claimed or paid for
    chat = openai_env.chat_calls
    again = runner.run_pipeline(
        settings, reprocess="summaries", logical_date=dt.datetime(2026, 3, 11, 4, tzinfo=UTC)
    )
    assert (again.failed_runs, again.claimed, openai_env.chat_calls - chat) == ([], 0, 0)


def test_reprocess_needs_an_interval(settings):
    with pytest.raises(pipeline.NoIntervalError, match="needs a data interval"):
        pipeline.reprocess_interval("all", None, None, settings)
    moment = dt.datetime(2026, 3, 11, tzinfo=UTC)
    with pytest.raises(pipeline.NoIntervalError, match="empty"):
        pipeline.reprocess_interval("summaries", moment, moment, settings)
    assert pipeline.reprocess_interval("none", None, None, settings) == {"cause": "none"}
