"""Extraction in worker processes: real processes throughout (misbehaving ones come from
tests/extraction_workers.py). Same result as in-process; a stuck page is killed, a dying
worker replaced; a worker that cannot start fails the stage, never the URLs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from blogqa import extract, extraction_pool, pipeline, queue
from blogqa.errors import ExtractionPoolError, PageError
from blogqa.extraction_pool import MAX_DEATHS_IN_A_ROW, ExtractionPool
from tests.fakes import ARTICLE_FILES, ARTICLES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MISBEHAVING = "tests.extraction_workers"
LOGIN_FORM = b"<html><body><form><input name=u><input type=password></form></body></html>"


def page(index: int = 0, url: str | None = None, body: bytes | None = None) -> extract.Fetched:
    url = url or f"https://example.com/post-{index}"
    if body is None:
        body = ARTICLES.joinpath(ARTICLE_FILES[index % len(ARTICLE_FILES)]).read_bytes()
    return extract.Fetched(url, url, 200, body, "utf-8", None, None)


@pytest.fixture
def test_workers(monkeypatch, tmp_path):
    """Let workers import the `tests` package (the misbehaving ones live there)."""
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    monkeypatch.setenv("BLOGQA_TEST_CRASH_DIR", str(tmp_path))


def extract_all(settings, pages, **pool_options) -> list:
    """Every page through one pool; each outcome an Article or the exception raised."""

    async def run():
        async with ExtractionPool(settings, **pool_options) as pool:
            return await asyncio.gather(*(pool.extract(p) for p in pages), return_exceptions=True)

    return asyncio.run(run())


def gone(pid: int) -> bool:
    """Ended (a zombie counts: it runs no more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_pool_gives_the_same_articles_as_in_process(settings):
    pages = [page(i) for i in range(6)]
    assert extract_all(settings, pages, size=2) == [extract.extract_page(p) for p in pages]


def test_one_worker_is_a_process_too(settings):
    """BLOGQA_EXTRACT_WORKERS=1 means one worker process, never a thread."""

    async def run():
        async with ExtractionPool(dataclasses.replace(settings, extract_workers=1)) as pool:
            article = await pool.extract(page(0))
            (worker,) = pool._workers
            return article, worker.pid

    article, pid = asyncio.run(run())
    assert article == extract.extract_page(page(0)) and pid != os.getpid()


def test_pool_errors_keep_their_class_and_status(settings):
    (error,) = extract_all(settings, [page(body=LOGIN_FORM)], size=1)
    assert isinstance(error, PageError)
    assert error.permanent is True and error.stage == "crawl"


def test_worker_environment_drops_airflow_variables(monkeypatch):
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "airflow-db-not-allowed:///")
    env = extraction_pool.worker_environment()
    assert not [name for name in env if name.startswith("AIRFLOW")]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PROJECT_ROOT / "include")


def test_an_installed_blogqa_is_not_put_ahead_of_the_standard_library(monkeypatch):
    """Installed (not editable), blogqa sits in site-packages, which the worker finds anyway;
    on PYTHONPATH it would come before the standard library."""
    include = str(PROJECT_ROOT / "include")
    monkeypatch.setattr(extraction_pool.site, "getsitepackages", lambda: [include])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert "PYTHONPATH" not in extraction_pool.worker_environment()


TASK_SCRIPT = """
    import asyncio, json, os, signal, sys

    if __name__ != "__main__":
        raise RuntimeError("a worker re-imported the task's __main__")

    from blogqa import extract
    from blogqa.config import load_settings
    from blogqa.extraction_pool import ExtractionPool

    async def main(paths, orphan):
        pages = [extract.Fetched(p, p, 200, open(p, "rb").read(), "utf-8", None, None)
                 for p in paths]
        async with ExtractionPool(load_settings(), size=2) as pool:
            articles = await asyncio.gather(*(pool.extract(p) for p in pages))
            pids = [worker.pid for worker in pool._workers]
            print(json.dumps({"titles": [a.title for a in articles], "workers": pids}))
            if orphan:  # die without closing the pool: the workers must not outlive us
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main(sys.argv[2:], sys.argv[1] == "orphan"))
"""


def run_task_like(tmp_path, mode: str) -> subprocess.CompletedProcess:
    """Extraction from a process shaped like an Airflow task: its `__main__` raises when it is
    imported again (what killed the forkserver pool's workers) and the supervisor's
    database lock-out is in its environment."""
    script = tmp_path / "task_main.py"
    script.write_text(textwrap.dedent(TASK_SCRIPT))
    paths = [str(ARTICLES / name) for name in ARTICLE_FILES[:4]]
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "airflow-db-not-allowed:///"}
    return subprocess.run(
        [sys.executable, str(script), mode, *paths],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )


def test_extraction_works_in_a_task_like_process(tmp_path):
    done = run_task_like(tmp_path, "normal")
    assert done.returncode == 0, done.stderr
    expected = [extract.extract_page(page(i)).title for i in range(4)]
    assert json.loads(done.stdout)["titles"] == expected
    assert "re-imported" not in done.stderr


