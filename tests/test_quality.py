"""The quality gate (blogqa.quality, blogqa.quarantine): bad model output for chosen pages is
quarantined with its reasons and not loaded, the rest loads; a reviewer's release, requeue
and drop do what they say (CLI); Data Docs are built and served.

The stages run as the DAG's tasks call them, with the real openai client against the
OpenAI-compatible test server, whose `page_faults` make the reply for a page misbehave."""

from __future__ import annotations

import json
import re

import pytest

from blogqa import pipeline, quality, queue_stats
from tests.conftest import table_counts
from tests.test_cli import run_cli

# page (by a text of its prompt: the title) -> bad reply -> the reason it is quarantined for
BAD_PAGES = {
    "01-sourdough-starter.html": (
        "Sourdough Starter",
        "off_page_answers",
        "answer not supported by the page",
    ),
    "02-overnight-focaccia.html": (
        "Overnight Focaccia",
        "repeated_questions",
        "question repeated within the document",
    ),
    "03-home-network-vlans.html": (
        "VLANs",
        "refusal_text",
        "refusal or boilerplate in the summary",
    ),
    "04-self-hosting-mini-pc.html": ("Mini PC", "empty_summary", "empty summary"),
    "05-half-marathon-plan.html": (
        "Half Marathon",
        "two_questions",
        "not 3 to 5 question/answer pairs",
    ),
}
GOOD_PAGES = ["06-easy-runs-zone-2.html", "07-raised-bed-soil.html", "11-postgres-index.html"]
RUN_ID = "manual__quality-test"


@pytest.fixture
def model(openai_env, settings):
    for marker, behaviour, _ in BAD_PAGES.values():
        openai_env.page_faults[marker] = behaviour
    return openai_env


def url_of(page_server, name: str) -> str:
    return f"{page_server.base_url}/articles/{name}"


def run_stages(settings, urls: list[str], run_id: str = RUN_ID) -> tuple[list, list[int]]:
    """enqueue, claim, then each per-chunk task as the DAG runs it: (chunks, loaded ids)."""
    from blogqa.config import load_settings

    settings = load_settings()  # with the test server's environment
    pipeline.enqueue_urls(urls, settings)
    chunks = pipeline.claim_chunks(len(urls), len(urls), settings)
    loaded = []
    for map_index, chunk in enumerate(chunks):
        refs = pipeline.crawl_chunk(chunk, settings)
        refs = pipeline.summarize_chunk(refs, settings)
        refs = pipeline.embed_chunk(refs, settings)
        refs = pipeline.validate_chunk(refs, run_id, map_index, settings)
        loaded += pipeline.load_chunk(refs, settings)
    return chunks, loaded


