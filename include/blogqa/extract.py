"""Article extraction: main text and metadata of a fetched page.

Text and metadata come from one lxml parse and one ``trafilatura.bare_extraction`` call, with
options chosen by measurement on a ground-truth corpus (``bench/extraction_quality.py``) rather
than trafilatura's defaults, which also keep reader comments that do not belong to the article.
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import trafilatura
from lxml.html import HtmlElement
from trafilatura.settings import Document

from blogqa.errors import BlogqaError, PageError

logger = logging.getLogger(__name__)

# Options for trafilatura.bare_extraction, chosen with bench/extraction_quality.py on a
# ground-truth corpus (bench/README.md has the scores). Comments off is the whole gain over
# trafilatura's defaults: precision up, recall unchanged. favor_recall, favor_precision (on one
# page it keeps only a reprint notice), include_tables=False and deduplicate (one page empty)
# all scored lower. fast=True scores the same there but skips the readability/justext
# fallbacks that rescue unusual layouts, and saves only a small part of the extraction time.
EXTRACTION_OPTIONS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "include_comments": False,
        "include_tables": True,
        "favor_precision": False,
        "favor_recall": False,
        "fast": False,
        "deduplicate": False,
    }
)

# Fewer words than this is not an article but what is left of a login form, cookie wall or
# error page (e.g. "Username Password Log in"); the shortest article in aeb-dev has 66 words.
MIN_WORDS = 20

_LANG_RE = re.compile(r"[a-z]{2,3}")
_WORD_RE = re.compile(r"\w+")


@dataclass(frozen=True)
class Article:
    """Main text of a page and its metadata; a field is None when the page does not give it."""

    text: str
    title: str | None
    author: str | None
    published: datetime.date | None
    site_name: str | None
    language: str | None
    # the page's declared URL (<link rel=canonical>, og:url, JSON-LD), else the URL given
    canonical_url: str | None


class NothingExtractedError(BlogqaError, ValueError):
    """No main text could be extracted from a page (empty, login form, not HTML...)."""


def extract_article(html: str | bytes, url: str | None = None) -> Article:
    """Extract the article text and metadata of one page.

    Raises NothingExtractedError when the page holds no main text of at least MIN_WORDS words.
    """
    tree = trafilatura.load_html(html)
    document = None
    if tree is not None:
        document = trafilatura.bare_extraction(
            tree, url=url, with_metadata=True, **EXTRACTION_OPTIONS
        )
    text = document.text.strip() if isinstance(document, Document) and document.text else ""
    words = len(_WORD_RE.findall(text))
    if words < MIN_WORDS:
        raise NothingExtractedError(
            f"No article text could be extracted from {url or 'the page'}"
            f" ({words} words of main text, fewer than {MIN_WORDS})"
        )
    article = Article(
        text=text,
        title=_clean(document.title),
        author=_clean(document.author),
        published=_parse_date(document.date),
        site_name=_clean(document.sitename),
        language=_language(document.language) or _language(_html_lang(tree)),
        canonical_url=_clean(document.url),
    )
    logger.debug("extracted %d chars from %s", len(article.text), url)
    return article


def _clean(value: str | None) -> str | None:
    return (value.strip() or None) if value else None


def _parse_date(value: str | None) -> datetime.date | None:
    """trafilatura gives dates as YYYY-MM-DD strings."""
    if not value:
        return None
    try:
        return datetime.date.fromisoformat(value[:10])
    except ValueError:
        logger.debug("unparseable date %r", value)
        return None


def _html_lang(tree: HtmlElement) -> str | None:
    return tree.get("lang") or tree.get("{http://www.w3.org/XML/1998/namespace}lang")


def _language(value: str | None) -> str | None:
    """Primary subtag of a language tag, lower-cased: "en-US" and "EN_gb" give "en"."""
    if not value:
        return None
    primary = re.split(r"[-_]", value.strip(), maxsplit=1)[0].lower()
    return primary if _LANG_RE.fullmatch(primary) else None


# ---------------------------------------------------------------- a fetched page


@dataclass(frozen=True)
class Fetched:
    """A fetched response, as the crawler hands it to extraction. It lives here, not in
    blogqa.crawl, because extraction workers unpickle it: importing the crawler (httpx, the
    shared limits, psycopg) cost each fresh worker process more CPU than trafilatura did."""

    url: str
    final_url: str
    status: int
    body: bytes
    charset: str | None
    etag: str | None
    last_modified: str | None

    @property
    def not_modified(self) -> bool:
        return self.status == 304


def decode_page(fetched: Fetched) -> str | bytes:
    """The page as text when its declared charset really decodes it; otherwise the bytes,
    for trafilatura to detect the encoding (meta tag, then statistical detection)."""
    if fetched.charset:
        try:
            return fetched.body.decode(fetched.charset)
        except (LookupError, UnicodeDecodeError):  # unknown name, or the header lies
            logger.info(
                "url=%s stage=crawl declared charset %s does not fit; detecting",
                fetched.url,
                fetched.charset,
            )
    return fetched.body


def extract_page(fetched: Fetched) -> Article:
    """Main text and metadata; a page with none is a permanent per-URL failure."""
    html = decode_page(fetched)
    try:
        return extract_article(html, fetched.final_url)
    except NothingExtractedError as exc:
        raise PageError(str(exc), stage="crawl", permanent=True) from None
