"""Summary and question/answer pairs for one page: OpenAI Chat Completions or offline.

Chat Completions with a JSON-schema response format, because every OpenAI-compatible server
(vLLM, Ollama, LM Studio, Azure) implements it. The offline provider is a deterministic
extractive stand-in for demos and tests; its model name starts with `local` and it is never
presented as an LLM.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, Field, ValidationError

from blogqa.config import Settings
from blogqa.errors import PageError
from blogqa.limits import CHAT_OUTPUT_TOKENS, EndpointLimits, charging, retry_after_seconds
from blogqa.text import STOPWORDS, content_words  # noqa: F401  STOPWORDS: quality.py imports it here
from blogqa.tokens import split_sentences, tokenizer_for

log = logging.getLogger(__name__)

PROMPT_VERSION = "qa-v1"
STAGE = "summarize"
# USD per million tokens (input, output); unknown models are recorded without a cost.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
}

SYSTEM_PROMPT = """You turn one web article into study material.
Write a faithful summary of the article in 2-4 sentences, then 3 to 5 question/answer pairs.
Every answer must be stated in the article text; do not use outside knowledge.
Questions must make sense on their own (name the subject, not "the article").
Reply with JSON only, matching the given schema."""

RESPONSE_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "qa": {
            "type": "array",
            "minItems": 3,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                "required": ["question", "answer"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["summary", "qa"],
    "additionalProperties": False,
}


# The reply's shape only. What makes its content acceptable (a non-empty summary, 3-5 unique
# questions, answers the page supports, no refusals) is the quality gate's expectation
# suites (blogqa/expectations/*.json), which quarantine a document with its reasons for a
# person to decide, instead of failing it here; RESPONSE_SCHEMA still asks for 3-5 pairs.
class QAPair(BaseModel):
    question: str
    answer: str


class PageQA(BaseModel):
    summary: str
    qa: list[QAPair] = Field(max_length=20)


@dataclass(frozen=True)
class ModelCall:
    """One call to a model, as written to the blogqa.llm_usage ledger."""

    stage: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    inputs: int = 1

    @property
    def cost_usd(self) -> float | None:
        price = PRICES_PER_MTOK.get(self.model)
        if price is None:
            return None
        return (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6


@dataclass
class QAResult:
    summary: str
    qa: list[tuple[str, str]]
    model: str
    prompt_version: str
    calls: list[ModelCall] = field(default_factory=list)
    input_truncated: bool = False

    def as_json(self) -> dict:
        return {
            "summary": self.summary,
            "qa": [{"question": q, "answer": a} for q, a in self.qa],
            "model": self.model,
            "prompt_version": self.prompt_version,
            "input_truncated": self.input_truncated,
        }


class ChatProvider(Protocol):
    provider: str
    model: str

    async def summarize(self, *, url: str, title: str | None, text: str) -> QAResult: ...

    async def aclose(self) -> None: ...


def fit_to_budget(text: str, model: str, budget: int) -> tuple[str, bool]:
    """Cut the article to the input token budget (prompt overhead is outside the budget)."""
    kept, _, truncated = tokenizer_for(model).truncate(text, budget)
    return kept, truncated


# The Chat Completions response_format of a summary request: the reply must match the schema.
CHAT_TEMPERATURE = 0.2
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "page_qa", "strict": True, "schema": RESPONSE_SCHEMA},
}


def chat_messages(title: str | None, text: str) -> list[dict]:
    """The system prompt and the article, as one summary request sends them."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(title, text)},
    ]


def user_message(title: str | None, text: str) -> str:
    return f"Title: {title or '(none)'}\n\nArticle:\n{text}"


# ---------------------------------------------------------------- offline provider