def test_bad_model_output_is_quarantined_with_its_reasons_and_the_rest_loads(
    conn, page_server, model
):
    bad = {url_of(page_server, name): reason for name, (_, _, reason) in BAD_PAGES.items()}
    good = [url_of(page_server, name) for name in GOOD_PAGES]

    chunks, loaded = run_stages(None, [*bad, *good])

    rows = {
        url: (status, reasons, stage, error, run)
        for url, status, reasons, stage, error, run in conn.execute(
            "SELECT url, status, quarantine_reasons, last_stage, last_error, quarantined_run"
            " FROM blogqa.url_queue"
        )
    }
    assert {url for url, row in rows.items() if row[0] == "done"} == set(good)
    assert {url for url, row in rows.items() if row[0] == "quarantined"} == set(bad)
    for url, reason in bad.items():
        _, reasons, stage, error, run = rows[url]
        blocking = [r for r in reasons if r["blocking"]]
        assert reason in {r["reason"] for r in blocking}, (url, reasons)
        assert stage == "quality" and reason in error and run == RUN_ID
        assert all("observed" in r and r["suite"] in quality.CHUNK_SUITES for r in blocking)
    # the observed values a reviewer acts on
    [support] = [
        r
        for r in rows[url_of(page_server, "01-sourdough-starter.html")][1]
        if r["column"] == "answer_support"
    ]
    assert max(support["observed"]) < 0.5 and support["expected"]["min_value"] == 0.5
    [count] = [
        r
        for r in rows[url_of(page_server, "05-half-marathon-plan.html")][1]
        if r["column"] == "questions"
    ]
    assert count["observed"] == [2]

    # nothing of a quarantined document is loaded; its results are kept for a release
    documents = {url for (url,) in conn.execute("SELECT url FROM blogqa.documents")}
    assert documents == set(good)
    assert len(loaded) == len(good)
    kept = conn.execute(
        "SELECT count(*) FROM blogqa.work_items w JOIN blogqa.url_queue q ON q.id = w.queue_id"
        " WHERE q.status = 'quarantined'"
    ).fetchone()[0]
    assert kept == len(bad)

    # every expectation's result is in quality_results, the failing ids with it
    failed = conn.execute(
        "SELECT suite, column_name, failing_ids FROM blogqa.quality_results"
        " WHERE run_id = %s AND NOT success AND blocking",
        (RUN_ID,),
    ).fetchall()
    ids = {url: i for i, url in conn.execute("SELECT id, url FROM blogqa.url_queue")}
    failing = {i for _, _, found in failed for i in found}
    assert failing == {ids[url] for url in bad}
    assert conn.execute(
        "SELECT count(DISTINCT suite) FROM blogqa.quality_validations WHERE run_id = %s",
        (RUN_ID,),
    ).fetchone() == (3,)

    # the run is not red because of quarantine: quarantined is a final status
    tally = pipeline.finalize(chunks)
    assert tally["quarantined"] == len(bad) and tally["done"] == len(good)

    # the table-level validation of what this run loaded passes, and builds the Data Docs
    from blogqa.config import load_settings

    result = pipeline.validate_run_tables(chunks, RUN_ID, load_settings())
    assert result["validated"] == len(bad) + len(good)
    [(success, failing_ids)] = conn.execute(
        "SELECT bool_and(success), array_agg(DISTINCT f) FROM blogqa.quality_results,"
        " unnest(failing_ids || '{0}'::bigint[]) f WHERE run_id = %s AND map_index = -1",
        (RUN_ID,),
    ).fetchall()
    assert success is True and failing_ids == [0]
    index = quality.docs_dir(load_settings()) / "index.html"
    assert index.is_file() and "run_tables" in index.read_text()

    summary = quality.summary(conn, RUN_ID)
    assert summary["quarantined"] == {"quarantined": len(bad)}
    assert any(e["column"] == "answer_support" and e["failed"] for e in summary["expectations"])


def test_the_table_level_validation_fails_its_task_on_broken_tables(conn, page_server, model):
    from blogqa.config import load_settings

    urls = [url_of(page_server, name) for name in GOOD_PAGES[:2]]
    chunks, loaded = run_stages(None, urls, run_id="manual__tables")
    assert len(loaded) == 2
    conn.execute(
        "DELETE FROM blogqa.questions WHERE document_id = (SELECT min(id) FROM blogqa.documents)"
    )
    with pytest.raises(quality.TableValidationError, match="not 3 to 5 questions stored"):
        pipeline.validate_run_tables(chunks, "manual__tables", load_settings())
    [failing] = conn.execute(
        "SELECT failing_ids FROM blogqa.quality_results WHERE run_id = 'manual__tables'"
        " AND map_index = -1 AND column_name = 'questions'"
    ).fetchone()
    assert len(failing) == 1


