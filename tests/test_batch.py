"""The OpenAI Batch API mode of the summarize stage (blogqa.batch, blogqa.batch_trigger).

The real `openai` client against the test server's Files and Batches endpoints
(tests/fake_batches.py), whose batches answer each line through the server's own chat
route, so `script` makes chosen lines fail and every line counts as a chat call.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import pytest

from blogqa import batch
from blogqa.batch import BatchEndedError, BatchError, BatchPage
from blogqa.config import load_settings
from blogqa.errors import ConfigError, PageError
from blogqa.extract import extract_article
from blogqa.llm import LLMConfigurationError, OpenAIChat, QAResult, openai_client
from blogqa.store import usage_row
from tests.fake_batches import reset_batch_state
from tests.fakes import ARTICLE_FILES

ARTICLES = Path(__file__).resolve().parents[1] / "include" / "blogqa" / "demo" / "articles"
FILES = ["01-sourdough-starter.html", "06-easy-runs-zone-2.html", "03-home-network-vlans.html"]
PRICED_MODEL = "gpt-4o-mini"  # the test server echoes the model; this one has a price


@pytest.fixture(scope="module")
def pages() -> list[BatchPage]:
    found = []
    for i, name in enumerate(FILES):
        article = extract_article((ARTICLES / name).read_text("utf-8"))
        found.append(
            BatchPage(100 + i, f"https://blog.example.com/{i}", article.title, article.text)
        )
    return found


@pytest.fixture
def batch_env(openai_env, monkeypatch):
    """The test server with batches that pass validating and in_progress once each."""
    reset_batch_state(openai_env)
    monkeypatch.setenv("BLOGQA_CHAT_MODEL", PRICED_MODEL)
    monkeypatch.setenv("BLOGQA_LLM_MODE", "batch")
    monkeypatch.setenv("BLOGQA_BATCH_POLL_SECONDS", "0.02")
    return openai_env


def _sync_summary(page: BatchPage) -> QAResult:
    """The sync provider's reply; its own client, without the limits shared through the
    database (they do not change what is sent)."""

    async def run() -> QAResult:
        settings = load_settings()
        provider = OpenAIChat(settings, client=openai_client(settings))
        try:
            return await provider.summarize(url=page.url, title=page.title, text=page.text)
        finally:
            await provider.aclose()

    return asyncio.run(run())


def _trigger(*args, **kwargs):
    """The trigger class, imported when a test runs: it imports Airflow's core, which must not
    be configured before conftest's session fixture points it at the test database."""
    from blogqa.batch_trigger import BatchTrigger

    return BatchTrigger(*args, **kwargs)


def _events(trigger) -> list:
    async def run() -> list:
        return [event async for event in trigger.run()]

    return asyncio.run(run())


def _wait(batch_id: str) -> str:
    """Drive the trigger the task would defer to; the status it reports."""
    [event] = _events(_trigger(batch_id, load_settings().batch_poll_seconds))
    assert event.payload["batch_id"] == batch_id
    return event.payload["status"]


# ---------------------------------------------------------------- settings


def test_llm_mode_setting(openai_env, monkeypatch) -> None:
    monkeypatch.delenv("BLOGQA_LLM_MODE", raising=False)
    assert load_settings().llm_mode == "sync"
    monkeypatch.setenv("BLOGQA_LLM_MODE", "Batch")
    assert load_settings().llm_mode == "batch"
    monkeypatch.setenv("BLOGQA_LLM_MODE", "nightly")
    with pytest.raises(ConfigError, match="BLOGQA_LLM_MODE='nightly'"):
        load_settings()
    monkeypatch.setenv("BLOGQA_LLM_MODE", "batch")
    monkeypatch.setenv("BLOGQA_LLM_PROVIDER", "local")
    with pytest.raises(ConfigError, match="needs the OpenAI provider"):
        load_settings()


# ---------------------------------------------------------------- building lines