class LocalChat:
    """Deterministic extractive summary and Q&A: no network, no model. For demos and tests."""

    provider = "local"

    def __init__(self, model: str = "local-extractive-v1") -> None:
        self.model = model if model.startswith("local") else f"local-{model}"

    async def aclose(self) -> None:
        pass

    async def summarize(self, *, url: str, title: str | None, text: str) -> QAResult:
        started = time.perf_counter()
        sentences = _prose_sentences(text, title)
        if len(sentences) < 3:
            raise PageError(
                "too little article text for a summary and 3 question/answer pairs",
                stage=STAGE,
                permanent=True,
            )
        freq = Counter(w for s in sentences for w in content_words(s))

        def weight(i: int) -> float:
            words = content_words(sentences[i])
            lead = 1.0 + 0.5 / (1 + i)  # articles put their point first
            return lead * sum(freq[w] for w in words) / (len(words) + 4) if words else 0.0

        ranked = sorted(range(len(sentences)), key=lambda i: (-weight(i), i))
        summary = " ".join(sentences[i] for i in sorted(ranked[:3]))
        qa = self._pairs(sentences, ranked, freq, title)
        latency = int((time.perf_counter() - started) * 1000)
        log.info("url=%s stage=%s offline extractive provider (not an LLM)", url, STAGE)
        call = ModelCall(STAGE, self.provider, self.model, len(text.split()), 0, latency)
        return QAResult(summary, qa, self.model, PROMPT_VERSION, [call])

    @staticmethod
    def _pairs(
        sentences: list[str], ranked: list[int], freq: Counter, title: str | None
    ) -> list[tuple[str, str]]:
        """Up to 5 informative sentences, spread over the text, each with a question naming
        a salient term not used by an earlier question."""
        chosen: list[int] = []
        for i in ranked:
            if all(abs(i - j) > 1 for j in chosen):
                chosen.append(i)
            if len(chosen) == 5:
                break
        for i in ranked:  # short texts: relax the spacing rule
            if len(chosen) >= 3:
                break
            if i not in chosen:
                chosen.append(i)
        subject = f'"{title}"' if title else "the article"
        used: set[str] = set()
        pairs = []
        for i in sorted(chosen):
            words = [w for w in content_words(sentences[i]) if w not in used] or ["this"]
            term = max(words, key=lambda w: (freq[w], w))
            used.add(term)
            if re.search(r"\d", sentences[i]):
                question = f"According to {subject}, what figures are given about {term}?"
            else:
                question = f"What does {subject} say about {term}?"
            pairs.append((question, sentences[i]))
        return pairs


def _prose_sentences(text: str, title: str | None) -> list[str]:
    """Sentences of running text: not the title, not list fragments or headings."""
    found = []
    for sentence in split_sentences(text):
        words = sentence.split()
        if not 6 <= len(words) <= 80 or sentence == title:
            continue
        if sentence.startswith(("- ", "* ", "|")) or sentence[-1] not in ".!?\"')":
            continue
        found.append(sentence)
    return found


# ---------------------------------------------------------------- OpenAI-compatible provider


def openai_client(
    settings: Settings, *, timeout: float | None = None, limits: EndpointLimits | None = None
):  # -> AsyncOpenAI
    """AsyncOpenAI from the standard OPENAI_* variables; a local server may need no key.

    With `limits`, every HTTP request the client makes (its own retries included) goes
    through the limits shared by all workers (`blogqa.limits`), which are bound to the
    client's base URL here."""
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    http_client = None
    if limits is not None:
        import httpx2

        # the connection limits the openai client gives its own default transport
        pool = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
        inner = httpx2.AsyncHTTPTransport(limits=pool)
        http_client = DefaultAsyncHttpxClient(transport=limits.transport(inner))
    client = AsyncOpenAI(
        api_key=os.environ.get("OPENAI_API_KEY") or "not-needed-for-this-server",
        timeout=timeout or settings.llm_timeout,
        # The client's own retries (honouring Retry-After) come on top of the queue's
        # attempts; few, so one page can cost at most attempts x (1 + this) calls.
        max_retries=settings.llm_max_retries,
        http_client=http_client,
    )
    if limits is not None:
        limits.bind(str(client.base_url))
    return client


def preload(settings: Settings) -> None:
    """Load now what every summarize and embed task would load for itself: the tokenizers
    and the openai package (imported lazily, about a second). `blogqa.preload` calls this in
    the scheduler and the Celery workers, whose forked task processes then inherit them."""
    tokenizer_for(settings.chat_model)
    tokenizer_for(settings.embed_model)
    if settings.llm_provider == "openai":
        client = openai_client(settings)
        client.chat.completions, client.embeddings  # noqa: B018 - their modules load lazily


class LLMConfigurationError(RuntimeError):
    """The endpoint refused our credentials or model: fix the settings, retrying won't help."""


def classify_openai_error(exc: Exception, stage: str) -> PageError:
    """Per-URL error for this exception, or raise LLMConfigurationError for setup problems."""
    import openai

    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        raise LLMConfigurationError(
            f"the model endpoint refused the credentials ({exc}); check OPENAI_API_KEY and "
            "OPENAI_BASE_URL"
        ) from exc
    if isinstance(exc, openai.NotFoundError):
        raise LLMConfigurationError(
            f"the model endpoint does not know this model or route ({exc}); check "
            "BLOGQA_CHAT_MODEL / BLOGQA_EMBED_MODEL and OPENAI_BASE_URL"
        ) from exc
    if isinstance(exc, openai.RateLimitError | openai.InternalServerError):
        retry_after = _retry_after(exc)
        return PageError(
            f"model endpoint busy: {exc}", stage=stage, permanent=False, retry_after=retry_after
        )
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
        return PageError(f"model endpoint unreachable: {exc}", stage=stage, permanent=False)
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        return PageError(f"model endpoint rejected the request: {exc}", stage=stage, permanent=True)
    if isinstance(exc, openai.APIStatusError):
        return PageError(f"model endpoint error: {exc}", stage=stage, permanent=False)
    raise exc


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    return retry_after_seconds(response.headers) if response is not None else None


