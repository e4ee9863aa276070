"""The operators' view (GET /ui) in headless Chromium: a screenshot, and the figures on the page
checked against the database; the plugin's external_views as Airflow reads them."""

from __future__ import annotations

import importlib.util
from decimal import Decimal

import psycopg
import pytest
from fastapi.testclient import TestClient

from blogqa import db, queue
from blogqa.api import create_app
from blogqa.config import load_settings
from tests.browser import chromium, process, serve_app
from tests.conftest import PROJECT_ROOT

ARTICLES = ["01-sourdough-starter.html", "06-easy-runs-zone-2.html", "08-tomato-variety-trial.html"]


@pytest.fixture(scope="module")
def data(page_server):
    """Three articles done and one dead URL through the DAG, one URL still queued, and one
    priced model call in the ledger (the offline provider's calls have no price)."""
    settings = load_settings()
    base = page_server.base_url
    urls = [f"{base}/articles/{name}" for name in ARTICLES]
    process(settings, [*urls, f"{base}/gone"])
    with db.connect(settings) as conn:
        queue.enqueue(conn, [f"{base}/articles/not-yet-crawled.html"])
        conn.execute(
            "INSERT INTO blogqa.llm_usage (stage, provider, model, prompt_tokens,"
            " completion_tokens, latency_ms, cost_usd)"
            " VALUES ('summarize', 'openai', 'gpt-4o-mini', 1200, 300, 40, 0.00036)"
        )
    return {"settings": settings, "dead": f"{base}/gone"}


@pytest.fixture(scope="module")
def reader(data):
    with db.connect(data["settings"]) as conn:
        yield conn


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def _usd(value) -> str:
    return "–" if value is None else f"{float(value):.6f}"


def check_figures(page, conn: psycopg.Connection) -> None:
    """Every figure the page shows equals what the database says."""
    counts = dict(conn.execute("SELECT status, count(*) FROM blogqa.url_queue GROUP BY 1"))
    for status in queue.STATUSES:
        assert _text(page, f"[data-figure=queue-{status}]") == str(counts.get(status, 0)), status
    assert _text(page, "[data-figure=queue-total]") == str(sum(counts.values()))
    assert counts["queued"] == 1 and counts["dead"] == 1 and counts["done"] == len(ARTICLES)
    assert _text(page, "[data-figure=oldest-queued]").endswith("s")

    runs = conn.execute("SELECT run_id, done, dead FROM blogqa.recent_runs").fetchall()
    assert runs, "the DAG run recorded its run id on the rows it claimed"
    for run_id, done, dead in runs:
        row = page.locator(f"tr[data-run='{run_id}']")
        assert row.locator("[data-figure=run-done]").inner_text() == str(done)
        assert row.locator("[data-figure=run-dead]").inner_text() == str(dead)
    chart = page.locator("svg[data-figure=runs-chart]")
    assert chart.locator("g[data-run]").count() == len(runs)
    assert sum(done for _, done, _ in runs) == len(ARTICLES)

    dead = conn.execute("SELECT url, reason, stage FROM blogqa.dead_letters").fetchall()
    assert _text(page, "[data-figure=dead-total]") == str(len(dead)) == "1"
    for url, reason, stage in dead:
        cells = page.locator(f"tr[data-dead-url='{url}'] td").all_inner_texts()
        assert cells[0] == url and cells[2] == stage and cells[5] == reason
        assert "404" in reason

    cost = conn.execute(
        "SELECT day, model, requests, prompt_tokens, completion_tokens, cost_usd"
        " FROM blogqa.cost_per_day"
    ).fetchall()
    assert {c[1] for c in cost} >= {"gpt-4o-mini", "local-extractive-v1", "local-hash-v1"}
    for day, model, requests, prompt, completion, usd in cost:
        row = page.locator(f"tr[data-cost-day='{day}'][data-cost-model='{model}']")
        assert row.locator("[data-figure=requests]").inner_text() == str(requests)
        assert row.locator("[data-figure=prompt-tokens]").inner_text() == str(prompt)
        assert row.locator("[data-figure=completion-tokens]").inner_text() == str(completion)
        assert row.locator("[data-figure=cost]").inner_text() == _usd(usd)
    priced = [c for c in cost if c[1] == "gpt-4o-mini"]
    assert priced[0][5] == Decimal("0.000360")


