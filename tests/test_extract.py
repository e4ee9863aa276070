"""Tests of article extraction (blogqa.extract) and of its scoring rule (blogqa.extraction_score)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import trafilatura

from blogqa.extract import Article, NothingExtractedError, extract_article
from blogqa.extraction_score import corpus_f1, load_corpus, score_page, shingles

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "../shared/corpus/aeb-dev"

PARAGRAPHS = "\n".join(
    f"<p>Paragraph {i} of the article explains how sourdough starters ferment flour and water "
    f"over several days, and why the temperature of the kitchen matters for the bread.</p>"
    for i in range(1, 7)
)
ARTICLE_PAGE = f"""<!DOCTYPE html>
<html lang="en-GB">
<head>
  <meta charset="utf-8">
  <title>Keeping a sourdough starter alive | The Bread Journal</title>
  <meta property="og:title" content="Keeping a sourdough starter alive">
  <meta property="og:site_name" content="The Bread Journal">
  <meta name="author" content="Jane Baker">
  <meta property="article:published_time" content="2024-03-05T09:30:00Z">
  <link rel="canonical" href="https://bread.example.com/posts/sourdough-starter">
</head>
<body>
  <nav><a href="/">Home</a> <a href="/about">About</a></nav>
  <article>
    <h1>Keeping a sourdough starter alive</h1>
    {PARAGRAPHS}
  </article>
  <footer>Copyright The Bread Journal</footer>
</body>
</html>"""


def _article_text(html: str) -> str | None:
    try:
        return extract_article(html).text
    except NothingExtractedError:
        return None


def test_corpus_f1_at_least_trafilatura_default() -> None:
    if not (CORPUS / "ground-truth.json").is_file():
        pytest.skip("corpus ../shared/corpus/aeb-dev is absent")
    pages = load_corpus(CORPUS)
    default = corpus_f1((trafilatura.extract(html), expected) for _, html, expected in pages)
    ours = corpus_f1((_article_text(html), expected) for _, html, expected in pages)
    assert ours["pages"] == default["pages"] == len(pages) > 0
    assert ours["f1"] >= default["f1"], (ours, default)


def test_metadata_from_small_page() -> None:
    article = extract_article(ARTICLE_PAGE, url="https://bread.example.com/p?id=7")
    assert isinstance(article, Article)
    assert "Paragraph 1 of the article" in article.text
    assert "Paragraph 6 of the article" in article.text
    assert "Copyright" not in article.text
    assert article.title == "Keeping a sourdough starter alive"
    assert article.author == "Jane Baker"
    assert article.published == datetime.date(2024, 3, 5)
    assert article.site_name == "The Bread Journal"
    assert article.language == "en"
    assert article.canonical_url == "https://bread.example.com/posts/sourdough-starter"


def test_bytes_input_gives_same_article() -> None:
    assert extract_article(ARTICLE_PAGE.encode("utf-8")) == extract_article(ARTICLE_PAGE)


@pytest.mark.parametrize(
    "html",
    [
        "<html><head><title>Nothing</title></head><body></body></html>",
        """<html lang="en"><head><title>Sign in</title></head><body>
        <form action="/login" method="post">
          <label>Username <input name="user"></label>
          <label>Password <input name="password" type="password"></label>
          <button type="submit">Log in</button>
        </form></body></html>""",
        "",
    ],
    ids=["empty-body", "login-form", "empty-string"],
)
def test_nothing_extracted(html: str) -> None:
    url = "https://example.com/login"
    with pytest.raises(NothingExtractedError, match=r"No article text.*example\.com/login"):
        extract_article(html, url=url)


def test_nothing_extracted_is_a_value_error() -> None:
    assert issubclass(NothingExtractedError, ValueError)


def test_shingles_lowercase_word_tokens_with_multiplicity() -> None:
    assert shingles("A, b; C. d!") == {("a", "b", "c", "d"): 1}
    assert shingles("a b c") == {}
    assert shingles("a b c d a b c d")[("a", "b", "c", "d")] == 2


@pytest.mark.parametrize(
    ("extracted", "expected", "p", "r"),
    [
        ("a b c d e", "a b c d e", 1.0, 1.0),
        ("a b c d", "a b c d e", 1.0, 0.5),  # its 1 shingle is shared; 1 of 2 expected
        ("a b c d x", "a b c d e", 0.5, 0.5),  # 1 of its 2 shingles shared
        ("a b c d a b c d", "a b c d", 0.2, 1.0),  # 5 shingles, "a b c d" shared once
        ("w x y z", "a b c d", 0.0, 0.0),
        ("", "a b c d", 0.0, 0.0),
        (None, "a b c d", 0.0, 0.0),
    ],
)
def test_score_page(extracted: str | None, expected: str, p: float, r: float) -> None:
    assert score_page(extracted, expected) == pytest.approx((p, r))


def test_corpus_f1_averages_pages_then_combines() -> None:
    scores = corpus_f1([("a b c d", "a b c d e"), ("a b c d a b c d", "a b c d")])
    assert scores["precision"] == pytest.approx(0.6)  # (1 + 0.2) / 2
    assert scores["recall"] == pytest.approx(0.75)  # (0.5 + 1) / 2
    assert scores["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert scores["pages"] == 2
    assert corpus_f1([])["f1"] == 0.0