def test_workers_die_with_their_parent(tmp_path):
    done = run_task_like(tmp_path, "orphan")
    assert done.returncode == -signal.SIGKILL
    workers = json.loads(done.stdout)["workers"]
    deadline = time.monotonic() + 5
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in workers)


def test_a_stuck_page_is_killed_in_time_and_only_its_url_fails(settings, test_workers, caplog):
    """The stuck worker spins in C with the GIL held; SIGKILL still ends it, a fresh worker
    takes its place and the other pages are extracted."""
    hasty = dataclasses.replace(settings, extract_timeout=2.0)
    pages = [page(0, url="https://example.com/spin"), *(page(i) for i in range(1, 5))]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="blogqa.extraction_pool"):
        outcomes = extract_all(hasty, pages, size=2, module=MISBEHAVING)
    assert time.monotonic() - started < 2.0 + 10  # the timeout, start-ups and a busy machine
    stuck, *others = outcomes
    assert isinstance(stuck, PageError) and stuck.permanent is False
    assert "took longer than 2s" in str(stuck)
    assert others == [extract.extract_page(p) for p in pages[1:]]
    assert "url=https://example.com/spin stage=crawl" in caplog.text
    assert "extraction_workers.py" in caplog.text  # the stuck worker's stack, in our log


def test_the_pool_recovers_after_a_timeout(settings):
    hasty = dataclasses.replace(settings, extract_timeout=0.0001)

    async def run():
        async with ExtractionPool(hasty, size=1) as pool:
            with pytest.raises(PageError, match="extraction took longer") as caught:
                await pool.extract(page(1))
            assert caught.value.permanent is False
            pool.timeout = settings.extract_timeout
            return await pool.extract(page(1))

    assert asyncio.run(run()) == extract.extract_page(page(1))


def test_a_page_that_killed_its_worker_is_retried_on_a_fresh_one(settings, test_workers, caplog):
    pages = [page(0, url="https://example.com/crash-once"), page(1)]
    with caplog.at_level(logging.WARNING, logger="blogqa.extraction_pool"):
        outcomes = extract_all(settings, pages, size=1, module=MISBEHAVING)
    assert outcomes == [extract.extract_page(p) for p in pages]
    assert "killed by SIGSEGV; retrying on a fresh worker" in caplog.text


def test_a_page_that_kills_two_workers_fails_alone(settings, test_workers):
    pages = [page(0, url="https://example.com/crash"), page(1), page(2)]
    crashed, *others = extract_all(settings, pages, size=2, module=MISBEHAVING)
    assert isinstance(crashed, PageError) and crashed.permanent is False
    assert "https://example.com/crash killed two workers" in str(crashed)
    assert others == [extract.extract_page(p) for p in pages[1:]]


def test_workers_dying_on_every_page_is_infrastructure_failure(settings, test_workers):
    """Workers dying with no page answered in between is the environment, not the pages: the
    pool breaks, and so does every extraction waiting for a worker."""
    pages = [page(i, url=f"https://example.com/{i}/crash") for i in range(4)]
    outcomes = extract_all(settings, pages, size=1, module=MISBEHAVING)
    assert [type(outcome) for outcome in outcomes] == [
        PageError,  # deaths 1 and 2
        PageError,  # 3 and 4
        ExtractionPoolError,  # 5: more than MAX_DEATHS_IN_A_ROW
        ExtractionPoolError,  # was waiting for a worker
    ]
    assert MAX_DEATHS_IN_A_ROW == 4
    assert "5 extraction workers died in a row" in str(outcomes[2])


def test_a_worker_that_cannot_start_fails_the_pool(settings, test_workers):
    with pytest.raises(ExtractionPoolError, match="before it was ready.*No module named"):
        extract_all(settings, [page(0)], size=2, module="tests.no_such_module")


def test_a_worker_that_never_gets_ready_fails_the_pool(settings, test_workers, monkeypatch):
    monkeypatch.setenv("BLOGQA_TEST_WORKER", "silent")
    started = time.monotonic()
    with pytest.raises(ExtractionPoolError, match="was not ready after 1s"):
        extract_all(settings, [page(0)], size=1, module=MISBEHAVING, start_timeout=1.0)
    assert time.monotonic() - started < 10


def test_crawl_stage_fails_the_task_not_the_urls_when_workers_cannot_start(
    conn, settings, page_server, test_workers, monkeypatch
):
    """The incident: workers that could not start became a per-URL error on every URL and a
    green run. Now the stage raises and no URL is charged with a failure."""
    monkeypatch.setattr(extraction_pool, "WORKER_MODULE", "tests.no_such_module")
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES[:3]]
    queue.enqueue(conn, urls)
    leases = queue.claim(conn, 10, owner="test", lease_seconds=60)
    with pytest.raises(ExtractionPoolError, match="No module named"):
        pipeline.crawl_chunk([lease.ref() for lease in leases], settings)
    rows = conn.execute(
        "SELECT status, last_error, error_history FROM blogqa.url_queue ORDER BY id"
    ).fetchall()
    assert rows == [("processing", None, [])] * 3
