"""The summarize stage through the OpenAI Batch API (BLOGQA_LLM_MODE=batch).

Why: a scheduled run does not need its summaries within seconds, and the Batch API answers
the same Chat Completions requests within 24 hours at half the price. The flow is
`submit_pages` (one JSONL line per page, uploaded, one batch created), a wait that holds no
worker slot (`blogqa.batch_trigger.BatchTrigger` in Airflow's triggerer), then
`collect_pages`: one QAResult or PageError per queue id, so a failed line fails its URL only.

Each line is exactly the request `llm.OpenAIChat.summarize` sends for the page (same
messages, response format, temperature and input budget), built from llm's own helpers, so
both modes produce the same rows. What batch mode cannot do is the sync path's repair turn
for an invalid reply: such a page gets a transient PageError and the queue retries it.

Costs: a line's ModelCall is a `BatchModelCall`, provider `openai-batch`, whose cost_usd is
the model's price times BATCH_DISCOUNT; blogqa.llm_usage records both, so the ledger shows
which calls were batched and what they cost.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass

from pydantic import ValidationError

from blogqa.config import Settings
from blogqa.errors import BlogqaError, PageError
from blogqa.llm import (
    CHAT_TEMPERATURE,
    PROMPT_VERSION,
    RESPONSE_FORMAT,
    STAGE,
    ModelCall,
    PageQA,
    QAResult,
    chat_messages,
    classify_openai_error,
    fit_to_budget,
    openai_client,
)

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
BATCH_PROVIDER = "openai-batch"
# The Batch API's price is half the synchronous one for input and output tokens alike.
BATCH_DISCOUNT = 0.5
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})

Outcome = QAResult | PageError


@dataclass(frozen=True)
class BatchPage:
    """One page to summarize; `queue_id` is the line's custom_id, which maps a result back."""

    queue_id: int
    url: str
    title: str | None
    text: str


@dataclass(frozen=True)
class BatchModelCall(ModelCall):
    """A chat call made through the Batch API: recorded as provider `openai-batch`, at the
    discounted price, so the ledger's totals are what was billed."""

    @property
    def cost_usd(self) -> float | None:
        full = super().cost_usd
        return None if full is None else full * BATCH_DISCOUNT


class BatchError(BlogqaError):
    """A batch cannot be collected: it has not finished, or it ended without results."""

    def __init__(self, message: str, *, batch_id: str, status: str) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.status = status


class BatchEndedError(BatchError):
    """The batch ended failed, expired or cancelled: none of its pages got a result here.
    The task should fail (or requeue its pages); retrying the collection will not help."""


# ---------------------------------------------------------------- building the batch


def request_body(title: str | None, text: str, settings: Settings) -> tuple[dict, bool]:
    """The Chat Completions body `OpenAIChat.summarize` sends first for this page, and
    whether the text was cut to the input budget."""
    body, truncated = fit_to_budget(text, settings.chat_model, settings.input_token_budget)
    request = {
        "model": settings.chat_model,
        "messages": chat_messages(title, body),
        "response_format": RESPONSE_FORMAT,
        "temperature": CHAT_TEMPERATURE,
    }
    return request, truncated


def batch_line(page: BatchPage, settings: Settings) -> dict:
    """One line of the batch's input file; custom_id is the queue id (a string, as the API
    requires)."""
    body, _ = request_body(page.title, page.text, settings)
    return {"custom_id": str(page.queue_id), "method": "POST", "url": ENDPOINT, "body": body}


def batch_jsonl(pages: list[BatchPage], settings: Settings) -> bytes:
    """The input file: one JSON line per page. Queue ids must be unique (they map results)."""
    ids = [page.queue_id for page in pages]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate queue ids in one batch")
    lines = (json.dumps(batch_line(page, settings)) for page in pages)
    return "".join(line + "\n" for line in lines).encode()


