"""Fault injection: whole pipeline runs against servers that fail on purpose, a worker killed
with SIGKILL, and the database restarted mid-run. After the queue drains every URL must be
done, or dead/skipped for the expected reason; none lost, none loaded twice. Each test prints
its tally (run pytest with -s to see it)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blogqa import db, embedded, runner
from blogqa.config import load_settings
from tests.fakes import ARTICLE_FILES

BLOGQA = str(Path(sys.executable).with_name("blogqa"))

# path -> (final status, words the last error must contain); None: no error expected
PAGE_FAULTS = {
    "/gone": ("dead", "HTTP 404"),
    "/flaky/faults": ("done", None),  # 503 twice, then fine
    "/slow-page": ("dead", "timed out"),
    "/huge-stream": ("dead", "byte cap"),  # 60 MB, no Content-Length
    "/report.pdf": ("skipped", "not an HTML page"),
    "/loop": ("dead", "redirects"),
    "/cp1252": ("done", None),  # no charset declared
    "/private/notes.html": ("skipped", "robots.txt"),
    "/to-private": ("dead", "non-public address 169.254.169.254"),
}
LLM_FAULT_RATES = {"429": 0.12, "500": 0.12, "slow": 0.06, "truncated": 0.12}


@pytest.fixture
def faulty_env(openai_env, monkeypatch):
    """Strict crawling (only the test servers' loopback address allowed), short timeouts and
    backoffs so retries happen within the test, and an endpoint that fails at set rates."""
    monkeypatch.setenv("BLOGQA_CRAWL_ALLOW_PRIVATE", "false")
    monkeypatch.setenv("BLOGQA_CRAWL_ALLOW_NETWORKS", "127.0.0.1/32")
    monkeypatch.setenv("BLOGQA_FETCH_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("BLOGQA_LLM_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("BLOGQA_LLM_MAX_RETRIES", "1")
    monkeypatch.setenv("BLOGQA_RETRY_BASE_SECONDS", "0.05")
    monkeypatch.setenv("BLOGQA_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("BLOGQA_LLM_BREAKER_COOLDOWN_SECONDS", "1")
    monkeypatch.setenv("BLOGQA_TASK_RETRY_DELAY_SECONDS", "1")
    # the fault pages serve demo articles again (/flaky/ is article 2): not duplicates here
    monkeypatch.setenv("BLOGQA_DEDUPE", "false")
    openai_env.retry_after = "0"
    openai_env.slow_seconds = 1.5
    return openai_env


def outcome(conn) -> dict[str, tuple[str, str | None, int]]:
    rows = conn.execute("SELECT url, status, last_error, attempts FROM blogqa.url_queue")
    return {url: (status, error, attempts) for url, status, error, attempts in rows}


def integrity(conn) -> dict[str, int]:
    """Lost rows, duplicated outputs, and done URLs whose outputs are incomplete."""
    one = lambda query: conn.execute(query).fetchone()[0]
    return {
        "lost": one(
            "SELECT count(*) FROM blogqa.url_queue WHERE status IN ('queued', 'processing')"
        ),
        "duplicated": one(
            "SELECT (SELECT count(*) - count(DISTINCT url) FROM blogqa.documents)"
            " + (SELECT count(*) - count(DISTINCT document_id) FROM blogqa.summaries)"
            " + (SELECT count(*) - count(DISTINCT (document_id, position)) FROM blogqa.questions)"
            " + (SELECT count(*) - count(DISTINCT (document_id, position)) FROM blogqa.chunks)"
        ),
        "incomplete": one(
            "SELECT count(*) FROM blogqa.url_queue q WHERE q.status = 'done' AND NOT EXISTS ("
            " SELECT 1 FROM blogqa.documents d JOIN blogqa.summaries s ON s.document_id = d.id"
            " WHERE d.url = q.url AND s.embedding IS NOT NULL"
            " AND (SELECT count(*) FROM blogqa.questions x WHERE x.document_id = d.id"
            "      AND x.embedding IS NOT NULL) BETWEEN 3 AND 5"
            " AND EXISTS (SELECT 1 FROM blogqa.chunks c WHERE c.document_id = d.id))"
        ),
        "documents_not_done": one(
            "SELECT count(*) FROM blogqa.documents d JOIN blogqa.url_queue q ON q.url = d.url"
            " WHERE q.status <> 'done'"
        ),
        "work_items_left": one("SELECT count(*) FROM blogqa.work_items"),
    }


def print_tally(title: str, conn, faults: dict) -> dict:
    states = outcome(conn)
    dead = collections.Counter(
        f"{status}: {(error or '')[:60]}"
        for status, error, _ in states.values()
        if status in ("dead", "skipped")
    )
    tally = {
        "urls": len(states),
        "faults_injected": faults,
        "retried_urls": sum(1 for _, _, attempts in states.values() if attempts > 1),
        "by_status": dict(collections.Counter(s for s, _, _ in states.values())),
        "dead_or_skipped_by_reason": dict(dead),
        **integrity(conn),
    }
    print(f"\n{title}\n{json.dumps(tally, indent=2)}")
    return tally


def test_injected_faults_end_in_the_expected_state(conn, page_server, faulty_env):
    base = page_server.base_url
    faulty_env.draw_fault.rates = dict(LLM_FAULT_RATES)
    faulty_env.draw_fault.rng.seed(4)
    articles = [f"{base}/articles/{name}" for name in ARTICLE_FILES]
    urls = articles + [base + path for path in PAGE_FAULTS]

    tally = runner.run_pipeline(load_settings(), urls=urls, chunk_size=6, wait_seconds=60)

    states = outcome(conn)
    for path, (status, reason) in PAGE_FAULTS.items():
        got_status, error, _ = states[base + path]
        assert got_status == status, (path, states[base + path])
        if reason:
            assert reason in error, (path, error)
    for url in articles:
        status, error, _ = states[url]
        # transient endpoint faults are retried away; a reply cut short twice in a row (the
        # repair attempt too) is the one permanent model failure the rates can produce
        assert status == "done" or (status == "dead" and "still invalid" in error), states[url]
    assert states[f"{base}/flaky/faults"][2] == 3  # two 503s, then done
    assert "/private/notes.html" not in page_server.hits
    faults = {"llm": dict(faulty_env.faults), "pages": len(PAGE_FAULTS)}
    result = print_tally("fault injection tally", conn, faults)
    assert sum(faulty_env.faults.values()) >= 5  # the endpoint really misbehaved
    assert result["lost"] == result["duplicated"] == result["incomplete"] == 0
    assert result["documents_not_done"] == result["work_items_left"] == 0
    assert not tally.failed_runs


def _blogqa_run(log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [BLOGQA, "run", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
        start_new_session=True,
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_sigkill_mid_chunk_then_resume(conn, page_server, openai_env, monkeypatch, tmp_path):
    monkeypatch.setenv("BLOGQA_LEASE_SECONDS", "5")
    monkeypatch.setenv("BLOGQA_LLM_CONCURRENCY", "2")
    openai_env.latency = 0.4
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES[:12]]
    with db.connect(load_settings()) as c:
        from blogqa import queue

        queue.enqueue(c, urls)
    calls = openai_env.chat_calls  # the server lives for the whole session
    worker = _blogqa_run(tmp_path / "killed.log", "--chunk-size", "4")
    _wait_for(lambda: openai_env.chat_calls >= calls + 3, 120, "the worker to reach the model")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    in_flight = conn.execute(
        "SELECT count(*) FROM blogqa.url_queue WHERE status = 'processing'"
    ).fetchone()[0]
    assert in_flight > 0, "the kill should leave claimed rows behind"

    openai_env.latency = 0.0
    tally = runner.run_pipeline(load_settings(), wait_seconds=60)

    states = outcome(conn)
    assert {s for s, _, _ in states.values()} == {"done"}, states
    assert max(attempts for _, _, attempts in states.values()) == 2  # the killed attempt
    result = print_tally("SIGKILL tally", conn, {"sigkill": 1, "rows_in_flight_at_kill": in_flight})
    assert result["lost"] == result["duplicated"] == result["incomplete"] == 0
    assert not tally.failed_runs


def _restart_database(settings, down_seconds: float) -> None:
    """Stop the embedded server (fast shutdown: sessions cut) and start it again."""
    from pgserver._commands import pg_ctl

    server = embedded.handle(settings)
    socket_dir = (settings.pgdata / "postmaster.pid").read_text().splitlines()[4]
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    time.sleep(down_seconds)
    start = ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(server.log), "start"]
    pg_ctl(start, pgdata=server.pgdata, user=server.system_user, timeout=30)


def test_database_restart_during_a_run(conn, page_server, openai_env, monkeypatch, tmp_path):
    monkeypatch.setenv("BLOGQA_LEASE_SECONDS", "5")
    monkeypatch.setenv("BLOGQA_TASK_RETRY_DELAY_SECONDS", "1")
    openai_env.latency = 0.3
    settings = load_settings()
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES]
    with db.connect(settings) as c:
        from blogqa import queue

        queue.enqueue(c, urls)
    calls = openai_env.chat_calls
    worker = _blogqa_run(tmp_path / "restart.log", "--chunk-size", "3", "--wait", "30")
    _wait_for(lambda: openai_env.chat_calls >= calls + 2, 120, "the worker to reach the model")
    conn.close()
    pid_file = settings.pgdata / "postmaster.pid"
    before = pid_file.read_text().split()[0]
    _restart_database(settings, down_seconds=2)
    assert pid_file.read_text().split()[0] != before  # really a new server process
    code = worker.wait(timeout=300)
    log = (tmp_path / "restart.log").read_text()

    openai_env.latency = 0.0
    tally = runner.run_pipeline(settings, wait_seconds=60)  # finishes whatever is left

    with db.connect(settings) as fresh:
        states = outcome(fresh)
        assert {s for s, _, _ in states.values()} == {"done"}, (states, log[-3000:])
        result = print_tally(
            "database restart tally",
            fresh,
            {
                "database_restarts": 1,
                "worker_exit_code": code,
                "worker_db_errors_logged": log.count("OperationalError"),
                "resume_runs": tally.runs,
            },
        )
    assert result["lost"] == result["duplicated"] == result["incomplete"] == 0