def test_release_requeue_and_drop_do_what_they_say(conn, page_server, model):
    names = list(BAD_PAGES)[:3]
    urls = [url_of(page_server, name) for name in names]
    run_stages(None, urls)
    ids = {url: i for i, url in conn.execute("SELECT id, url FROM blogqa.url_queue")}
    released, requeued, dropped = urls

    listed = run_cli("quarantine", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {row["id"] for row in json.loads(listed.stdout)} == set(ids.values())
    text = run_cli("quarantine", "list")
    assert "answer not supported by the page" in text.stdout

    result = run_cli("quarantine", "release", str(ids[released]))
    assert result.returncode == 0, result.stderr
    questions = conn.execute(
        "SELECT q.answer FROM blogqa.questions q JOIN blogqa.documents d ON d.id = q.document_id"
        " WHERE d.url = %s",
        (released,),
    ).fetchall()
    assert questions and all(a in quarantine_answers() for (a,) in questions)  # as it was

    result = run_cli("quarantine", "requeue", requeued)  # by URL
    assert result.returncode == 0, result.stderr
    result = run_cli("quarantine", "drop", str(ids[dropped]))
    assert result.returncode == 0, result.stderr

    rows = {
        url: (status, attempts, history[-1]["message"])
        for url, status, attempts, history in conn.execute(
            "SELECT url, status, attempts, error_history FROM blogqa.url_queue"
        )
    }
    assert rows[released][0] == "done" and "released" in rows[released][2]
    assert rows[requeued][:2] == ("queued", 0) and "requeued" in rows[requeued][2]
    assert rows[dropped][0] == "cancelled" and "dropped" in rows[dropped][2]
    assert conn.execute("SELECT count(*) FROM blogqa.work_items").fetchone() == (0,)
    assert {url for (url,) in conn.execute("SELECT url FROM blogqa.documents")} == {released}

    # a row that is not quarantined is refused with the reason
    again = run_cli("quarantine", "drop", str(ids[released]))
    assert again.returncode == 1 and "is done, not quarantined" in again.stderr

    # the requeued page is processed afresh: with the endpoint behaving, it loads
    model.page_faults.clear()
    chunks = pipeline.claim_chunks(10, 10)
    assert [ref["id"] for chunk in chunks for ref in chunk] == [ids[requeued]]
    for stage in (pipeline.crawl_chunk, pipeline.summarize_chunk, pipeline.embed_chunk):
        chunks = [stage(chunks[0])]
    pipeline.load_chunk(pipeline.validate_chunk(chunks[0], "manual__again", 0))
    assert queue_stats.stats(conn)["counts"]["done"] == 2


def quarantine_answers() -> set[str]:
    from tests.fakes import OFF_PAGE_ANSWERS

    return set(OFF_PAGE_ANSWERS)


def test_quality_command_prints_a_summary(conn, page_server, model):
    run_stages(None, [url_of(page_server, "02-overnight-focaccia.html")], run_id="manual__cli")
    result = run_cli("quality", "--run", "manual__cli")
    assert result.returncode == 0, result.stderr
    assert "question repeated within the document" in result.stdout
    assert "manual__cli" in result.stdout
    missing = run_cli("quality", "--run", "manual__nothing")
    assert missing.returncode == 1 and "no quality results" in missing.stderr


def test_support_score_counts_content_words_found_in_the_page():
    page = quality.content_stems("The starter doubled in six hours after two feedings of rye.")
    assert quality.support_score("It doubled in six hours.", page) == 1.0
    assert quality.support_score("Starters double after feeding.", page) == 1.0  # stems
    assert quality.support_score("The Treaty of Westphalia was signed in 1648.", page) == 0.0
    assert quality.support_score("", page) == 0.0


def test_a_broken_suite_fails_the_task_with_the_expectation_named(
    conn, page_server, model, tmp_path, monkeypatch
):
    for name in quality.CHUNK_SUITES:
        (tmp_path / f"{name}.json").write_text(quality.suite_file(name).read_text())
    suite = json.loads((tmp_path / "documents.json").read_text())
    suite["expectations"][0]["kwargs"]["column"] = "txet_words"  # a typo
    (tmp_path / "documents.json").write_text(json.dumps(suite))
    monkeypatch.setenv(quality.EXPECTATIONS_ENV, str(tmp_path))
    with pytest.raises(quality.QualityConfigError, match="txet_words"):
        run_stages(None, [url_of(page_server, GOOD_PAGES[0])], run_id="manual__broken")
    # the document waits in the queue (processing, lease held): nothing loaded, nothing lost
    assert table_counts(conn)["documents"] == 0


def test_data_docs_are_served_by_the_api(conn, page_server, model, settings):
    from fastapi.testclient import TestClient

    from blogqa.api.app import create_app
    from blogqa.config import load_settings

    run_stages(None, [url_of(page_server, "04-self-hosting-mini-pc.html")], run_id="manual__docs")
    index = quality.build_docs(load_settings(), "manual__docs")
    assert index.is_file()
    with TestClient(create_app(load_settings(), api_token="")) as client:
        page = client.get("/quality/")
        assert page.status_code == 200 and "Data Docs" in page.text
        [documents] = list(
            (index.parent / "validations" / "documents" / "manual__docs").rglob("*.html")
        )
        shown = client.get(f"/quality/{documents.relative_to(index.parent).as_posix()}")
        assert shown.status_code == 200 and "Expectation Validation Result" in shown.text
        words = " ".join(re.sub(r"<[^>]+>", " ", shown.text).split())
        assert "Expectation Suite: documents" in words and "Status: Failed" in words
        assert "summary" in words  # the failed expectation's column
        assert client.get("/quality/../../../etc/passwd").status_code == 404


def test_a_runs_data_docs_render_only_its_own_pages(conn, page_server, model, settings):
    from blogqa.config import load_settings

    def pages(index, run_id: str) -> list:
        return list((index.parent / "validations" / "documents" / run_id).rglob("*.html"))

    run_stages(None, [url_of(page_server, GOOD_PAGES[0])], run_id="manual__docs-1")
    [first] = pages(quality.build_docs(load_settings(), "manual__docs-1"), "manual__docs-1")
    rendered = first.stat().st_mtime_ns

    run_stages(None, [url_of(page_server, GOOD_PAGES[1])], run_id="manual__docs-2")
    index = quality.build_docs(load_settings(), "manual__docs-2")
    assert pages(index, "manual__docs-2")
    assert first.stat().st_mtime_ns == rendered  # the earlier run's page was not rendered again
    listed = index.read_text()
    assert "manual__docs-1" in listed and "manual__docs-2" in listed  # the index lists both

    quality.build_docs(load_settings())  # `blogqa quality --docs`: every result again
    assert first.stat().st_mtime_ns > rendered


def test_the_data_docs_keep_the_latest_runs(conn, page_server, model, settings, monkeypatch):
    """BLOGQA_QUALITY_DOCS_RUNS bounds the site (GX's index reads every result it keeps, so
    an unbounded site slowed the end of every run): an older run's stored results and pages
    go, its rows in PostgreSQL stay, and a run asked for by name is rendered all the same."""
    from blogqa.config import load_settings

    monkeypatch.setenv("BLOGQA_QUALITY_DOCS_RUNS", "2")
    runs = [f"manual__keep-{n}" for n in range(3)]

    def stored(run_id: str) -> list:
        return list(quality.results_dir(load_settings()).rglob(f"{run_id}/**/*.json"))

    def pages(index, run_id: str) -> list:
        return list((index.parent / "validations").rglob(f"{run_id}/**/*.html"))

    for n, run_id in enumerate(runs):
        url = url_of(page_server, GOOD_PAGES[n]) + f"?keep={n}"
        run_stages(None, [url], run_id=run_id)
        index = quality.build_docs(load_settings(), run_id)
        assert pages(index, run_id) and stored(run_id)

    oldest, *latest = runs
    assert not stored(oldest) and not pages(index, oldest)
    for tree in (quality.results_dir(load_settings()), index.parent):
        assert not list(tree.rglob(oldest))  # nor its folders
    assert all(stored(run) and pages(index, run) for run in latest)
    listed = index.read_text()
    assert oldest not in listed and all(run in listed for run in latest)
    kept_in_sql = conn.execute(
        "SELECT count(*) FROM blogqa.quality_validations WHERE run_id = %s", (oldest,)
    ).fetchone()[0]
    assert kept_in_sql == len(quality.CHUNK_SUITES)

    quality.build_docs(load_settings())  # `blogqa quality --docs`: the latest runs again
    assert not stored(oldest) and all(stored(run) and pages(index, run) for run in latest)

    quality.build_docs(load_settings(), oldest)  # asked for by name: rendered, kept
    assert stored(oldest) and pages(index, oldest) and oldest in index.read_text()