def test_a_line_is_the_request_the_sync_provider_sends(batch_env, pages) -> None:
    page = pages[0]
    _sync_summary(page)
    sent = batch_env.requests[-1]

    line = batch.batch_line(page, load_settings())
    assert line["body"] == sent
    assert line["custom_id"] == "100" and line["url"] == "/v1/chat/completions"
    assert sent["model"] == PRICED_MODEL and sent["response_format"]["type"] == "json_schema"

    jsonl = batch.batch_jsonl(pages, load_settings()).decode().splitlines()
    assert [json.loads(raw)["custom_id"] for raw in jsonl] == ["100", "101", "102"]


def test_duplicate_queue_ids_are_refused(batch_env, pages) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        batch.batch_jsonl([pages[0], pages[0]], load_settings())


# ---------------------------------------------------------------- submit, wait, collect


def test_submit_wait_collect_gives_one_result_per_page(batch_env, pages) -> None:
    settings = load_settings()
    calls_before = batch_env.chat_calls
    batch_id = batch.submit_pages(pages, settings)
    assert batch_env.chat_calls == calls_before  # nothing answered before the batch runs

    assert _wait(batch_id) == "completed"
    assert batch_env.batch_retrievals >= 3  # validating, in_progress, completed: real waiting
    assert batch_env.chat_calls - calls_before == len(pages)

    outcomes = batch.collect_pages(batch_id, pages, settings)
    assert sorted(outcomes) == [page.queue_id for page in pages]
    for page in pages:
        result = outcomes[page.queue_id]
        assert isinstance(result, QAResult)
        assert 3 <= len(result.qa) <= 5 and result.summary
        assert all(answer in page.text for _, answer in result.qa)
        [call] = result.calls
        assert call.provider == "openai-batch" and call.prompt_tokens > 0

    sync = _sync_summary(pages[1])
    assert outcomes[pages[1].queue_id].as_json() == sync.as_json()  # same rows either way


@pytest.mark.parametrize(
    ("behaviour", "permanent", "message"),
    [
        ("500", False, "upstream failure"),
        ("400", True, "context length exceeded"),
        ("429", False, "slow down"),
        ("refusal", True, "model refused"),
        ("invalid", False, "invalid model output"),
    ],
)
def test_one_bad_line_fails_its_page_only(batch_env, pages, behaviour, permanent, message):
    batch_env.script[:] = ["ok", behaviour, "ok"]
    settings = load_settings()
    batch_id = batch.submit_pages(pages, settings)
    assert _wait(batch_id) == "completed"

    outcomes = batch.collect_pages(batch_id, pages, settings)
    good = [outcomes[pages[0].queue_id], outcomes[pages[2].queue_id]]
    assert all(isinstance(outcome, QAResult) for outcome in good)
    error = outcomes[pages[1].queue_id]
    assert isinstance(error, PageError)
    assert error.stage == "summarize" and error.permanent is permanent
    assert message in str(error)
    billed = behaviour in ("refusal", "invalid")  # a reply came back: its tokens were billed
    assert len(getattr(error, "calls", [])) == (1 if billed else 0)


def test_a_page_without_a_result_line_gets_a_transient_error(batch_env, pages) -> None:
    settings = load_settings()
    batch_id = batch.submit_pages(pages[:2], settings)
    assert _wait(batch_id) == "completed"

    outcomes = batch.collect_pages(batch_id, pages, settings)
    missing = outcomes[pages[2].queue_id]
    assert isinstance(missing, PageError) and not missing.permanent
    assert "no result" in str(missing)
    assert isinstance(outcomes[pages[0].queue_id], QAResult)


@pytest.mark.parametrize("outcome", ["failed", "expired"])
def test_a_batch_that_ended_without_results_raises(batch_env, pages, outcome) -> None:
    batch_env.batch_outcome = outcome
    settings = load_settings()
    calls_before = batch_env.chat_calls
    batch_id = batch.submit_pages(pages, settings)
    assert _wait(batch_id) == outcome

    with pytest.raises(BatchEndedError, match=f"ended {outcome}") as info:
        batch.collect_pages(batch_id, pages, settings)
    assert info.value.batch_id == batch_id and info.value.status == outcome
    assert batch_env.chat_calls == calls_before