class OpenAIChat:
    """One Chat Completions call per page with a strict JSON-schema response format.

    BLOGQA_LLM_CONCURRENCY bounds the calls of one task (the pipeline's gate); the client
    built here also goes through the limits shared by every task on every worker
    (BLOGQA_LLM_MAX_IN_FLIGHT, _RPM, _TPM, the server's rate-limit headers). A `client`
    passed in is used as is, without them."""

    provider = "openai"

    def __init__(self, settings: Settings, client=None) -> None:
        self.model = settings.chat_model
        self.budget = settings.input_token_budget
        self.limits: EndpointLimits | None = None
        if client is None:
            self.limits = EndpointLimits.for_settings(settings, self.model, STAGE)
            client = openai_client(settings, limits=self.limits)
        self.client = client

    async def aclose(self) -> None:
        """Close the HTTP pool inside the event loop that opened it."""
        await self.client.close()

    async def summarize(self, *, url: str, title: str | None, text: str) -> QAResult:
        import openai

        body, truncated = fit_to_budget(text, self.model, self.budget)
        messages = chat_messages(title, body)
        calls: list[ModelCall] = []
        for attempt in (1, 2):  # the second attempt repairs an invalid reply
            charge = self._tokens_to_charge(messages)
            started = time.perf_counter()
            try:
                with charging(charge):
                    response = await self.client.chat.completions.create(
                        model=self.model,
                        messages=messages,
                        response_format=RESPONSE_FORMAT,
                        temperature=CHAT_TEMPERATURE,
                    )
            except openai.OpenAIError as exc:
                raise classify_openai_error(exc, STAGE) from exc
            latency = int((time.perf_counter() - started) * 1000)
            usage = response.usage
            if self.limits is not None:
                await self.limits.settle(charge, usage.total_tokens if usage else None)
            calls.append(
                ModelCall(
                    STAGE,
                    self.provider,
                    response.model or self.model,
                    usage.prompt_tokens if usage else 0,
                    usage.completion_tokens if usage else 0,
                    latency,
                )
            )
            message = response.choices[0].message if response.choices else None
            if message is not None and getattr(message, "refusal", None):
                raise _with_calls(
                    PageError(f"model refused: {message.refusal}", stage=STAGE, permanent=True),
                    calls,
                )
            content = (message.content if message else None) or ""
            try:
                parsed = PageQA.model_validate(json.loads(content))
            except (json.JSONDecodeError, ValidationError) as exc:
                problem = str(exc).splitlines()[0][:300]
                log.warning("url=%s stage=%s invalid model output (%s)", url, STAGE, problem)
                if attempt == 2:
                    raise _with_calls(
                        PageError(
                            f"model output still invalid after a repair attempt: {problem}",
                            stage=STAGE,
                            permanent=True,
                        ),
                        calls,
                    ) from None
                messages += [
                    {"role": "assistant", "content": content[:4000]},
                    {
                        "role": "user",
                        "content": f"That reply was not valid ({problem}). "
                        "Reply again with JSON matching the schema only.",
                    },
                ]
                continue
            qa = [(p.question.strip(), p.answer.strip()) for p in parsed.qa]
            return QAResult(
                parsed.summary.strip(), qa, self.model, PROMPT_VERSION, calls, truncated
            )
        raise AssertionError("unreachable")

    def _tokens_to_charge(self, messages: list[dict]) -> float:
        """Tokens/min charge of one request: the prompt counted with the model's tokenizer,
        a few per message, and CHAT_OUTPUT_TOKENS for the reply. 0 without a TPM limit."""
        if self.limits is None or not self.limits.counts_tokens:
            return 0.0
        tokenizer = tokenizer_for(self.model)
        prompt = sum(tokenizer.count(m["content"]) + 4 for m in messages) + 3
        return float(prompt + CHAT_OUTPUT_TOKENS)


def _with_calls(error: PageError, calls: list[ModelCall]) -> PageError:
    """Attach the calls already made, so a failed page's token usage still reaches the ledger."""
    error.calls = calls  # type: ignore[attr-defined]
    return error


def chat_provider(settings: Settings) -> ChatProvider:
    if settings.offline:
        return LocalChat(settings.chat_model)
    return OpenAIChat(settings)
