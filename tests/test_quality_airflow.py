"""The review task under a real scheduler (LocalExecutor): a run that quarantined documents
waits in `awaiting_input` for a person, who answers through Airflow's human-in-the-loop REST
API (what the Required Actions page of the UI calls); each answer does what it says, and
BLOGQA_REVIEW_TIMEOUT applies the default (leave them quarantined). A run with nothing
quarantined skips the review."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from blogqa import local_airflow
from tests.deployment import article_urls, run_to_end, scheduler, states_by_task

pytestmark = pytest.mark.timeout(1500)
# the scheduler's sweep of timed-out human-in-the-loop tasks, every 2 s instead of 15 s
LOCAL = {
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "2",
}
OFF_PAGE = ("Sourdough Starter", "01-sourdough-starter.html")
REPEATED = ("Overnight Focaccia", "02-overnight-focaccia.html")
GOOD = "06-easy-runs-zone-2.html"


@pytest.fixture(scope="module")
def airflow(airflow_base):
    with scheduler(airflow_base, env={**LOCAL, "BLOGQA_REVIEW_TIMEOUT": "900"}):
        yield airflow_base


@pytest.fixture
def bad_model(openai_env):
    openai_env.page_faults.update(
        {OFF_PAGE[0]: "off_page_answers", REPEATED[0]: "repeated_questions"}
    )
    yield openai_env
    openai_env.page_faults.clear()


def hitl_path(run_id: str) -> str:
    return (
        f"/api/v2/dags/{local_airflow.DAG_ID}/dagRuns/{run_id}/taskInstances/review/-1/hitlDetails"
    )


# How long the review must have been awaiting input before a test answers. Airflow 3.3 races
# an answer that lands before the executor has reported the paused task's process as ended:
# the scheduler then sees "finished with state success, but the state is queued", marks the
# task for retry, and the new try asks again. A person never answers that fast; a test would.
SETTLED_SECONDS = 3.0


def until_review_waits(airflow, client: httpx.Client, conf: dict, timeout: float = 300) -> str:
    """Trigger a run and wait until its review task has been awaiting input for
    SETTLED_SECONDS: the run id."""
    run_id = local_airflow.trigger(client, conf)
    deadline = time.monotonic() + timeout
    waiting_since = None
    while time.monotonic() < deadline:
        review = states_by_task(client, run_id).get("review", [None])[0]
        if review != "awaiting_input":
            waiting_since = None
        elif waiting_since is None:
            waiting_since = time.monotonic()
        elif time.monotonic() - waiting_since >= SETTLED_SECONDS:
            return run_id
        state = client.get(f"/api/v2/dags/{local_airflow.DAG_ID}/dagRuns/{run_id}").json()
        assert state["state"] in ("queued", "running"), (state, states_by_task(client, run_id))
        airflow.check_alive()
        time.sleep(1)
    raise AssertionError(f"review of {run_id} not awaiting input: {states_by_task(client, run_id)}")


def answer(client: httpx.Client, run_id: str, option: str, queue_ids: list[int] | None = None):
    response = client.patch(
        hitl_path(run_id),
        json={"chosen_options": [option], "params_input": {"queue_ids": queue_ids or []}},
    )
    assert response.status_code == 200, response.text


def statuses(conn, urls: list[str]) -> dict[str, str]:
    return dict(
        conn.execute(
            "SELECT url, status FROM blogqa.url_queue WHERE url = ANY(%s)", (urls,)
        ).fetchall()
    )


def test_release_loads_the_quarantined_documents(airflow, client, conn, page_server, bad_model):
    bad = article_urls(page_server, [OFF_PAGE[1], REPEATED[1]], query="release")
    good = article_urls(page_server, [GOOD], query="release")

    run_id = until_review_waits(airflow, client, {"urls": [*bad, *good], "chunk_size": 10})

    assert statuses(conn, bad + good) == {**dict.fromkeys(bad, "quarantined"), good[0]: "done"}
    request = client.get(hitl_path(run_id)).json()
    assert request["options"] == ["Release", "Requeue", "Drop", "Leave quarantined"]
    assert request["defaults"] == ["Leave quarantined"]
    assert "answer not supported by the page" in request["body"]
    assert "question repeated within the document" in request["body"]
    assert all(url in request["body"] for url in bad)

    answer(client, run_id, "Release")

    assert local_airflow.wait_run(client, run_id, timeout=240) == "success"
    assert statuses(conn, bad + good) == dict.fromkeys(bad + good, "done")
    loaded = conn.execute(
        "SELECT count(*) FROM blogqa.documents WHERE url = ANY(%s)", (bad,)
    ).fetchone()[0]
    assert loaded == len(bad)
    states = states_by_task(client, run_id)
    assert states["review"] == ["success"] and states["validate_tables"] == ["success"]


def test_requeue_puts_them_back_in_the_queue(airflow, client, conn, page_server, bad_model):
    """(That a requeued row is then processed afresh: test_quality; that a run with nothing
    quarantined skips the review: test_airflow_local.)"""
    bad = article_urls(page_server, [OFF_PAGE[1]], query="requeue")

    run_id = until_review_waits(airflow, client, {"urls": bad})
    answer(client, run_id, "Requeue")
    assert local_airflow.wait_run(client, run_id, timeout=240) == "success"
    status, attempts, history = conn.execute(
        "SELECT status, attempts, error_history FROM blogqa.url_queue WHERE url = %s", bad
    ).fetchone()
    assert (status, attempts) == ("queued", 0) and "requeued" in history[-1]["message"]
    assert states_by_task(client, run_id)["review"] == ["success"]


def test_drop_acts_on_the_queue_ids_given(airflow, client, conn, page_server, bad_model):
    bad = article_urls(page_server, [OFF_PAGE[1], REPEATED[1]], query="drop")
    run_id = until_review_waits(airflow, client, {"urls": bad})
    ids = dict(conn.execute("SELECT url, id FROM blogqa.url_queue WHERE url = ANY(%s)", (bad,)))

    answer(client, run_id, "Drop", [ids[bad[0]]])

    assert local_airflow.wait_run(client, run_id, timeout=240) == "success"
    assert statuses(conn, bad) == {bad[0]: "cancelled", bad[1]: "quarantined"}
    assert conn.execute(
        "SELECT count(*) FROM blogqa.documents WHERE url = ANY(%s)", (bad,)
    ).fetchone() == (0,)


def test_no_answer_in_time_leaves_them_quarantined(airflow, client, conn, page_server, bad_model):
    bad = article_urls(page_server, [REPEATED[1]], query="timeout")
    airflow.kill("scheduler", signal.SIGTERM)
    with scheduler(airflow, "scheduler-timeout", env={**LOCAL, "BLOGQA_REVIEW_TIMEOUT": "3"}):
        run_id, state = run_to_end(airflow, client, {"urls": bad}, timeout=300)
    assert state == "success"
    assert statuses(conn, bad) == {bad[0]: "quarantined"}
    detail = client.get(hitl_path(run_id)).json()
    assert detail["chosen_options"] == ["Leave quarantined"] and detail["responded_by_user"] is None
    assert states_by_task(client, run_id)["review"] == ["success"]