def test_a_cancelled_batch_raises(batch_env, pages) -> None:
    settings = load_settings()
    batch_id = batch.submit_pages(pages, settings)

    async def cancel() -> str:
        client = openai_client(settings)
        try:
            return await batch.cancel(client, batch_id)
        finally:
            await client.close()

    assert asyncio.run(cancel()) == "cancelling"
    assert _wait(batch_id) == "cancelled"
    with pytest.raises(BatchEndedError, match="ended cancelled"):
        batch.collect_pages(batch_id, pages, settings)


def test_collecting_an_unfinished_batch_raises(batch_env, pages) -> None:
    batch_env.batch_polls["in_progress"] = 100
    batch_id = batch.submit_pages(pages, load_settings())
    with pytest.raises(BatchError, match="still validating") as info:
        batch.collect_pages(batch_id, pages, load_settings())
    assert not isinstance(info.value, BatchEndedError)


# ---------------------------------------------------------------- the trigger


def test_trigger_waits_until_the_batch_is_terminal(batch_env, pages) -> None:
    batch_env.batch_polls.update(validating=2, in_progress=3)
    batch_id = batch.submit_pages(pages, load_settings())

    events = _events(_trigger(batch_id, poll_seconds=0.01))
    assert [event.payload for event in events] == [{"batch_id": batch_id, "status": "completed"}]
    assert batch_env.batch_retrievals == 6  # 2 validating + 3 in progress + the completing one


def test_trigger_waits_for_the_configured_time(batch_env, pages) -> None:
    batch_env.batch_min_seconds = 0.3
    batch_id = batch.submit_pages(pages, load_settings())
    assert _wait(batch_id) == "completed"
    assert batch_env.batch_retrievals > 3  # polled through the extra wait


def test_trigger_reports_a_batch_it_cannot_poll(batch_env) -> None:
    [event] = _events(_trigger("batch_unknown", poll_seconds=0.01))
    assert event.payload["status"] == "error"
    assert "no such batch" in event.payload["error"]


def test_trigger_serialize_round_trips() -> None:
    trigger = _trigger("batch_42", poll_seconds=7.5)
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert isinstance(rebuilt, type(trigger))
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs == {"batch_id": "batch_42", "poll_seconds": 7.5}


# ---------------------------------------------------------------- cost


def test_a_batched_call_costs_half_the_sync_call(batch_env, pages) -> None:
    settings = load_settings()
    [sync_call] = _sync_summary(pages[0]).calls
    batch_id = batch.submit_pages(pages[:1], settings)
    assert _wait(batch_id) == "completed"
    [batch_call] = batch.collect_pages(batch_id, pages[:1], settings)[pages[0].queue_id].calls

    assert (batch_call.prompt_tokens, batch_call.completion_tokens) == (
        sync_call.prompt_tokens,
        sync_call.completion_tokens,
    )
    assert sync_call.cost_usd > 0
    assert batch_call.cost_usd == pytest.approx(sync_call.cost_usd / 2)
    row = usage_row(batch_call, 100, pages[0].url)  # what the llm_usage ledger gets
    assert row[3:5] == ("openai-batch", PRICED_MODEL)
    assert row[-1] == pytest.approx(sync_call.cost_usd / 2)


def test_a_refused_credential_is_a_configuration_error(batch_env, pages) -> None:
    """A 401 on a line is the endpoint refusing our setup, as on the sync path."""
    line = {"custom_id": "100", "response": {"status_code": 401, "body": {"error": {}}}}
    with pytest.raises(LLMConfigurationError):
        batch.line_outcome(line, pages[0], load_settings())


