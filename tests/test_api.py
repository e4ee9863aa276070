"""The results API on data from a real pipeline run (embedded Postgres, offline provider)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

from blogqa import db, queue, runner
from blogqa.api import create_app
from blogqa.config import load_settings
from blogqa.urls import normalize_url
from tests.conftest import OUTPUT_TABLES, PROJECT_ROOT
from tests.test_cli import run_cli

ARTICLES = sorted(p.name for p in (PROJECT_ROOT / "include/blogqa/demo/articles").glob("*.html"))


@pytest.fixture(scope="module")
def pipeline(page_server):
    """Every demo article (plus one dead URL) run through the DAG once for this module."""
    settings = load_settings()
    base = page_server.base_url
    urls = [f"{base}/articles/{name}" for name in ARTICLES]
    with db.connect(settings) as conn:
        tables = ", ".join(f"blogqa.{t}" for t in (*OUTPUT_TABLES, "url_queue"))
        conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        queue.enqueue(conn, [*urls, f"{base}/gone"])
    tally = runner.run_pipeline(settings, chunk_size=5)
    assert tally.failed_runs == []
    return {"settings": settings, "urls": urls, "dead": f"{base}/gone"}


@pytest.fixture(scope="module")
def client(pipeline):
    with TestClient(create_app(pipeline["settings"], api_token="")) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def reader(pipeline):
    """A plain connection for checking what the API returns against the tables."""
    with db.connect(pipeline["settings"]) as conn:
        yield conn


def test_health(client):
    body = client.get("/health").json()
    latest = db.migration_files()[-1][0]
    assert latest >= 4
    assert body == {
        "status": "ok",
        "database": True,
        "schema_status": "ready",
        "schema_version": latest,
        "schema_expected_version": latest,
        "queue_depth": 0,
        "detail": None,
    }


def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    # /ui, /metrics and /widget.js are a page, a text format and a script: not in the schema
    assert {p for p in paths if not p.startswith("/quality")} == {
        "/health",
        "/api/v1/documents",
        "/api/v1/documents/{document_id}",
        "/api/v1/questions/by-url",
        "/api/v1/questions/{question_id}",
        "/api/v1/search/similar",
        "/api/v1/qa/ask",
        "/api/v1/jobs/stats",
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/widget/v1/page",
        "/widget/v1/ask",
    }


def test_documents_list_filters_and_pages(client, pipeline):
    body = client.get("/api/v1/documents", params={"limit": 5}).json()
    assert body["total"] == len(ARTICLES) and len(body["items"]) == 5
    rest = client.get("/api/v1/documents", params={"limit": 100, "offset": 5}).json()
    ids = [d["id"] for d in body["items"] + rest["items"]]
    assert len(ids) == len(set(ids)) == len(ARTICLES)
    assert all(3 <= d["question_count"] <= 5 for d in rest["items"])

    url = "HTTP" + pipeline["urls"][0].removeprefix("http") + "?utm_medium=x#top"
    one = client.get("/api/v1/documents", params={"url": url}).json()
    assert one["total"] == 1 and one["items"][0]["url"] == normalize_url(url)

    site = one["items"][0]["site_name"]
    by_site = client.get("/api/v1/documents", params={"site": site}).json()
    assert by_site["total"] >= 1 and all(d["site_name"] == site for d in by_site["items"])

    found = client.get("/api/v1/documents", params={"q": "sourdough"}).json()
    assert found["total"] >= 1
    assert any("sourdough" in (d["title"] or "").lower() for d in found["items"])
    assert client.get("/api/v1/documents", params={"q": "100%_no_match"}).json()["total"] == 0


def test_document_detail_has_summary_and_questions(client, reader):
    doc_id, text = reader.execute("SELECT id, text FROM blogqa.documents LIMIT 1").fetchone()
    body = client.get(f"/api/v1/documents/{doc_id}").json()
    assert body["id"] == doc_id and body["text"] is None
    assert body["summary"]["model"].startswith("local-")
    assert 3 <= len(body["questions"]) <= 5
    assert [q["position"] for q in body["questions"]] == list(range(len(body["questions"])))
    assert body["chunk_count"] >= 2
    full = client.get(f"/api/v1/documents/{doc_id}", params={"include_text": True}).json()
    assert full["text"] == text


def test_document_without_a_summary(client, reader):
    """A document the pipeline has not summarised yet: `summary` is null, not an error."""
    doc_id = reader.execute(
        "INSERT INTO blogqa.documents (url, text, word_count, content_hash, fetched_at)"
        " VALUES ('https://example.com/no-summary-yet', 'x', 1, 'h', now()) RETURNING id"
    ).fetchone()[0]
    try:
        response = client.get(f"/api/v1/documents/{doc_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["summary"] is None and body["questions"] == []
        assert body["question_count"] == 0 and body["chunk_count"] == 0
    finally:
        reader.execute("DELETE FROM blogqa.documents WHERE id = %s", (doc_id,))


def test_questions_by_url_normalizes_like_the_queue(client, pipeline):
    raw = pipeline["urls"][3] + "?utm_source=newsletter#comments"
    body = client.get("/api/v1/questions/by-url", params={"url": raw}).json()
    assert body["url"] == normalize_url(pipeline["urls"][3])
    assert 3 <= len(body["questions"]) <= 5
    for item in body["questions"]:
        assert item["question"] and item["answer"]


def test_questions_by_url_errors(client, pipeline):
    bad = client.get("/api/v1/questions/by-url", params={"url": "ftp://example.com/x"})
    assert bad.status_code == 422
    assert "scheme 'ftp' is not supported" in bad.json()["detail"]

    unknown = client.get("/api/v1/questions/by-url", params={"url": "https://example.com/new"})
    assert unknown.status_code == 404
    assert "has not been enqueued" in unknown.json()["detail"]

    dead = client.get("/api/v1/questions/by-url", params={"url": pipeline["dead"]})
    assert dead.status_code == 404
    assert "is dead" in dead.json()["detail"] and "404" in dead.json()["detail"]


def test_question_by_id(client, reader):
    qid, question, doc_id = reader.execute(
        "SELECT id, question, document_id FROM blogqa.questions ORDER BY id LIMIT 1"
    ).fetchone()
    body = client.get(f"/api/v1/questions/{qid}").json()
    assert body["question"] == question and body["document_id"] == doc_id and body["url"]


@pytest.mark.parametrize(
    "path",
    ["/api/v1/documents/999999", "/api/v1/questions/999999", "/api/v1/jobs/999999"],
)
def test_unknown_ids_are_404_with_a_message(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "999999" in response.json()["detail"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/documents", {"limit": 101}),
        ("/api/v1/documents", {"limit": 0}),
        ("/api/v1/documents", {"offset": -1}),
        ("/api/v1/jobs", {"limit": 1000}),
        ("/api/v1/jobs", {"status": "bogus"}),
        ("/api/v1/documents/abc", {}),
        ("/api/v1/questions/by-url", {}),
    ],
)
def test_invalid_parameters_are_422(client, path, params):
    assert client.get(path, params=params).status_code == 422


def test_similar_by_text_ranks_the_matching_article_first(client):
    response = client.post(
        "/api/v1/search/similar",
        json={"text": "how to keep a sourdough starter alive and bubbly", "k": 3},
    )
    body = response.json()
    assert response.status_code == 200, body
    assert len(body["results"]) == 3
    assert "sourdough" in body["results"][0]["url"]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert body["results"][0]["questions"] is None


def test_similar_by_url_leaves_the_document_out(client, pipeline):
    url = pipeline["urls"][0]
    body = client.post(
        "/api/v1/search/similar", json={"url": url, "k": 5, "include_questions": True}
    ).json()
    assert body["query_url"] == normalize_url(url)
    assert len(body["results"]) == 5
    assert all(r["url"] != body["query_url"] for r in body["results"])
    assert all(3 <= len(r["questions"]) <= 5 for r in body["results"])


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"k": 3}, 422),
        ({"text": "a", "url": "https://example.com/", "k": 3}, 422),
        ({"text": "bread", "k": 0}, 422),
        ({"text": "bread", "k": 101}, 422),
        ({"text": "bread", "extra": 1}, 422),
        ({"url": "javascript:alert(1)"}, 422),
        ({"url": "https://example.com/never-seen"}, 404),
    ],
)
def test_similar_rejects_bad_bodies(client, body, status):
    response = client.post("/api/v1/search/similar", json=body)
    assert response.status_code == status, response.text


def test_ask_answers_from_the_sources_and_records_usage(client, reader):
    before = reader.execute("SELECT count(*) FROM blogqa.llm_usage WHERE stage = 'ask'").fetchone()
    response = client.post(
        "/api/v1/qa/ask", json={"question": "How often should I feed a sourdough starter?"}
    )
    body = response.json()
    assert response.status_code == 200, body
    assert body["provider"] == "local" and body["model"].startswith("local-")
    assert len(body["sources"]) == 5
    assert "sourdough" in body["sources"][0]["url"]
    assert any(body["answer"] in source["text"] for source in body["sources"])
    assert body["usage"]["prompt_tokens"] > 0
    after = reader.execute("SELECT count(*) FROM blogqa.llm_usage WHERE stage = 'ask'").fetchone()
    assert after[0] - before[0] == 2  # the question's embedding and the answer
    # written through the API's small ledger pool, not a new connection per request
    ledger = reader.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'blogqa-api-ledger'"
    ).fetchone()[0]
    assert 1 <= ledger <= 2


def test_ask_validation(client):
    assert client.post("/api/v1/qa/ask", json={"question": ""}).status_code == 422
    assert client.post("/api/v1/qa/ask", json={"question": "why?", "k": 21}).status_code == 422
    assert client.post("/api/v1/qa/ask", content=b"{not json").status_code == 422


def test_job_stats(client):
    body = client.get("/api/v1/jobs/stats").json()
    assert body["counts"]["done"] == len(ARTICLES) and body["counts"]["dead"] == 1
    assert body["total"] == len(ARTICLES) + 1
    assert body["oldest_queued_age_seconds"] is None and body["claimable"] == 0
    assert body["done_last_hour"] == len(ARTICLES) and body["failed_last_hour"] == 1
    assert body["retries_last_hour"] == 1
    assert body["failure_rate_last_hour"] == pytest.approx(1 / (len(ARTICLES) + 1), abs=1e-3)
    assert body["avg_wait_seconds"] >= 0 and body["avg_processing_seconds"] > 0


def test_jobs_list_and_detail(client, pipeline):
    dead = client.get("/api/v1/jobs", params={"status": "dead"}).json()["items"]
    assert [job["url"] for job in dead] == [pipeline["dead"]]
    assert dead[0]["stage"] == "crawl" and "404" in dead[0]["last_error"]
    detail = client.get(f"/api/v1/jobs/{dead[0]['id']}").json()
    assert detail["attempts"] == 1 and detail["document_id"] is None
    (entry,) = detail["error_history"]
    assert entry["stage"] == "crawl" and entry["class"] == "permanent" and entry["at"]

    done = client.get("/api/v1/jobs", params={"status": "done", "limit": 3}).json()["items"]
    assert len(done) == 3 and all(job["status"] == "done" for job in done)
    assert client.get(f"/api/v1/jobs/{done[0]['id']}").json()["document_id"] is not None
    everything = client.get("/api/v1/jobs", params={"limit": 100}).json()["items"]
    assert len(everything) == len(ARTICLES) + 1
    assert "lease_token" not in detail


def test_body_over_64_kb_is_413(client):
    big = {"text": "x" * (70 * 1024)}
    assert client.post("/api/v1/search/similar", json=big).status_code == 413

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(20):
            yield b"x" * 4096

    response = client.post(
        "/api/v1/qa/ask", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert "64" in response.json()["detail"] or "65536" in response.json()["detail"]


def test_unexpected_errors_are_a_generic_500(pipeline, monkeypatch):
    from blogqa.api import queries

    async def broken(conn):
        raise RuntimeError("secret-password-in-a-stack-trace")

    monkeypatch.setattr(queries, "job_stats", broken)
    app = create_app(pipeline["settings"], api_token="")
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.get("/api/v1/jobs/stats")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "secret" not in response.text


def test_token_required_when_configured(pipeline, monkeypatch):
    monkeypatch.setenv("BLOGQA_API_TOKEN", "s3cret-token")
    with TestClient(create_app(pipeline["settings"])) as test_client:
        assert test_client.get("/health").status_code == 200  # always open
        missing = test_client.get("/api/v1/jobs/stats")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer s3cret-tokeX"}
        assert test_client.get("/api/v1/jobs/stats", headers=wrong).status_code == 401
        basic = {"Authorization": "Basic czNjcmV0LXRva2Vu"}
        assert test_client.get("/api/v1/jobs/stats", headers=basic).status_code == 401
        right = {"Authorization": "Bearer s3cret-token"}
        assert test_client.get("/api/v1/jobs/stats", headers=right).status_code == 200
        assert (
            test_client.post(
                "/api/v1/qa/ask", json={"question": "what flour?"}, headers=right
            ).status_code
            == 200
        )


def test_pool_connections_are_read_only(client):
    async def try_write():
        async with client.app.state.database.connection() as conn:
            await conn.execute("INSERT INTO blogqa.settings (key, value) VALUES ('x', 'y')")

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        client.portal.call(try_write)


def test_reader_role_cannot_insert(pipeline):
    with db.connect(pipeline["settings"]) as conn:
        assert conn.execute(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'blogqa_reader'"
        ).fetchone() == (False,)
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL ROLE blogqa_reader")
            assert conn.execute("SELECT count(*) FROM blogqa.documents").fetchone()[0] > 0
            assert conn.execute("SELECT count(*) FROM blogqa.document_qa").fetchone()[0] > 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO blogqa.settings (key, value) VALUES ('x', 'y')")
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL ROLE blogqa_reader")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM blogqa.url_queue")


def test_reader_role_migration_is_idempotent(pipeline):
    (ddl,) = [path.read_text() for version, _, path in db.migration_files() if version == 3]
    with db.connect(pipeline["settings"]) as conn:
        conn.execute(ddl)  # the role exists already: no error
        assert conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'blogqa_reader'"
        ).fetchone() == (1,)


def test_plugin_registers_the_app_under_blogqa(pipeline):
    path = PROJECT_ROOT / "plugins" / "blogqa_plugin.py"
    spec = importlib.util.spec_from_file_location("blogqa_plugin_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (entry,) = module.BlogqaPlugin.fastapi_apps
    assert entry["url_prefix"] == "/blogqa" and entry["name"] == "blogqa results API"
    assert entry["app"] is module.app
    assert "/api/v1/questions/by-url" in entry["app"].app.openapi()["paths"]


def test_plugin_module_imports_nothing_of_the_app():
    """Airflow imports every plugin in every task process (to find listeners): the plugin
    module must not build the app or import its modules there; the api-server builds it on
    the first request (the deployment tests call it through the api-server)."""
    path = PROJECT_ROOT / "plugins" / "blogqa_plugin.py"
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(path)!r})\n"
        "print(sorted(m for m in ('fastapi', 'blogqa.api', 'openai') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


@pytest.fixture
def auth_manager(monkeypatch):
    """Airflow's simple auth manager as the configured one in this process (what
    `airflow api-server` initialises before it mounts the plugin). With a JWT secret as long
    as `blogqa airflow` writes (64 characters): Airflow's own fallback is 22, which PyJWT
    warns is too short for the HS512 tokens it signs."""
    from airflow.api_fastapi.app import create_auth_manager

    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(48))

    return create_auth_manager()


def test_airflow_auth_variant_asks_the_auth_manager(pipeline, monkeypatch, auth_manager):
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    def token(role: str | None, seconds: int = 600) -> str:
        user = SimpleAuthManagerUser(username=f"user-{role}", role=role)
        return auth_manager.generate_jwt(user, expiration_time_in_seconds=seconds)

    monkeypatch.setenv("BLOGQA_API_TOKEN", "ignored-under-airflow")
    app = create_app(pipeline["settings"], airflow_auth=True)
    with TestClient(app) as test_client:
        assert test_client.get("/health").status_code == 200
        anonymous = test_client.get("/api/v1/jobs/stats")
        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.json()["detail"].startswith("Not authenticated")
        bogus = test_client.get("/api/v1/jobs/stats", headers={"Authorization": "Bearer not-a-jwt"})
        assert bogus.status_code == 403 and bogus.json() == {"detail": "Invalid JWT token"}
        # the standalone token means nothing to Airflow
        standalone = {"Authorization": "Bearer ignored-under-airflow"}
        assert test_client.get("/api/v1/jobs/stats", headers=standalone).status_code == 403

        viewer = {"Authorization": f"Bearer {token('viewer')}"}
        assert test_client.get("/api/v1/jobs/stats", headers=viewer).status_code == 200
        assert test_client.get("/metrics", headers=viewer).status_code == 200
        # the UI's session cookie, as the view's iframe sends it
        test_client.cookies.set("_token", token("admin"))
        page = test_client.get("/ui")
        assert page.status_code == 200 and "blogqa pipeline" in page.text
        test_client.cookies.clear()
        # a user the auth manager gives no read access to the DAG
        nobody = test_client.get(
            "/api/v1/documents", headers={"Authorization": f"Bearer {token(None)}"}
        )
        assert nobody.status_code == 403
        assert nobody.json() == {"detail": "read access to the DAG blogqa_pipeline is required"}
        expired = {"Authorization": f"Bearer {token('admin', seconds=-3600)}"}
        assert test_client.get("/api/v1/jobs/stats", headers=expired).status_code == 401
        # the widget is behind Airflow's auth too inside Airflow
        assert (
            test_client.get("/widget/v1/page", params={"url": "https://x.example/"}).status_code
            == 401
        )


def test_airflow_auth_without_an_auth_manager_is_503(pipeline, monkeypatch):
    import airflow.api_fastapi.app as airflow_app

    monkeypatch.setattr(airflow_app._AuthManagerState, "instance", None)
    with TestClient(create_app(pipeline["settings"], airflow_auth=True)) as test_client:
        response = test_client.get("/api/v1/jobs/stats", headers={"Authorization": "Bearer x"})
        assert response.status_code == 503 and "airflow api-server" in response.json()["detail"]


def test_rate_limit_per_client_with_retry_after(pipeline):
    limited = dataclasses.replace(
        pipeline["settings"], api_rate_limit_per_minute=60, api_rate_burst=3
    )
    with TestClient(create_app(limited, api_token="")) as test_client:
        for _ in range(3):
            assert test_client.get("/api/v1/jobs/stats").status_code == 200
        refused = test_client.get("/api/v1/documents")
        assert refused.status_code == 429
        assert refused.json()["detail"].startswith("too many requests")
        assert 1 <= int(refused.headers["retry-after"]) <= 2
        assert test_client.get("/health").status_code == 200  # probes are exempt
    # off when the limit is 0 (the API bench), and never inside Airflow
    unlimited = dataclasses.replace(pipeline["settings"], api_rate_limit_per_minute=0)
    with TestClient(create_app(unlimited, api_token="")) as test_client:
        assert all(test_client.get("/health").status_code == 200 for _ in range(5))
        assert all(test_client.get("/api/v1/jobs/stats").status_code == 200 for _ in range(5))


def test_rate_limiter_refills_over_time():
    from blogqa.api.access import RateLimiter

    now = [0.0]
    limiter = RateLimiter(rate_per_minute=120, burst=2, clock=lambda: now[0])
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(0.5)  # 2 tokens a second
    assert limiter.take("b") == 0  # per client
    now[0] = 0.5
    assert limiter.take("a") == 0
    assert limiter.take("a") > 0


def test_cli_questions_search_ask(pipeline):
    url = pipeline["urls"][0]
    result = run_cli("questions", url, "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["url"] == normalize_url(url) and 3 <= len(body["questions"]) <= 5

    result = run_cli("search", "sourdough starter", "--k", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["results"]) == 2

    result = run_cli("ask", "How often should I feed a sourdough starter?", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sources"]

    result = run_cli("questions", "https://example.com/never")
    assert result.returncode == 1 and "not been enqueued" in result.stderr

    result = run_cli("search", "bread")
    assert result.returncode == 0 and "score" in result.stdout


def test_unreachable_database_is_503_without_details(pipeline, monkeypatch):
    import dataclasses

    from blogqa.api.app import Database

    monkeypatch.setattr(Database, "open_timeout", 1.0)
    down = dataclasses.replace(
        pipeline["settings"], database_url="postgresql://postgres:pw@127.0.0.1:9/blogqa"
    )
    with TestClient(create_app(down, api_token="")) as test_client:
        health = test_client.get("/health")
        assert health.status_code == 503
        assert health.json() == {
            "status": "unavailable",
            "database": False,
            "schema_status": None,
            "schema_version": None,
            "schema_expected_version": None,
            "queue_depth": None,
            "detail": "database unavailable",
        }
        response = test_client.get("/api/v1/jobs/stats")
        assert response.status_code == 503
        assert response.json() == {"detail": "database unavailable"}
        assert "pw" not in response.text


def _other_database(dsn: str, name: str) -> str:
    """The same server and credentials, database `name` (URL or key=value DSN)."""
    if "://" in dsn:
        return urlunsplit(urlsplit(dsn)._replace(path="/" + name))
    return make_conninfo(dsn, dbname=name)


@pytest.fixture
def fresh_database(settings):
    """Settings pointing at a new, empty database on the session's server (no schema, no
    pgvector): what an API deployed before `blogqa init` sees."""
    name = "blogqa_not_initialised"
    admin = _other_database(db.database_dsn(settings), "postgres")
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(drop)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield dataclasses.replace(settings, database_url=_other_database(admin, name))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(drop)


# every kind of route: health aside, reads, a list, a POST that embeds, the POST that writes
SCHEMA_GATED_ROUTES = [
    ("GET", "/api/v1/jobs/stats", None),
    ("GET", "/api/v1/documents", None),
    ("GET", "/api/v1/jobs/1", None),
    ("POST", "/api/v1/search/similar", {"text": "sourdough starter", "k": 3}),
    ("POST", "/api/v1/qa/ask", {"question": "How do I feed a starter?"}),
]


def test_api_before_blogqa_init_is_503_naming_it_until_migrated(fresh_database):
    latest = db.migration_files()[-1][0]
    not_initialised = (
        f"the blogqa schema is not initialised (version 0 of {latest}): run `blogqa init`"
    )
    app = create_app(fresh_database, api_token="")
    database = app.state.database
    database.schema_recheck_seconds = 3600.0  # the verdict holds until the test lowers this
    with TestClient(app) as client:  # raises on any 500
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json() == {
            "status": "unavailable",
            "database": True,
            "schema_status": "missing",
            "schema_version": 0,
            "schema_expected_version": latest,
            "queue_depth": None,
            "detail": not_initialised,
        }
        for method, path, body in SCHEMA_GATED_ROUTES:
            response = client.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.json() == {"detail": not_initialised}, path

        db.migrate(fresh_database)  # what `blogqa init` does
        # within the re-check interval the last verdict stands: no query per request
        assert client.get("/api/v1/jobs/stats").status_code == 503
        database.schema_recheck_seconds = 0.0
        assert client.get("/api/v1/jobs/stats").json()["total"] == 0
        assert client.get("/api/v1/documents").json()["total"] == 0
        # pgvector arrived after the pool's connections were opened: registered on use
        similar = client.post("/api/v1/search/similar", json={"text": "sourdough", "k": 3})
        assert similar.status_code == 200 and similar.json()["results"] == []
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["schema_status"] == "ready"

        # dropped under the running API: ready was remembered, so the query itself fails;
        # UndefinedTable is the same 503, never a 500
        with psycopg.connect(fresh_database.database_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA blogqa CASCADE")
        for method, path, body in SCHEMA_GATED_ROUTES[:2]:
            response = client.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.json() == {"detail": not_initialised}, path

        # migrated, then the newest migration missing: "behind"
        db.migrate(fresh_database)
        with psycopg.connect(fresh_database.database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM blogqa.schema_migrations WHERE version = %s", (latest,))
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["database"] is True and body["schema_status"] == "behind"
        assert body["schema_version"] == latest - 1
        behind = client.get("/api/v1/documents")
        assert behind.status_code == 503
        assert behind.json()["detail"] == body["detail"]
        assert f"version {latest - 1} of {latest}" in body["detail"]
        assert "run `blogqa init`" in body["detail"]


def test_api_checks_credentials_before_the_schema(fresh_database):
    app = create_app(fresh_database, api_token="t0ken")
    with TestClient(app) as client:
        assert client.get("/api/v1/jobs/stats").status_code == 401
        token = {"Authorization": "Bearer t0ken"}
        response = client.get("/api/v1/jobs/stats", headers=token)
        assert response.status_code == 503 and "blogqa init" in response.json()["detail"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _running(command: list[str], env: dict, health_url: str):
    """Start a server process and wait (at most 90 s) until `health_url` answers."""
    import httpx

    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(health_url, timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, f"{command[0]} exited"
                assert time.monotonic() < deadline, f"{command} did not start"
                time.sleep(0.3)
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cli_serve_answers_over_http(pipeline):
    import httpx

    from tests.test_cli import BLOGQA

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["BLOGQA_API_TOKEN"] = "serve-token"
    base = f"http://127.0.0.1:{port}"
    with _running([str(BLOGQA), "serve", "--port", str(port)], env, f"{base}/health"):
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        assert httpx.get(f"{base}/api/v1/jobs/stats").status_code == 401
        stats = httpx.get(
            f"{base}/api/v1/jobs/stats", headers={"Authorization": "Bearer serve-token"}
        )
        assert stats.json()["counts"]["done"] == len(ARTICLES)


def test_plugin_is_served_by_the_airflow_api_server_and_refuses_anonymous(pipeline):
    """The real `airflow api-server` loads plugins/ and serves the app under /blogqa."""
    import httpx

    port = _free_port()
    env = dict(os.environ)  # AIRFLOW_HOME and the metadata database of this test session
    env["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(PROJECT_ROOT / "plugins")
    airflow = str(Path(sys.executable).with_name("airflow"))
    base = f"http://127.0.0.1:{port}"
    command = [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port)]
    with _running(command, env, f"{base}/blogqa/health"):
        health = httpx.get(f"{base}/blogqa/health")
        assert health.status_code == 200 and health.json()["database"] is True
        anonymous = httpx.get(f"{base}/blogqa/api/v1/jobs/stats")
        assert anonymous.status_code == 401
        forged = httpx.get(
            f"{base}/blogqa/api/v1/questions/by-url",
            params={"url": pipeline["urls"][0]},
            headers={"Authorization": "Bearer not-a-jwt"},
        )
        assert forged.status_code in (401, 403)

        # a real user of Airflow's (simple) auth manager: token from POST /auth/token
        passwords = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
        password = json.loads(passwords.read_text())["admin"]
        login = httpx.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30
        )
        assert login.status_code in (200, 201), login.text
        jwt = login.json()["access_token"]
        bearer = {"Authorization": f"Bearer {jwt}"}
        stats = httpx.get(f"{base}/blogqa/api/v1/jobs/stats", headers=bearer, timeout=30)
        assert stats.status_code == 200 and stats.json()["counts"]["done"] == len(ARTICLES)
        page = httpx.get(f"{base}/blogqa/ui", cookies={"_token": jwt}, timeout=30)
        assert page.status_code == 200 and "blogqa pipeline" in page.text
        plugins = httpx.get(f"{base}/api/v2/plugins", headers=bearer, timeout=30).json()
        (ours,) = [p for p in plugins["plugins"] if p["name"] == "blogqa"]
        assert {v["destination"] for v in ours["external_views"]} == {"nav", "dag"}


@pytest.fixture
def own_openai_server(monkeypatch):
    """A private OpenAI-compatible server: the session one's call counters are asserted
    against the ledger by test_dag, so this module does not add calls to them."""
    from tests.conftest import use_openai_server
    from tests.fakes import start_openai_server

    server = start_openai_server()
    use_openai_server(monkeypatch, server)
    yield server
    server.stop()


def test_ask_with_an_openai_compatible_model(pipeline, reader, own_openai_server):
    openai_env = own_openai_server
    settings = load_settings()  # the provider now points at the test server
    with TestClient(create_app(settings, api_token="")) as test_client:
        calls = openai_env.chat_calls
        response = test_client.post("/api/v1/qa/ask", json={"question": "What flour?", "k": 3})
        body = response.json()
        assert response.status_code == 200, body
        assert body["provider"] == "openai" and body["model"] == "test-chat-model"
        assert openai_env.chat_calls == calls + 1
        messages = openai_env.requests[-1]["messages"]
        assert "only the numbered sources" in messages[0]["content"]
        for n, source in enumerate(body["sources"], 1):  # the model sees exactly the sources
            assert f"[{n}] " in messages[1]["content"] and source["text"] in messages[1]["content"]
        ledger = reader.execute(
            "SELECT model, prompt_tokens > 0 FROM blogqa.llm_usage"
            " WHERE stage = 'ask' AND provider = 'openai' ORDER BY id DESC LIMIT 2"
        ).fetchall()
        assert sorted(ledger) == [("test-chat-model", True), ("text-embedding-3-small", True)]

        # one client per event loop, reused: the same object for every request, one HTTP
        # pool shared by the chat and embedding clients
        clients = test_client.app.state.model_clients
        similar = {"text": "sourdough", "k": 2}
        assert test_client.post("/api/v1/search/similar", json=similar).status_code == 200
        assert len(clients) == 1
        (loop_clients,) = clients._by_loop.values()
        assert loop_clients.chat._client is loop_clients.embed._client
        assert test_client.post("/api/v1/search/similar", json=similar).status_code == 200
        assert clients._by_loop[id(loop_clients.loop)] is loop_clients

        openai_env.script.extend(["500", "500", "500"])  # the client retries twice
        failed = test_client.post("/api/v1/qa/ask", json={"question": "What flour?"})
        assert failed.status_code == 502
        assert failed.json() == {"detail": "the model endpoint could not answer"}
    # closed on shutdown (the app's lifespan)
    assert len(clients) == 0 and loop_clients.chat.is_closed()