async def submit(client, pages: list[BatchPage], settings: Settings) -> str:
    """Upload the input file and create the batch; its id, which the trigger polls."""
    if not pages:
        raise ValueError("a batch needs at least one page")
    data = batch_jsonl(pages, settings)
    uploaded = await client.files.create(
        file=("blogqa-batch.jsonl", io.BytesIO(data)), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint=ENDPOINT,
        completion_window=COMPLETION_WINDOW,
        metadata={"blogqa_prompt_version": PROMPT_VERSION},
    )
    log.info("stage=%s batch=%s submitted %d pages", STAGE, batch.id, len(pages))
    for page in pages:
        log.info("url=%s stage=%s submitted in batch %s", page.url, STAGE, batch.id)
    return batch.id


async def batch_status(client, batch_id: str) -> str:
    """The batch's status now (validating, in_progress, finalizing, completed, ...)."""
    batch = await client.batches.retrieve(batch_id)
    return batch.status


# ---------------------------------------------------------------- collecting the results


async def collect(client, batch_id: str, pages: list[BatchPage], settings: Settings) -> dict:
    """{queue_id: QAResult | PageError} for every page of a completed batch.

    Raises BatchEndedError when the batch failed, expired or was cancelled, and BatchError
    when it has not finished yet; LLMConfigurationError (from llm.classify_openai_error) when a
    line was refused for the credentials or the model."""
    batch = await client.batches.retrieve(batch_id)
    _check_completed(batch)
    lines = await _result_lines(client, batch)
    turnaround_ms = _turnaround_ms(batch)
    outcomes: dict[int, Outcome] = {}
    for page in pages:
        line = lines.get(str(page.queue_id))
        outcomes[page.queue_id] = line_outcome(line, page, settings, turnaround_ms)
        _log_outcome(page, outcomes[page.queue_id], batch_id)
    return outcomes


def _check_completed(batch) -> None:
    if batch.status == "completed":
        return
    if batch.status in TERMINAL_STATUSES:
        reasons = [e.message for e in (batch.errors.data or [])] if batch.errors else []
        detail = f": {'; '.join(r for r in reasons if r)}" if any(reasons) else ""
        raise BatchEndedError(
            f"batch {batch.id} ended {batch.status}{detail}; its pages got no result",
            batch_id=batch.id,
            status=batch.status,
        )
    raise BatchError(
        f"batch {batch.id} is still {batch.status}", batch_id=batch.id, status=batch.status
    )


async def _result_lines(client, batch) -> dict[str, dict]:
    """custom_id -> output or error line, from both of the batch's result files."""
    lines: dict[str, dict] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        content = await client.files.content(file_id)
        for raw in content.text.splitlines():
            if raw.strip():
                line = json.loads(raw)
                lines[str(line.get("custom_id"))] = line
    return lines


def _turnaround_ms(batch) -> int:
    """The batch's creation to completion: the latency each of its calls is recorded with."""
    if batch.completed_at and batch.created_at:
        return max(0, int((batch.completed_at - batch.created_at) * 1000))
    return 0


def _log_outcome(page: BatchPage, outcome: Outcome, batch_id: str) -> None:
    if isinstance(outcome, PageError):
        log.warning("url=%s stage=%s batch %s: %s", page.url, STAGE, batch_id, outcome)
    else:
        log.info("url=%s stage=%s batch %s: summarized", page.url, STAGE, batch_id)


def line_outcome(
    line: dict | None, page: BatchPage, settings: Settings, latency_ms: int = 0
) -> Outcome:
    """One page's QAResult or PageError from its result line (None: the batch has none)."""
    if line is None:
        return PageError("the batch returned no result for this page", stage=STAGE, permanent=False)
    response = line.get("response")
    if line.get("error") or not response:
        error = line.get("error") or {}
        message = error.get("message") or "no response"
        return PageError(
            f"batch request failed ({error.get('code')}): {message}", stage=STAGE, permanent=False
        )
    if response.get("status_code") != 200:
        return classify_openai_error(_status_error(response), STAGE)
    return _reply_outcome(response.get("body") or {}, page, settings, latency_ms)


