"""Shared fixtures: one embedded PostgreSQL (with pgvector) and one Airflow metadata database
for the whole session, real HTTP servers on 127.0.0.1, and a clean schema per test."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports blogqa settings or airflow: a private BLOGQA_HOME, no real model
# endpoint, loopback crawling allowed (the test servers are on 127.0.0.1).
_HOME = Path(tempfile.mkdtemp(prefix="blogqa-test-"))
for _name in list(os.environ):
    if _name.startswith(("BLOGQA_", "OPENAI_", "AIRFLOW")):
        del os.environ[_name]
os.environ.update(
    {
        "BLOGQA_HOME": str(_HOME),
        "BLOGQA_CRAWL_ALLOW_PRIVATE": "true",
        "BLOGQA_LLM_PROVIDER": "local",
        "BLOGQA_FETCH_TIMEOUT_SECONDS": "5",
    }
)

from blogqa import db, embedded, runner
from blogqa.config import load_settings
from tests.fakes import start_openai_server, start_page_server

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_TABLES = ("work_items", "llm_usage", "chunks", "questions", "summaries", "documents")
STATE_TABLES = ("robots_txt", "circuit_breakers")


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` spreads the modules over pytest-xdist workers (`--dist loadscope`), each
    with its own home, embedded server and session fixtures. The modules that name the
    session's Airflow deployment (`airflow_base`, which each gives its scheduler) are one unit
    of work, so it is started once, on one worker, not once per worker. (xdist's `loadgroup`
    would say this with marks, but it renames node ids in a way pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    @functools.cache
    def on_the_deployment(module: str) -> bool:
        return "airflow_base" in (config.rootpath / module).read_text()

    class ModulesSharingTheDeployment(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "airflow-deployment" if on_the_deployment(module) else module

    return ModulesSharingTheDeployment(config, log)


@pytest.fixture(scope="session", autouse=True)
def blogqa_home():
    # Airflow reads its database settings once, when airflow.settings is imported: a test module
    # importing Airflow's core at collection would leave every in-process dag.test() on a
    # default SQLite database ("no such table: task_instance") instead of the test PostgreSQL.
    assert "airflow.settings" not in sys.modules, (
        "a test module imported Airflow's core at collection; import it inside the test"
    )
    settings = load_settings()
    runner.configure_airflow(settings, log_level="WARNING")
    yield _HOME
    # Airflow's own connections (dag.test in this process) go before their server does, or
    # its pool logs a traceback for each when the server shuts them down.
    if "airflow.settings" in sys.modules:
        sys.modules["airflow.settings"].dispose_orm()
    embedded.release_all()
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture
def settings():
    return load_settings()


@pytest.fixture
def conn(settings):
    """A connection to a freshly emptied schema."""
    with db.connect(settings) as connection:
        tables = ", ".join(f"blogqa.{t}" for t in (*OUTPUT_TABLES, *STATE_TABLES, "url_queue"))
        connection.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        yield connection


@pytest.fixture(scope="session")
def page_server():
    server = start_page_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def openai_server():
    server = start_openai_server()
    yield server
    server.stop()


@pytest.fixture
def openai_env(openai_server, monkeypatch):
    """Point the real `openai` client at the test server. The client's shared limits live in
    the results database, so its schema is there first (a module run on its own too)."""
    db.migrate(load_settings())
    openai_server.script.clear()
    openai_server.embedding_script.clear()
    openai_server.page_faults.clear()
    openai_server.draw_fault.rates = {}
    openai_server.faults.clear()
    openai_server.latency = 0.0
    openai_server.retry_after = "7"
    openai_server.slow_seconds = 3.0
    openai_server.floats_only = False
    use_openai_server(monkeypatch, openai_server)
    return openai_server


def use_openai_server(monkeypatch, server) -> None:
    """The environment that points blogqa's real `openai` client at a test server."""
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server.base_url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    monkeypatch.setenv("BLOGQA_LLM_PROVIDER", "openai")
    monkeypatch.setenv("BLOGQA_CHAT_MODEL", "test-chat-model")
    monkeypatch.setenv("BLOGQA_EMBED_MODEL", "text-embedding-3-small")


def table_counts(conn) -> dict[str, int]:
    from psycopg import sql

    return {
        t: conn.execute(
            sql.SQL("SELECT count(*) FROM blogqa.{}").format(sql.Identifier(t))
        ).fetchone()[0]
        for t in (*OUTPUT_TABLES, "url_queue")
    }


def queue_row(conn, url: str) -> dict:
    """Every column of a URL's queue row, plus `later`: whether it is due in the future."""
    cur = conn.execute(
        "SELECT *, run_after > now() AS later FROM blogqa.url_queue WHERE url = %s", (url,)
    )
    names = [d.name for d in cur.description]
    row = cur.fetchone()
    assert row is not None, url
    return dict(zip(names, row, strict=True))


@pytest.fixture(scope="session")
def airflow_base(openai_server):
    """Airflow's api-server and dag-processor on the test PostgreSQL, shared by the
    deployment tests; each module adds the scheduler (and workers) it tests."""
    from tests.deployment import deployment

    with deployment(openai_server) as airflow:
        yield airflow


@pytest.fixture(scope="module")
def client(airflow):
    """REST client of the deployment a module's own `airflow` fixture runs, once the DAG is
    stored (the Airflow test modules; modules without an `airflow` fixture define their own)."""
    with airflow.client() as rest:
        airflow.wait_dag(rest)
        yield rest