def test_view_in_chromium_matches_the_database(data, reader, tmp_path):
    app = create_app(data["settings"], api_token="")
    with serve_app(app) as base, chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        response = page.goto(f"{base}/ui")
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/html")
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        assert page.title() == "blogqa: pipeline operations"
        check_figures(page, reader)

        # the tab on another DAG says what the view is about
        page.goto(f"{base}/ui?dag_id=some_other_dag")
        assert "some_other_dag" in _text(page, "[data-figure=other-dag]")
        page.goto(f"{base}/ui?dag_id=blogqa_pipeline")
        assert page.locator("[data-figure=other-dag]").count() == 0
        # the page itself, nothing else: no script, no font, no image from anywhere
        assert set(requested) == {
            f"{base}/ui",
            f"{base}/ui?dag_id=some_other_dag",
            f"{base}/ui?dag_id=blogqa_pipeline",
        }


def test_quality_results_shown_when_the_table_exists(data, reader):
    """Without blogqa.quality_results the view says so; with it, its newest rows appear."""
    present = reader.execute("SELECT to_regclass('blogqa.quality_results')").fetchone()[0]
    with TestClient(create_app(data["settings"], api_token="")) as client:
        if present is None:
            assert "no <code>blogqa.quality_results</code> table" in client.get("/ui").text
            with reader.transaction():
                reader.execute(
                    "CREATE TABLE blogqa.quality_results (id int, checked_at timestamptz,"
                    " expectation text, passed boolean)"
                )
                reader.execute(
                    "INSERT INTO blogqa.quality_results VALUES"
                    " (1, now() - interval '1 hour', 'min_words', true),"
                    " (2, now(), 'has_questions', false)"
                )
            try:
                html = client.get("/ui").text
            finally:
                reader.execute("DROP TABLE blogqa.quality_results")
            assert 'data-figure="quality"' in html
            assert html.index("has_questions") < html.index("min_words")  # newest first
        else:
            rows = reader.execute("SELECT count(*) FROM blogqa.quality_results").fetchone()[0]
            html = client.get("/ui").text
            marker = 'data-figure="quality"' if rows else 'data-figure="quality-empty"'
            assert marker in html


def test_view_requires_the_api_token_when_set(data):
    with TestClient(create_app(data["settings"], api_token="t0ken")) as client:
        assert client.get("/ui").status_code == 401
        ok = client.get("/ui", headers={"Authorization": "Bearer t0ken"})
        assert ok.status_code == 200 and "blogqa pipeline" in ok.text


def test_plugin_external_views_are_valid_for_airflow():
    """The nav entry and the DAG tab, validated with the model Airflow's /api/v2/plugins
    serialises them with, pointing at the plugin app's /ui."""
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse

    path = PROJECT_ROOT / "plugins" / "blogqa_plugin.py"
    spec = importlib.util.spec_from_file_location("blogqa_plugin_views", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    views = [ExternalViewResponse.model_validate(v) for v in module.BlogqaPlugin.external_views]
    assert {v.destination for v in views} == {"nav", "dag"}
    (prefix,) = [a["url_prefix"] for a in module.BlogqaPlugin.fastapi_apps]
    for view in views:
        assert view.href.startswith(f"{prefix}/ui") and view.url_route
    (tab,) = [v for v in views if v.destination == "dag"]
    assert tab.href.endswith("?dag_id={DAG_ID}")
    assert len({v.url_route for v in views}) == 2
