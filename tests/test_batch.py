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


def test_the_dag_refuses_batch_mode_until_it_submits_batches(settings):
    """The parts above are not called by the DAG yet: with BLOGQA_LLM_MODE=batch the
    summarize stage says so rather than quietly making one call per page."""
    import dataclasses

    from blogqa import pipeline
    from blogqa.errors import ConfigError

    batch_settings = dataclasses.replace(settings, llm_mode="batch")
    with pytest.raises(ConfigError, match="BLOGQA_LLM_MODE=batch is not available"):
        pipeline.summarize_chunk(
            [{"id": 1, "token": "00000000-0000-0000-0000-000000000000"}], batch_settings
        )
