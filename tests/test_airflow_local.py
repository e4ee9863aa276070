"""The first-class path: Airflow's own api-server, scheduler and dag-processor with
LocalExecutor, started by the test as `blogqa airflow` starts them, driven through the REST
API with a JWT, on the test PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from blogqa import airflow_cli, local_airflow
from tests.conftest import table_counts
from tests.deployment import (
    CHAT_MODEL,
    article_urls,
    run_in_batch_mode,
    run_to_end,
    scheduled,
    scheduler,
    states_by_task,
)
from tests.fakes import ARTICLE_FILES

pytestmark = pytest.mark.timeout(900)
local = {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "BLOGQA_BATCH_POLL_SECONDS": "1"}


@pytest.fixture(scope="module")
def airflow(airflow_base):
    with scheduler(airflow_base, env=local, triggerer=True):
        yield airflow_base


def test_pipeline_runs_under_the_scheduler_and_a_rerun_costs_nothing(
    airflow, client, conn, page_server, openai_env
):
    urls = article_urls(page_server)
    gone = f"{page_server.base_url}/gone"
    # a copy declaring the first article canonical: the crawl's duplicate check skips it, in
    # whichever chunk it lands (the original is stored, being processed, or in its chunk)
    copy = f"{page_server.base_url}/syndicated/{ARTICLE_FILES[0]}"
    chat_before = openai_env.chat_calls

    run_id, state = run_to_end(airflow, client, {"urls": [*urls, gone, copy], "chunk_size": 5})

    assert state == "success"
    states = states_by_task(client, run_id)
    # 16 URLs, at most 5 per chunk, in a whole round of the pool's 4 slots: 4 chunks of 4
    assert len(states["process.crawl"]) == 4
    assert states.pop("review") == ["skipped"]  # nothing was quarantined: no one is asked
    assert all(s == ["success"] * len(s) for s in states.values()), states
    assert openai_env.chat_calls - chat_before == len(urls)  # one chat call per new page
    counts = table_counts(conn)
    assert counts["documents"] == counts["summaries"] == len(urls)
    assert counts["work_items"] == 0
    assert counts["chunks"] >= 2 * len(urls) and counts["llm_usage"] > len(urls)
    assert conn.execute(
        "SELECT count(*) FILTER (WHERE n BETWEEN 3 AND 5), count(*) FROM ("
        " SELECT count(q.id) AS n FROM blogqa.documents d"
        " LEFT JOIN blogqa.questions q ON q.document_id = d.id GROUP BY d.id) per_doc"
    ).fetchone() == (len(urls), len(urls))
    assert conn.execute(
        "SELECT count(*) FROM blogqa.questions WHERE embedding IS NULL"
    ).fetchone() == (0,)
    assert conn.execute("SELECT DISTINCT model FROM blogqa.summaries").fetchall() == [(CHAT_MODEL,)]
    # the per-URL failure is data on its queue row, and the run is still green
    status, stage, error = conn.execute(
        "SELECT status, last_stage, last_error FROM blogqa.url_queue WHERE url = %s", (gone,)
    ).fetchone()
    assert (status, stage) == ("dead", "crawl") and "HTTP 404" in error
    status, stage, error = conn.execute(
        "SELECT status, last_stage, last_error FROM blogqa.url_queue WHERE url = %s", (copy,)
    ).fetchone()
    assert (status, stage) == ("skipped", "dedupe") and error.startswith(f"duplicate of {urls[0]}")

    # The scheduler preloaded the pipeline and Great Expectations (and so pandas) for the
    # task processes it forks (blogqa.preload); Airflow's scheduler alone imports no pandas.
    maps = Path(f"/proc/{airflow.processes['scheduler'].pid}/maps").read_text()
    assert "pandas/_libs" in maps

    # The enrich tasks' asset events, as a downstream DAG or an operator sees them: one per
    # output table and chunk, each with the rows that chunk wrote.
    answer = client.get(
        "/api/v2/assets/events", params={"source_run_id": run_id, "limit": 100}
    ).json()
    written: dict[str, int] = {}
    for event in answer["asset_events"]:
        assert event["source_task_id"] == "process.enrich"
        written[event["name"]] = written.get(event["name"], 0) + event["extra"]["rows"]
    assert written == {
        "blogqa.documents": len(urls),
        "blogqa.summaries": len(urls),
        "blogqa.questions": counts["questions"],
        "blogqa.chunks": counts["chunks"],
    }

    # The plugin: health open, the API closed to anonymous callers, open with Airflow's JWT.
    health = httpx.get(f"{airflow.base_url}/blogqa/health", timeout=10)
    assert health.status_code == 200 and health.json()["database"] is True
    anonymous = httpx.get(f"{airflow.base_url}/blogqa/api/v1/jobs/stats", timeout=10)
    assert anonymous.status_code == 401
    stats = client.get("/blogqa/api/v1/jobs/stats").json()
    assert stats["counts"]["done"] == len(urls) and stats["counts"]["dead"] == 1

    # Triggering the same URLs again with `force`: they are refetched by conditional GET and
    # cost no model call. (Without it, done URLs are not enqueued again: test_operations.)
    chat, embeddings, not_modified = (
        openai_env.chat_calls,
        openai_env.embedding_calls,
        page_server.not_modified,
    )
    run_id, state = run_to_end(airflow, client, {"urls": urls, "force": True, "chunk_size": 7})
    assert state == "success"
    assert page_server.not_modified - not_modified == len(urls)
    assert (openai_env.chat_calls, openai_env.embedding_calls) == (chat, embeddings)
    assert table_counts(conn) == counts


def test_a_run_in_which_nothing_could_be_processed_is_red(airflow, client, conn, page_server):
    """Every claimed URL only waits for a retry (the site answers 503): the URLs keep their
    reason on the queue row, and the run is failed, not green."""
    url = f"{page_server.base_url}/unavailable"

    run_id, state = run_to_end(airflow, client, {"urls": [url]})

    assert state == "failed"
    states = states_by_task(client, run_id)
    assert states["process.enrich"] == ["success"] and states["finalize"] == ["failed"]
    status, error = conn.execute(
        "SELECT status, last_error FROM blogqa.url_queue WHERE url = %s", (url,)
    ).fetchone()
    assert status == "queued" and "HTTP 503" in error


def test_batch_mode_waits_in_the_triggerer(airflow, client, conn, page_server, openai_env):
    run_in_batch_mode(airflow, client, conn, page_server, openai_env, query="batch-mode")


def test_airflow_backfill_create_reprocesses_each_period(
    airflow, client, conn, page_server, openai_env
):
    """`airflow backfill create` over a past day, with the nightly schedule: its run has that
    day as its data interval, and its `reprocess` param redoes only the documents first
    fetched in it (from the stored text: no fetch), paying one chat call each."""
    urls = article_urls(page_server, ARTICLE_FILES[:2], query="backfill")
    assert run_to_end(airflow, client, {"urls": urls})[1] == "success"
    in_window, before_it = urls
    for url, first in ((in_window, "2026-03-10 12:00Z"), (before_it, "2026-03-09 12:00Z")):
        conn.execute("UPDATE blogqa.documents SET created_at = %s WHERE url = %s", (first, url))
    conn.execute("UPDATE blogqa.summaries SET model = 'an-older-chat-model'")
    chat, fetches = openai_env.chat_calls, sum(page_server.hits.values())

    with scheduled(airflow, client, "0 2 * * *"):
        subprocess.run(
            [
                airflow_cli.executable(),
                "backfill",
                "create",
                "--dag-id",
                local_airflow.DAG_ID,
                "--from-date",
                "2026-03-10",
                "--to-date",
                "2026-03-11",
                "--dag-run-conf",
                json.dumps({"reprocess": "summaries"}),
                "--max-active-runs",
                "1",
            ],
            env=airflow.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        [backfill] = _runs_until_done(airflow, client, run_type="backfill")
        _runs_until_done(airflow, client, run_type="scheduled")  # the schedule's latest, if any

    assert backfill["state"] == "success", states_by_task(client, backfill["dag_run_id"])
    assert backfill["data_interval_start"].startswith("2026-03-10T02:00:00")
    assert backfill["data_interval_end"].startswith("2026-03-11T02:00:00")
    models = dict(
        conn.execute(
            "SELECT d.url, s.model FROM blogqa.documents d"
            " JOIN blogqa.summaries s ON s.document_id = d.id WHERE d.url = ANY(%s)",
            (urls,),
        ).fetchall()
    )
    assert models == {in_window: CHAT_MODEL, before_it: "an-older-chat-model"}
    assert openai_env.chat_calls - chat == 1
    assert sum(page_server.hits.values()) == fetches  # the stored copy was fresh


def _runs_until_done(airflow, client, run_type: str) -> list[dict]:
    """The DAG's runs of `run_type`, once none is queued or running (backfill: once there is
    one)."""

    def finished() -> list[dict] | None:
        runs = client.get(
            f"/api/v2/dags/{local_airflow.DAG_ID}/dagRuns",
            params={"limit": 100, "run_type": run_type},
        ).json()["dag_runs"]
        if not runs and run_type == "backfill":
            return None
        done = all(run["state"] in ("success", "failed") for run in runs)
        return (runs or [{}]) if done else None

    return airflow.poll(finished, timeout=240, what=f"{run_type} runs not finished")


def test_settings_naming_another_vector_set_fail_the_run_at_once(
    airflow, client, conn, page_server, openai_env
):
    """After `blogqa vectors switch`, a deployment still configured for the old embedding
    model must not write its vectors into the new active set: its claim task fails without
    retries, with a message naming the active set, and the run is red. (Set 2 keeps the
    dimension, and the test switches back and drops it, so the shared tables stay as they
    were for the other tests.)"""
    from blogqa import db, vector_sets
    from blogqa.config import load_settings

    settings = load_settings()
    url = article_urls(page_server, ["07-raised-bed-soil.html"], query="vectors")[0]
    with db.connect(settings, check_vectors=False) as admin:
        made = vector_sets.create(admin, "text-embedding-3-large", settings.embed_dim)
        try:
            vector_sets.build(admin, settings, made.id)
            vector_sets.switch(admin, settings, made.id)

            run_id, state = run_to_end(airflow, client, {"urls": [url]}, timeout=180)

            assert state == "failed"
            [claim] = [
                t for t in local_airflow.task_states(client, run_id) if t["task_id"] == "claim"
            ]
            assert (claim["state"], claim["try_number"]) == ("failed", 1)  # no retries
            log = client.get(
                f"/api/v2/dags/blogqa_pipeline/dagRuns/{run_id}/taskInstances/claim/logs/1",
                params={"full_content": "true"},
                headers={"Accept": "application/json"},
            )
            assert log.status_code == 200
            assert f"active vector set is set {made.id}: text-embedding-3-large" in log.text
            assert conn.execute(
                "SELECT count(*) FROM blogqa.url_queue WHERE url = %s", (url,)
            ).fetchone() == (0,)
        finally:
            if vector_sets.active(admin).id == made.id:
                vector_sets.switch(admin, settings, 1)
            vector_sets.drop(admin, made.id)


def test_unreachable_results_database_fails_the_tasks_and_the_run(
    airflow, client, conn, page_server
):
    """Infrastructure failure: a scheduler whose tasks cannot reach the results database.
    The tasks fail (after their retries) and the run is red; no URL is charged an attempt."""
    url = article_urls(page_server, ["07-raised-bed-soil.html"])[0]
    airflow.kill("scheduler", signal.SIGTERM)
    no_db = {"BLOGQA_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/blogqa"}
    with scheduler(airflow, "scheduler-no-db", env={**local, **no_db}):
        run_id, state = run_to_end(airflow, client, {"urls": [url]}, timeout=180)
    assert state == "failed"
    [claim] = [t for t in local_airflow.task_states(client, run_id) if t["task_id"] == "claim"]
    assert claim["state"] == "failed"
    assert claim["try_number"] == 4  # the first try and Airflow's 3 retries
    assert conn.execute(
        "SELECT count(*) FROM blogqa.url_queue WHERE url = %s", (url,)
    ).fetchone() == (0,)