def _held_for_hours(conn, refs: list[dict]) -> list[float]:
    """How many hours the rows' leases still run."""
    rows = conn.execute(
        "SELECT extract(epoch FROM lease_until - now()) / 3600 FROM blogqa.url_queue"
        " WHERE id = ANY(%s) ORDER BY id",
        ([r["id"] for r in refs],),
    ).fetchall()
    return [float(row[0]) for row in rows]


def test_the_stage_submits_once_and_resumes_where_it_left(batch_env, conn, page_server):
    """The enrich task's batch step, called as the task calls it: when it starts, again as a
    retried task would (no second batch, no second payment), and once the batch has ended."""
    from blogqa import batch_stage, pipeline, queue

    settings = load_settings()
    urls = [f"{page_server.base_url}/articles/{name}?batch-stage" for name in ARTICLE_FILES[:3]]
    queue.enqueue(conn, urls)
    chunk = [ref for part in pipeline.claim_chunks(10, 10, settings) for ref in part]
    refs = pipeline.crawl_chunk(chunk, settings)
    assert len(refs) == 3
    batch_env.script[:] = ["ok", "400", "ok"]  # the second line: context length exceeded
    batch_env.batch_polls["in_progress"] = 3
    chat_before, batches = batch_env.chat_calls, len(batch_env.batches)

    first = batch_stage.advance(refs, settings)
    assert first.wait_for is not None and len(batch_env.batches) == batches + 1
    assert [r["id"] for r in first.refs] == [r["id"] for r in refs]
    assert min(_held_for_hours(conn, refs)) > 24  # nothing renews them while deferred
    retried = batch_stage.advance(refs, settings)  # a retry of the task, batch still running
    assert retried.wait_for == first.wait_for and len(batch_env.batches) == batches + 1
    assert conn.execute("SELECT count(*) FROM blogqa.llm_usage").fetchone() == (0,)

    assert _wait(first.wait_for) == "completed"
    done = batch_stage.advance(refs, settings)

    assert done.wait_for is None and len(done.refs) == 2
    assert batch_env.chat_calls - chat_before == 3  # each page was asked once, in the batch
    assert max(_held_for_hours(conn, done.refs)) < 1  # back to the usual lease
    rows = conn.execute(
        "SELECT q.status, q.last_stage, q.last_error, w.llm_result IS NOT NULL"
        " FROM blogqa.url_queue q LEFT JOIN blogqa.work_items w ON w.queue_id = q.id"
        " ORDER BY q.id"
    ).fetchall()
    assert sorted(row[0] for row in rows) == ["dead", "processing", "processing"]
    [dead] = [row for row in rows if row[0] == "dead"]
    assert dead[1] == "summarize" and "context length exceeded" in dead[2]
    assert all(row[3] for row in rows if row[0] == "processing")  # summaries saved
    usage = conn.execute(
        "SELECT provider, count(*), count(DISTINCT queue_id) FROM blogqa.llm_usage GROUP BY 1"
    ).fetchall()
    assert usage == [("openai-batch", 2, 2)]
    again = batch_stage.advance(done.refs, settings)  # nothing left to submit or collect
    assert again.wait_for is None and len(batch_env.batches) == batches + 1


