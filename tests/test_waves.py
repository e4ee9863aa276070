"""Waves (BLOGQA_ENRICH_WAVES): the enrich task loads the documents whose summaries are saved
while the chunk's other summaries are still being made.

The first tests drive `waves.run` with real threads and plain functions; the others run the
enrich task's code with the real `openai` client against the test server of tests/fakes.py
and the real database, and watch the output tables fill while chat calls are still arriving.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from blogqa import pipeline, waves
from blogqa.config import load_settings
from tests.fakes import ARTICLE_FILES
from tests.test_backpressure import claim_and_crawl

# ---------------------------------------------------------------- waves.run, on its own


def _refs(n: int) -> list[dict]:
    return [{"id": i, "token": f"t{i}"} for i in range(1, n + 1)]


def _paced(delay: float, errors_after: int | None = None):
    """A summarize that reports one saved ref every `delay` seconds (the first two at once,
    as refs that need no call), then returns them all or raises after `errors_after`."""

    def summarize(refs, on_saved):
        on_saved([ref["id"] for ref in refs[:2]])
        for index, ref in enumerate(refs[2:], start=2):
            if errors_after is not None and index == errors_after:
                raise RuntimeError("summarize broke")
            time.sleep(delay)
            on_saved([ref["id"]])
        return refs

    return summarize


def test_waves_take_at_least_the_minimum_and_finish_every_ref_once():
    finished: list[list[int]] = []

    def finish(wave):
        time.sleep(0.05)  # summaries arrive meanwhile: the next wave takes them all
        finished.append([ref["id"] for ref in wave])
        return len(wave)

    results = waves.run(_refs(11), _paced(0.01), finish, min_wave=3)

    assert results == [len(wave) for wave in finished]
    assert sorted(i for wave in finished for i in wave) == list(range(1, 12))
    assert all(len(wave) >= 3 for wave in finished[:-1])
    assert len(finished) >= 2  # the first wave went on before the last summary was saved


def test_refs_passed_on_without_a_saved_summary_are_the_last_wave():
    finished = []

    def summarize(refs, on_saved):
        on_saved([refs[0]["id"]])
        return refs  # e.g. the circuit breaker passed the others on untouched

    waves.run(_refs(4), summarize, lambda wave: finished.append([r["id"] for r in wave]), 8)

    assert finished == [[1], [2, 3, 4]]


def test_a_failing_summarize_still_finishes_what_it_saved_then_raises():
    finished = []

    with pytest.raises(RuntimeError, match="summarize broke"):
        waves.run(
            _refs(8),
            _paced(0.01, errors_after=5),
            lambda wave: finished.extend(r["id"] for r in wave),
            min_wave=2,
        )

    assert sorted(finished) == [1, 2, 3, 4, 5]


def test_a_failing_wave_is_raised_after_the_summaries_were_all_saved():
    saved = []

    def summarize(refs, on_saved):
        for ref in refs:
            time.sleep(0.02)
            saved.append(ref["id"])
            on_saved([ref["id"]])
        return refs

    def finish(wave):
        raise ValueError("load broke")

    with pytest.raises(ValueError, match="load broke"):
        waves.run(_refs(5), summarize, finish, min_wave=1)

    assert saved == [1, 2, 3, 4, 5]  # paid work is not abandoned half-way


# ---------------------------------------------------------------- the enrich task


def _documents(conn) -> int:
    return conn.execute("SELECT count(*) FROM blogqa.documents").fetchone()[0]


def _enrich_watching(conn, settings, openai_server, refs):
    """Run the enrich task's code in a thread; return its result and the chat calls the
    server had answered when the first document appeared in blogqa.documents."""
    outcome = {}

    def enrich():
        outcome["result"] = pipeline.enrich_chunk(refs, "manual__waves", 0, settings)

    before = openai_server.chat_calls
    worker = threading.Thread(target=enrich)
    worker.start()
    calls_at_first_document = None
    while calls_at_first_document is None:
        running = worker.is_alive()  # before looking: a load at the very end is seen too
        if _documents(conn):
            calls_at_first_document = openai_server.chat_calls - before
        elif not running:
            break
        time.sleep(0.02)
    worker.join()
    return outcome["result"], calls_at_first_document, openai_server.chat_calls - before


@pytest.fixture
def paced_model(openai_env):
    """Chat calls taking 0.4 s each (one at a time, in the tests: the order of the summaries
    is the order of the pages), so a load beside them has time to show; Great Expectations
    imported first, as deployments preload it, so the first wave does not wait for it."""
    from blogqa import quality

    quality.gx()
    openai_env.latency = 0.4
    return openai_env


@pytest.mark.parametrize("waves_per_chunk", [4, 1])
def test_documents_are_loaded_while_the_chunk_is_still_being_summarized(
    conn, page_server, paced_model, monkeypatch, waves_per_chunk
):
    monkeypatch.setenv("BLOGQA_ENRICH_WAVES", str(waves_per_chunk))
    settings = dataclasses.replace(load_settings(), llm_concurrency=1, llm_max_retries=0)
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES[:8]]
    refs = claim_and_crawl(conn, settings, urls)
    assert len(refs) == 8

    result, calls_at_first, calls = _enrich_watching(conn, settings, paced_model, refs)

    assert calls == 8  # one chat call per document, waves or not
    assert sorted(result["loaded"]) == sorted(ref["id"] for ref in refs)
    assert result["tables"]["documents"] == {"rows": 8, "documents": 8, "unchanged": 0}
    assert (
        result["tables"]["questions"]["rows"]
        == conn.execute("SELECT count(*) FROM blogqa.questions").fetchone()[0]
    )
    assert conn.execute("SELECT DISTINCT status FROM blogqa.url_queue").fetchall() == [("done",)]
    validations = conn.execute(
        "SELECT count(*), count(DISTINCT suite) FROM blogqa.quality_validations"
        " WHERE run_id = 'manual__waves' AND map_index = 0"
    ).fetchone()
    if waves_per_chunk > 1:
        assert calls_at_first is not None and calls_at_first < 8
        # every wave's validations are kept, not only the last one's
        assert validations[0] > validations[1]
    else:
        assert calls_at_first == 8  # the whole chunk was summarized first
        assert validations[0] == validations[1]


def test_a_retry_after_a_failing_summarize_loads_the_rest_and_pays_only_for_it(
    conn, page_server, openai_env, monkeypatch
):
    monkeypatch.setenv("BLOGQA_ENRICH_WAVES", "5")  # waves of one document
    settings = dataclasses.replace(load_settings(), llm_concurrency=1, llm_max_retries=0)
    urls = [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES[:5]]
    refs = claim_and_crawl(conn, settings, urls)
    openai_env.script.extend(["ok", "ok", "garbage"])  # a 200 that is not JSON: the task fails
    before = openai_env.chat_calls

    with pytest.raises(json.JSONDecodeError):
        pipeline.enrich_chunk(refs, "manual__waves", 0, settings)

    assert _documents(conn) == 2  # the two summaries saved before the failure were loaded
    result = pipeline.enrich_chunk(refs, "manual__waves", 0, settings)  # Airflow's retry
    assert len(result["loaded"]) == 3
    assert _documents(conn) == 5
    assert openai_env.chat_calls - before == 3 + 3  # the retry called for the three left
