"""Tests of token counting, truncation and chunking (blogqa.tokens, blogqa.llm.fit_to_budget)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from blogqa.extract import extract_article
from blogqa.llm import fit_to_budget
from blogqa.tokens import Tokenizer, chunk_text, split_sentences, tokenizer_for

ARTICLES = Path(__file__).resolve().parents[1] / "include" / "blogqa" / "demo" / "articles"
REGEX = Tokenizer("regex-estimate", False, None)
SAMPLE = (
    "Sourdough starters need regular feeding. Keep the jar at room temperature, "
    "and discard half before each feed! Is rye flour better than wheat? Many bakers think so."
)


@pytest.fixture(scope="module")
def article_text() -> str:
    html = (ARTICLES / "01-sourdough-starter.html").read_text("utf-8")
    return extract_article(html).text


def _tokenizers() -> list[Tokenizer]:
    return [tokenizer_for("gpt-4o-mini"), REGEX]


def _uniform_text(n: int) -> str:
    return " ".join(f"Sentence number {i} describes topic {i} in a few words." for i in range(n))


# ---------------------------------------------------------------- tokenizer_for


@pytest.mark.parametrize("model", ["gpt-4o-mini", "no-such-model-anywhere"])
def test_tokenizer_for_gives_a_working_tokenizer(model: str) -> None:
    tokenizer = tokenizer_for(model)
    assert tokenizer.name
    assert tokenizer.count("") == 0
    one = tokenizer.count("hello")
    many = tokenizer.count("hello " * 50)
    assert 1 <= one < many
    assert tokenizer.count(SAMPLE) == len(tokenizer.encode(SAMPLE))
    assert 20 < tokenizer.count(SAMPLE) < 80


def test_unknown_model_is_never_exact() -> None:
    assert tokenizer_for("no-such-model-anywhere").exact is False


def test_tokenizer_for_is_cached() -> None:
    assert tokenizer_for("gpt-4o-mini") is tokenizer_for("gpt-4o-mini")


def test_regex_estimate_counts_words_and_punctuation() -> None:
    assert REGEX.count("Hello, world!") == 4
    assert REGEX.encode("a-b c") == ["a", "-", "b", "c"]


# ---------------------------------------------------------------- truncate


@pytest.mark.parametrize("tokenizer", _tokenizers(), ids=lambda t: t.name)
def test_truncate_keeps_text_within_budget(tokenizer: Tokenizer, article_text: str) -> None:
    total = tokenizer.count(article_text)
    for budget in (1, 7, 50, 333, total - 1):
        kept, tokens, truncated = tokenizer.truncate(article_text, budget)
        assert truncated is True
        assert tokens == budget
        assert 0 < tokenizer.count(kept) <= budget
        assert article_text.startswith(kept)
        assert len(kept) < len(article_text)


@pytest.mark.parametrize("tokenizer", _tokenizers(), ids=lambda t: t.name)
def test_truncate_leaves_short_text_untouched(tokenizer: Tokenizer) -> None:
    total = tokenizer.count(SAMPLE)
    for budget in (total, total + 1, 10_000):
        assert tokenizer.truncate(SAMPLE, budget) == (SAMPLE, total, False)


def test_regex_truncate_cuts_at_a_word_boundary() -> None:
    kept, tokens, truncated = REGEX.truncate("one two, three four five", 3)
    assert (kept, tokens, truncated) == ("one two,", 3, True)
    assert REGEX.truncate("one two", 0) == ("", 0, True)


def test_truncate_returns_a_prefix_for_multibyte_text() -> None:
    tokenizer = tokenizer_for("gpt-4o-mini")
    text = "🍞 bread " * 20
    kept, _, _ = tokenizer.truncate(text, 1)
    assert text.startswith(kept)


# ---------------------------------------------------------------- chunk_text


def _first_chunk_with(sentence: str, chunks: list[str]) -> int:
    for i, chunk in enumerate(chunks):
        if sentence in chunk:
            return i
    raise AssertionError(f"sentence not in any chunk: {sentence!r}")


@pytest.mark.parametrize("tokenizer", _tokenizers(), ids=lambda t: t.name)
@pytest.mark.parametrize(("max_tokens", "overlap"), [(300, 40), (80, 20), (70, 0)])
def test_chunks_fit_and_cover_every_sentence_in_order(
    tokenizer: Tokenizer, article_text: str, max_tokens: int, overlap: int
) -> None:
    sentences = split_sentences(article_text)
    assert max(tokenizer.count(s) for s in sentences) <= max_tokens  # no sentence is cut
    chunks = chunk_text(article_text, tokenizer, max_tokens=max_tokens, overlap_tokens=overlap)
    assert len(chunks) >= 2
    for text, tokens in chunks:
        assert tokens == tokenizer.count(text)
        assert 0 < tokens <= max_tokens
    texts = [text for text, _ in chunks]
    positions = [_first_chunk_with(s, texts) for s in sentences]
    assert positions == sorted(positions)
    assert positions[0] == 0 and positions[-1] == len(chunks) - 1
    assert texts[0].startswith(sentences[0])
    assert texts[-1].endswith(sentences[-1])


@pytest.mark.parametrize("tokenizer", _tokenizers(), ids=lambda t: t.name)
def test_consecutive_chunks_overlap(tokenizer: Tokenizer) -> None:
    text = _uniform_text(30)
    sentences = split_sentences(text)
    assert len(sentences) == 30
    per_sentence = max(tokenizer.count(s) for s in sentences)
    chunks = [
        c
        for c, _ in chunk_text(
            text, tokenizer, max_tokens=5 * per_sentence, overlap_tokens=2 * per_sentence
        )
    ]
    assert len(chunks) >= 3
    for earlier, later in itertools.pairwise(chunks):
        shared = [s for s in sentences if s in earlier and s in later]
        assert shared, (earlier, later)
        assert later.startswith(shared[0])
        assert earlier.endswith(shared[-1])


@pytest.mark.parametrize("tokenizer", _tokenizers(), ids=lambda t: t.name)
def test_no_overlap_when_overlap_is_zero(tokenizer: Tokenizer) -> None:
    text = _uniform_text(30)
    sentences = split_sentences(text)
    per_sentence = max(tokenizer.count(s) for s in sentences)
    chunks = [
        c for c, _ in chunk_text(text, tokenizer, max_tokens=5 * per_sentence, overlap_tokens=0)
    ]
    assert len(chunks) >= 3
    appearances = [sum(s in c for c in chunks) for s in sentences]
    assert appearances == [1] * len(sentences)
    assert " ".join(chunks) == text


@pytest.mark.parametrize("tokenizer", _tokenizers(), ids=lambda t: t.name)
def test_overlong_sentence_is_cut_without_losing_words(tokenizer: Tokenizer) -> None:
    text = " ".join(f"word{i} and more" for i in range(400))  # one sentence, no full stop
    chunks = chunk_text(text, tokenizer, max_tokens=50, overlap_tokens=10)
    assert len(chunks) > 5
    assert all(tokenizer.count(c) <= 50 for c, _ in chunks)
    words = " ".join(c for c, _ in chunks).split()
    assert [w for w in words if w.startswith("word")] == [f"word{i}" for i in range(400)]


def test_chunk_text_of_empty_text() -> None:
    assert chunk_text("", tokenizer_for("gpt-4o-mini"), max_tokens=50, overlap_tokens=10) == []
    assert chunk_text(" \n\n ", REGEX, max_tokens=50, overlap_tokens=10) == []


def test_overlong_multibyte_sentence_keeps_every_character() -> None:
    text = "🍞 bread " * 150
    chunks = chunk_text(text, tokenizer_for("gpt-4o-mini"), max_tokens=50, overlap_tokens=0)
    assert "".join("".join(c for c, _ in chunks).split()) == "".join(text.split())


# ---------------------------------------------------------------- fit_to_budget


def test_fit_to_budget_truncates_a_long_article(article_text: str) -> None:
    tokenizer = tokenizer_for("gpt-4o-mini")
    assert tokenizer.count(article_text) > 500
    kept, truncated = fit_to_budget(article_text, "gpt-4o-mini", 200)
    assert truncated is True
    assert tokenizer.count(kept) <= 200
    assert article_text.startswith(kept)
    assert len(kept) > 200  # kept about 200 tokens of text, not a few characters


def test_fit_to_budget_keeps_an_article_within_budget(article_text: str) -> None:
    assert fit_to_budget(article_text, "gpt-4o-mini", 6000) == (article_text, False)
