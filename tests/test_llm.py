"""Tests of the chat providers (blogqa.llm) and the offline embedder (blogqa.embed).

The OpenAI provider runs the real `openai` client against the OpenAI-compatible test server
of tests/fakes.py; its `script` makes the next calls misbehave.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from openai import AsyncOpenAI

from blogqa.config import load_settings
from blogqa.embed import LocalEmbedder, hashed_embedding
from blogqa.errors import PageError
from blogqa.extract import Article, extract_article
from blogqa.llm import (
    PROMPT_VERSION,
    LLMConfigurationError,
    LocalChat,
    OpenAIChat,
    QAResult,
    chat_provider,
)
from blogqa.tokens import split_sentences

ARTICLES = Path(__file__).resolve().parents[1] / "include" / "blogqa" / "demo" / "articles"
URL = "https://bread.example.com/sourdough"


@pytest.fixture(scope="module")
def article() -> Article:
    html = (ARTICLES / "01-sourdough-starter.html").read_text("utf-8")
    return extract_article(html)


def _summarize(make_provider, article: Article) -> QAResult:
    """Build the provider inside the event loop, summarize, and always close it."""

    async def run() -> QAResult:
        provider = make_provider()
        try:
            return await provider.summarize(url=URL, title=article.title, text=article.text)
        finally:
            await provider.aclose()

    return asyncio.run(run())


def _openai_error(article: Article, make_provider=None) -> PageError:
    with pytest.raises(PageError) as info:
        _summarize(make_provider or (lambda: OpenAIChat(load_settings())), article)
    assert info.value.stage == "summarize"
    return info.value


# ---------------------------------------------------------------- OpenAI-compatible provider


def test_openai_env_selects_the_openai_provider(openai_env) -> None:
    settings = load_settings()
    assert settings.llm_provider == "openai"
    assert isinstance(chat_provider(settings), OpenAIChat)


def test_openai_summarize(openai_env, article: Article) -> None:
    before = openai_env.chat_calls
    result = _summarize(lambda: OpenAIChat(load_settings()), article)

    assert openai_env.chat_calls - before == 1
    assert 3 <= len(result.qa) <= 5
    for question, answer in result.qa:
        assert question.endswith("?")
        assert answer and answer in article.text
    assert result.summary
    assert result.model == "test-chat-model"
    assert result.prompt_version == PROMPT_VERSION
    assert result.input_truncated is False

    [call] = result.calls
    assert (call.stage, call.provider, call.model) == ("summarize", "openai", "test-chat-model")
    assert call.prompt_tokens > 0 and call.completion_tokens > 0
    assert call.cost_usd is None  # unknown model: no price

    request = openai_env.requests[-1]
    assert request["model"] == "test-chat-model"
    assert request["response_format"]["type"] == "json_schema"
    assert request["response_format"]["json_schema"]["strict"] is True
    assert [m["role"] for m in request["messages"]] == ["system", "user"]
    assert article.text[:200] in request["messages"][1]["content"]
    assert f"Title: {article.title}" in request["messages"][1]["content"]


def test_openai_input_is_cut_to_the_token_budget(openai_env, monkeypatch, article) -> None:
    monkeypatch.setenv("BLOGQA_INPUT_TOKEN_BUDGET", "200")
    result = _summarize(lambda: OpenAIChat(load_settings()), article)
    assert result.input_truncated is True
    sent = openai_env.requests[-1]["messages"][1]["content"].split("Article:\n", 1)[1]
    assert article.text.startswith(sent)
    assert len(sent) < len(article.text) / 2
    assert all(answer in sent for _, answer in result.qa)


def test_openai_invalid_reply_is_repaired(openai_env, article: Article) -> None:
    openai_env.script.append("invalid")
    before = openai_env.chat_calls
    result = _summarize(lambda: OpenAIChat(load_settings()), article)

    assert openai_env.chat_calls - before == 2
    assert len(result.calls) == 2
    assert 3 <= len(result.qa) <= 5
    repair = openai_env.requests[-1]["messages"]
    assert [m["role"] for m in repair] == ["system", "user", "assistant", "user"]
    assert "not valid" in repair[3]["content"]


def test_openai_invalid_twice_is_permanent(openai_env, article: Article) -> None:
    openai_env.script.extend(["invalid", "invalid"])
    before = openai_env.chat_calls
    error = _openai_error(article)
    assert error.permanent is True
    assert "still invalid" in str(error)
    assert len(error.calls) == 2
    assert all(call.prompt_tokens > 0 for call in error.calls)
    assert openai_env.chat_calls - before == 2


def test_openai_bad_request_is_permanent(openai_env, article: Article) -> None:
    openai_env.script.append("400")
    before = openai_env.chat_calls
    error = _openai_error(article)
    assert error.permanent is True
    assert "context length exceeded" in str(error)
    assert openai_env.chat_calls - before == 1


def test_openai_server_errors_are_transient(openai_env, article: Article) -> None:
    # The client retries twice (max_retries=2, with its own short backoff) before giving up.
    openai_env.script.extend(["500", "500", "500"])
    before = openai_env.chat_calls
    error = _openai_error(article)
    assert error.permanent is False
    assert openai_env.chat_calls - before == 3
    assert openai_env.script == []


def test_openai_rate_limit_is_transient_with_retry_after(openai_env, article: Article) -> None:
    openai_env.script.append("429")

    def no_retries() -> OpenAIChat:
        client = AsyncOpenAI(api_key=os.environ["OPENAI_API_KEY"], max_retries=0)
        return OpenAIChat(load_settings(), client=client)

    error = _openai_error(article, no_retries)
    assert error.permanent is False
    assert error.retry_after == 7


def test_openai_refusal_is_permanent(openai_env, article: Article) -> None:
    openai_env.script.append("refusal")
    error = _openai_error(article)
    assert error.permanent is True
    assert "refused" in str(error)
    assert len(error.calls) == 1


def test_openai_wrong_api_key_is_a_configuration_error(
    openai_env, monkeypatch, article: Article
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    before = openai_env.chat_calls
    with pytest.raises(LLMConfigurationError, match="OPENAI_API_KEY"):
        _summarize(lambda: OpenAIChat(load_settings()), article)
    assert openai_env.chat_calls == before  # refused before reaching the model


# ---------------------------------------------------------------- offline provider


def test_local_chat_is_deterministic_and_extractive(article: Article) -> None:
    first = _summarize(LocalChat, article)
    second = _summarize(LocalChat, article)
    assert (first.summary, first.qa) == (second.summary, second.qa)

    assert 3 <= len(first.qa) <= 5
    sentences = split_sentences(article.text)
    for question, answer in first.qa:
        assert answer in sentences
        assert question.endswith("?")
        assert article.title in question
    assert len({q for q, _ in first.qa}) == len(first.qa)
    assert first.summary and all(s in sentences for s in split_sentences(first.summary))
    [call] = first.calls
    assert call.provider == "local" and call.model.startswith("local")
    assert first.model.startswith("local")


def test_local_chat_model_name_is_always_marked_local() -> None:
    assert LocalChat("gpt-4o").model == "local-gpt-4o"
    assert LocalChat("local-extractive-v1").model == "local-extractive-v1"
    assert isinstance(chat_provider(load_settings()), LocalChat)


def test_local_chat_rejects_too_little_text() -> None:
    short = Article("Too short. Really short.", "Tiny", None, None, None, None, None)
    with pytest.raises(PageError) as info:
        _summarize(LocalChat, short)
    assert info.value.permanent is True
    assert info.value.stage == "summarize"


# ---------------------------------------------------------------- offline embeddings

FEEDING = "The sourdough starter needs regular feeding with rye flour and warm water."
PARAPHRASE = "Feed your sourdough starter regularly: rye flour and warm water keep it active."
UNRELATED = "The stock market fell sharply after the central bank raised interest rates."


@pytest.mark.parametrize("dim", [8, 384, 1536])
def test_hashed_embedding_is_unit_norm_and_deterministic(dim: int) -> None:
    vector = hashed_embedding(FEEDING, dim)
    assert vector.shape == (dim,)
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-6)
    assert np.array_equal(vector, hashed_embedding(FEEDING, dim))
    assert not np.array_equal(vector, hashed_embedding(UNRELATED, dim))


def test_hashed_embedding_of_empty_text_is_still_a_unit_vector() -> None:
    for text in ("", "the and of", "   "):
        vector = hashed_embedding(text, 64)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0)


def test_hashed_embedding_prefers_shared_words() -> None:
    feeding, paraphrase, unrelated = (
        hashed_embedding(t, 1536) for t in (FEEDING, PARAPHRASE, UNRELATED)
    )
    assert float(feeding @ paraphrase) > float(feeding @ unrelated) + 0.2
    assert float(feeding @ feeding) == pytest.approx(1.0, abs=1e-6)


def test_local_embedder(settings) -> None:
    embedder = LocalEmbedder(settings.embed_model, settings.embed_dim)
    assert embedder.model.startswith("local")

    async def run():
        try:
            return await embedder.embed([FEEDING, PARAPHRASE, UNRELATED])
        finally:
            await embedder.aclose()

    matrix, call = asyncio.run(run())
    assert matrix.shape == (3, settings.embed_dim)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(matrix[0], hashed_embedding(FEEDING, settings.embed_dim))
    assert (call.stage, call.provider, call.inputs) == ("embed", "local", 3)
    assert call.prompt_tokens == sum(len(t.split()) for t in (FEEDING, PARAPHRASE, UNRELATED))
    similarities = matrix @ matrix[0]
    assert similarities[1] > similarities[2]


@pytest.mark.parametrize("floats_only", [False, True])
def test_openai_embeddings_arrive_exactly_in_either_encoding(openai_env, floats_only) -> None:
    from blogqa.embed import OpenAIEmbedder
    from tests.fakes import fake_embedding

    openai_env.floats_only = floats_only
    texts = ["first text to embed", "second, different text"]
    embedder = OpenAIEmbedder(load_settings())

    async def run():
        try:
            return await embedder.embed(texts)
        finally:
            await embedder.aclose()

    matrix, call = asyncio.run(run())
    expected = np.asarray([fake_embedding(t, 1536) for t in texts], dtype=np.float32)
    assert matrix.shape == (2, 1536)
    assert np.array_equal(matrix, expected)
    assert call.inputs == 2
