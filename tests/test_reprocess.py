"""Reprocessing by cause (issue 14, item 2): a changed embedding model re-embeds only, a
changed prompt or chat model re-summarizes from the stored text without fetching, `all`
refetches unconditionally and redoes every stage; the question rows say which model and
prompt made them.

The stages run directly (crawl -> summarize -> embed -> load) with the real `openai` client
against the test server, which counts chat and embedding calls; the page server counts hits.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from blogqa import cli, pipeline, reprocess
from blogqa.config import load_settings
from blogqa.llm import PROMPT_VERSION
from tests.fakes import ARTICLE_FILES

NEW_EMBED_MODEL = "text-embedding-3-large"


def run_stages(settings) -> list[int]:
    """Claim everything due and run the four stages on it; the queue ids loaded."""
    loaded = []
    for chunk in pipeline.claim_chunks(100, 100, settings):
        refs = pipeline.crawl_chunk(chunk, settings)
        refs = pipeline.summarize_chunk(refs, settings)
        refs = pipeline.embed_chunk(refs, settings)
        loaded += pipeline.load_chunk(refs, settings)
    return loaded


@pytest.fixture
def stored(conn, openai_env, page_server):
    """Two articles processed once; returns (settings, urls)."""
    settings = load_settings()
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES[:2]]
    pipeline.enqueue_urls(urls, settings)
    assert len(run_stages(settings)) == 2
    return settings, urls


def counters(openai_server, page_server, urls) -> dict:
    paths = [url.removeprefix(page_server.base_url) for url in urls]
    return {
        "chat": openai_server.chat_calls,
        "embed": openai_server.embedding_calls,
        "hits": sum(page_server.hits.get(p, 0) for p in paths),
        "not_modified": page_server.not_modified,
    }


def delta(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in before}


def summaries(conn) -> dict[str, tuple]:
    rows = conn.execute(
        "SELECT d.url, s.summary, s.model, s.prompt_version, s.embed_model, s.created_at"
        " FROM blogqa.documents d JOIN blogqa.summaries s ON s.document_id = d.id"
    )
    return {row[0]: row[1:] for row in rows}


def requeue(conn, settings, cause: str, **kwargs) -> reprocess.RequeueResult:
    return reprocess.requeue(
        conn,
        cause,
        chat_model=settings.chat_model,
        prompt_version=PROMPT_VERSION,
        embed_model=settings.embed_model,
        **kwargs,
    )


def test_question_rows_carry_model_and_prompt(stored, conn) -> None:
    settings, _ = stored
    rows = conn.execute("SELECT DISTINCT model, prompt_version FROM blogqa.questions").fetchall()
    assert rows == [(settings.chat_model, PROMPT_VERSION)]


def test_new_embedding_model_reembeds_without_fetch_or_chat(
    stored, conn, openai_server, page_server
) -> None:
    settings, urls = stored
    before_rows = summaries(conn)
    questions_before = conn.execute(
        "SELECT document_id, position, question, answer FROM blogqa.questions ORDER BY 1, 2"
    ).fetchall()
    changed = dataclasses.replace(settings, embed_model=NEW_EMBED_MODEL)

    result = requeue(conn, changed, "embeddings")
    assert (len(result.requeued), len(result.flagged)) == (2, 0)
    flags = conn.execute("SELECT status, redo FROM blogqa.url_queue ORDER BY id").fetchall()
    assert flags == [("queued", "embeddings")] * 2

    before = counters(openai_server, page_server, urls)
    assert len(run_stages(changed)) == 2
    spent = delta(before, counters(openai_server, page_server, urls))
    assert spent["chat"] == 0  # no summarize call
    assert spent["hits"] == 0  # the stored text was fresh: no fetch at all
    assert spent["embed"] >= 1

    after_rows = summaries(conn)
    for url in urls:
        old, new = before_rows[url], after_rows[url]
        assert new[:3] == old[:3]  # the same summary, chat model and prompt version
        assert (old[3], new[3]) == (settings.embed_model, NEW_EMBED_MODEL)
    questions_after = conn.execute(
        "SELECT document_id, position, question, answer FROM blogqa.questions ORDER BY 1, 2"
    ).fetchall()
    assert questions_after == questions_before
    assert (
        conn.execute("SELECT count(*) FROM blogqa.url_queue WHERE redo IS NOT NULL").fetchone()[0]
        == 0
    )

    # idempotent: every document is current now, a second request finds nothing
    again = requeue(conn, changed, "embeddings")
    assert (again.requeued, again.flagged) == ([], [])


def test_prompt_change_resummarizes_from_stored_text(
    stored, conn, openai_server, page_server
) -> None:
    settings, urls = stored
    # nothing is stale under the current prompt; --force takes every document of the window
    assert requeue(conn, settings, "summaries").requeued == []
    assert len(requeue(conn, settings, "summaries", force=True).requeued) == 2

    before = counters(openai_server, page_server, urls)
    assert len(run_stages(settings)) == 2
    spent = delta(before, counters(openai_server, page_server, urls))
    assert spent["chat"] == 2  # one summarize call per document
    assert spent["hits"] == 0  # from the stored text
    assert spent["embed"] >= 1


def test_stale_copy_is_refetched_conditionally(stored, conn, openai_server, page_server) -> None:
    """A summaries reprocess of a copy older than BLOGQA_REPROCESS_FRESH_DAYS fetches first
    (a conditional GET: the page is unchanged, so it is a 304)."""
    settings, urls = stored
    conn.execute("UPDATE blogqa.documents SET fetched_at = now() - interval '90 days'")
    requeue(conn, settings, "summaries", force=True)
    before = counters(openai_server, page_server, urls)
    assert len(run_stages(settings)) == 2
    spent = delta(before, counters(openai_server, page_server, urls))
    assert spent["hits"] == 2 and spent["not_modified"] == 2
    assert spent["chat"] == 2


def test_all_refetches_unconditionally_and_redoes_everything(
    stored, conn, openai_server, page_server
) -> None:
    settings, urls = stored
    assert len(requeue(conn, settings, "all").requeued) == 2
    before = counters(openai_server, page_server, urls)
    assert len(run_stages(settings)) == 2
    spent = delta(before, counters(openai_server, page_server, urls))
    assert spent["hits"] == 2 and spent["not_modified"] == 0  # no validators sent
    assert spent["chat"] == 2 and spent["embed"] >= 1


def test_refresh_after_embedding_model_change_only_reembeds(
    stored, conn, openai_server, page_server
) -> None:
    """The usual refresh (no reprocess flag) applies the same rules after its conditional
    GET: an unchanged page whose embedding model changed costs no chat call."""
    settings, urls = stored
    changed = dataclasses.replace(settings, embed_model=NEW_EMBED_MODEL)
    pipeline.enqueue_urls(urls, changed, force=True)
    before = counters(openai_server, page_server, urls)
    assert len(run_stages(changed)) == 2
    spent = delta(before, counters(openai_server, page_server, urls))
    assert spent["not_modified"] == 2 and spent["chat"] == 0 and spent["embed"] >= 1
    assert {row[3] for row in summaries(conn).values()} == {NEW_EMBED_MODEL}


def test_window_selects_documents_by_first_fetch(stored, conn) -> None:
    settings, urls = stored
    conn.execute(
        "UPDATE blogqa.documents SET created_at = %s WHERE url = %s",
        (dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC), urls[0]),
    )
    window = {
        "since": dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
        "until": dt.datetime(2026, 3, 2, tzinfo=dt.UTC),
    }
    dry = requeue(conn, settings, "all", dry_run=True, **window)
    assert dry.requeued == [urls[0]]
    assert (
        conn.execute("SELECT count(*) FROM blogqa.url_queue WHERE redo IS NOT NULL").fetchone()[0]
        == 0
    )
    assert requeue(conn, settings, "all", **window).requeued == [urls[0]]
    # a second call finds the row already queued with that flag: nothing more to do
    again = requeue(conn, settings, "all", **window)
    assert (again.requeued, again.flagged) == ([], [])
    with pytest.raises(ValueError, match="timezone-aware"):
        requeue(conn, settings, "all", since=dt.datetime(2026, 3, 1))


def test_cli_reprocess(stored, conn, capsys) -> None:
    code = cli.main(["reprocess", "--cause", "all", "--since", "2000-01-01", "--dry-run", "--json"])
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {
        "cause": "all",
        "requeued": 2,
        "flagged": 0,
        "in_progress": 0,
        "dry_run": True,
    }
    assert cli.main(["reprocess", "--cause", "embeddings", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requeued"] == 0  # nothing stale
    assert cli.main(["reprocess", "--cause", "all", "--until", "2000-01-01"]) == 0
    assert "0 requeued" in capsys.readouterr().out


def test_reprocess_window_for_a_run_interval(stored, conn) -> None:
    """What the DAG's `reprocess` param would run: the documents first fetched in the run's
    data interval, twice without doing more."""
    settings, _ = stored
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    end = start + dt.timedelta(hours=2)
    assert reprocess.reprocess_window("none", start, end, settings) == {"cause": "none"}
    assert reprocess.reprocess_window("all", start, end, settings)["requeued"] == 2
    assert reprocess.reprocess_window("all", start, end, settings)["requeued"] == 0
    earlier = reprocess.reprocess_window("all", start - dt.timedelta(days=2), start, settings)
    assert earlier["requeued"] == 0
    with pytest.raises(ValueError, match="unknown reprocess value"):
        reprocess.reprocess_window("everything", start, end, settings)