def _status_error(response: dict):
    """The openai exception the client would have raised for this status, so a line's
    failure is classified (transient or permanent) exactly like a sync call's."""
    import httpx2
    import openai

    status, body = response["status_code"], response.get("body")
    data = body.get("error", body) if isinstance(body, dict) else body
    message = (data.get("message") if isinstance(data, dict) else None) or f"status {status}"
    classes = {
        400: openai.BadRequestError,
        401: openai.AuthenticationError,
        403: openai.PermissionDeniedError,
        404: openai.NotFoundError,
        409: openai.ConflictError,
        422: openai.UnprocessableEntityError,
        429: openai.RateLimitError,
    }
    default = openai.InternalServerError if status >= 500 else openai.APIStatusError
    http_response = httpx2.Response(status, request=httpx2.Request("POST", ENDPOINT))
    return classes.get(status, default)(message, response=http_response, body=data)


def _reply_outcome(body: dict, page: BatchPage, settings: Settings, latency_ms: int) -> Outcome:
    """Parse a 200 reply as `OpenAIChat.summarize` does, minus its repair turn."""
    usage = body.get("usage") or {}
    call = BatchModelCall(
        STAGE,
        BATCH_PROVIDER,
        model=body.get("model") or settings.chat_model,
        prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=usage.get("completion_tokens", 0),
        latency_ms=latency_ms,
    )
    choices = body.get("choices") or [{}]
    message = choices[0].get("message") or {}
    if message.get("refusal"):
        error = PageError(f"model refused: {message['refusal']}", stage=STAGE, permanent=True)
        return _with_calls(error, [call])
    try:
        parsed = PageQA.model_validate(json.loads(message.get("content") or ""))
    except (json.JSONDecodeError, ValidationError) as exc:
        problem = str(exc).splitlines()[0][:300]
        error = PageError(
            f"invalid model output in a batch reply (batch mode has no repair turn): {problem}",
            stage=STAGE,
            permanent=False,
        )
        return _with_calls(error, [call])
    _, truncated = fit_to_budget(page.text, settings.chat_model, settings.input_token_budget)
    qa = [(p.question.strip(), p.answer.strip()) for p in parsed.qa]
    return QAResult(
        parsed.summary.strip(), qa, settings.chat_model, PROMPT_VERSION, [call], truncated
    )


def _with_calls(error: PageError, calls: list[ModelCall]) -> PageError:
    """The calls travel on the error, as on the sync path's, so a failed page's usage (it
    was billed) still reaches the ledger."""
    error.calls = calls  # type: ignore[attr-defined]
    return error


# ---------------------------------------------------------------- for a synchronous task


def submit_pages(pages: list[BatchPage], settings: Settings) -> str:
    """`submit` from synchronous code (the task, before it defers): the batch id."""
    return asyncio.run(_with_client(settings, lambda client: submit(client, pages, settings)))


def collect_pages(batch_id: str, pages: list[BatchPage], settings: Settings) -> dict:
    """`collect` from synchronous code (the task, once the trigger reports the batch ended)."""
    return asyncio.run(
        _with_client(settings, lambda client: collect(client, batch_id, pages, settings))
    )


async def cancel(client, batch_id: str) -> str:
    """Ask the endpoint to cancel the batch (a task killed while deferred); its new status."""
    batch = await client.batches.cancel(batch_id)
    log.info("stage=%s batch=%s cancel requested (%s)", STAGE, batch_id, batch.status)
    return batch.status


async def _with_client(settings: Settings, work):
    """Run `work(client)` with a client opened and closed in this event loop."""
    client = openai_client(settings)
    try:
        return await work(client)
    finally:
        await client.close()