def test_a_crash_while_collecting_charges_nothing_twice(batch_env, conn, page_server, monkeypatch):
    """A billed line that failed (an invalid reply) is charged and its row failed in one
    transaction with the other results: a task that dies between the two leaves neither,
    and its retry charges each line once."""
    from blogqa import batch_stage, pipeline, queue

    settings = load_settings()
    urls = [f"{page_server.base_url}/articles/{name}?batch-crash" for name in ARTICLE_FILES[:3]]
    queue.enqueue(conn, urls)
    chunk = [ref for part in pipeline.claim_chunks(10, 10, settings) for ref in part]
    refs = pipeline.crawl_chunk(chunk, settings)
    batch_env.script[:] = ["ok", "invalid", "ok"]
    step = batch_stage.advance(refs, settings)
    assert _wait(step.wait_for) == "completed"

    def crash(*args, **kwargs):
        raise RuntimeError("worker died")

    with monkeypatch.context() as patched:
        patched.setattr(queue, "fail", crash)
        with pytest.raises(RuntimeError, match="worker died"):
            batch_stage.advance(refs, settings)
    assert conn.execute("SELECT count(*) FROM blogqa.llm_usage").fetchone() == (0,)
    assert conn.execute(
        "SELECT count(*) FROM blogqa.work_items WHERE llm_result IS NOT NULL"
    ).fetchone() == (0,)

    done = batch_stage.advance(refs, settings)  # the retry

    assert done.wait_for is None and len(done.refs) == 2
    charged = conn.execute(
        "SELECT queue_id, count(*) FROM blogqa.llm_usage GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert [count for _, count in charged] == [1, 1, 1]  # the invalid reply was billed, once
    failed = conn.execute(
        "SELECT status, last_error FROM blogqa.url_queue WHERE status <> 'processing'"
    ).fetchall()
    assert len(failed) == 1 and "invalid model output" in failed[0][1]


def test_a_batch_that_expired_fails_its_pages_for_a_retry(batch_env, conn, page_server):
    from blogqa import batch_stage, pipeline, queue

    settings = load_settings()
    urls = [f"{page_server.base_url}/articles/{name}?batch-expired" for name in ARTICLE_FILES[:2]]
    queue.enqueue(conn, urls)
    chunk = [ref for part in pipeline.claim_chunks(10, 10, settings) for ref in part]
    refs = pipeline.crawl_chunk(chunk, settings)
    batch_env.batch_outcome = "expired"

    step = batch_stage.advance(refs, settings)
    assert _wait(step.wait_for) == "expired"
    after = batch_stage.advance(refs, settings)

    assert after == batch_stage.Step([], None)
    rows = conn.execute("SELECT status, last_stage, last_error FROM blogqa.url_queue").fetchall()
    assert [(status, stage) for status, stage, _ in rows] == [("queued", "summarize")] * 2
    assert all("ended expired" in error for _, _, error in rows)


def test_an_event_that_cannot_be_polled_fails_the_task() -> None:
    from blogqa import batch_stage

    batch_stage.check_event({"batch_id": "b1", "status": "completed"})
    with pytest.raises(batch_stage.BatchPollError, match="b1 could not be polled: no such batch"):
        batch_stage.check_event({"batch_id": "b1", "status": "error", "error": "no such batch"})


def test_a_dag_run_in_batch_mode(batch_env, conn, page_server):
    """`blogqa run` (dag.test, which runs the trigger in line) with BLOGQA_LLM_MODE=batch:
    one batch per chunk, one chat call per page, every page done and charged at the batch
    price. Under the scheduler and the triggerer: tests/test_airflow_local.py."""
    from blogqa import runner

    settings = load_settings()
    urls = [f"{page_server.base_url}/articles/{name}?batch-run" for name in ARTICLE_FILES[:5]]
    chat_before, known = batch_env.chat_calls, set(batch_env.batches)

    tally = runner.run_pipeline(settings, urls=urls, chunk_size=3)

    assert tally.failed_runs == [] and tally.by_status == {"done": 5}
    new = [b for key, b in batch_env.batches.items() if key not in known]
    # 5 URLs in chunks of at most 3 (dag.test runs one task at a time, so they are not
    # spread over the pool's slots): chunks of 3 and 2, a batch each
    assert sorted(b["request_counts"]["total"] for b in new) == [2, 3]
    assert batch_env.chat_calls - chat_before == 5
    assert conn.execute(
        "SELECT count(*), count(DISTINCT provider), min(provider) FROM blogqa.llm_usage"
        " WHERE stage = 'summarize'"
    ).fetchone() == (5, 1, "openai-batch")
    assert conn.execute("SELECT count(*) FROM blogqa.summaries").fetchone() == (5,)
