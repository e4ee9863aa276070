"""Tests of fetching and extraction (blogqa.crawl) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from blogqa import crawl
from blogqa.config import Settings
from blogqa.crawl import Validators
from blogqa.errors import PageError
from blogqa.extract import Fetched, extract_page

ARTICLE = "/articles/01-sourdough-starter.html"


def _fetch(settings: Settings, url: str, validators: Validators | None = None) -> Fetched:
    async def run() -> Fetched:
        async with crawl.http_client(settings) as client:
            return await crawl.fetch(client, url, settings, validators)

    return asyncio.run(run())


def _fetch_error(settings: Settings, url: str) -> PageError:
    with pytest.raises(PageError) as info:
        _fetch(settings, url)
    assert info.value.stage == "crawl"
    return info.value


def test_fetch_article(page_server, settings) -> None:
    url = page_server.base_url + ARTICLE
    fetched = _fetch(settings, url)
    assert fetched.status == 200
    assert fetched.not_modified is False
    assert fetched.url == fetched.final_url == url
    assert fetched.etag and fetched.etag.startswith('"')
    assert fetched.last_modified == "Mon, 02 Nov 2026 10:00:00 GMT"
    assert fetched.charset == "utf-8"
    assert b"Sourdough" in fetched.body


def test_conditional_get_returns_not_modified(page_server, settings) -> None:
    url = page_server.base_url + ARTICLE
    first = _fetch(settings, url)
    before = page_server.not_modified
    again = _fetch(settings, url, Validators(etag=first.etag, last_modified=first.last_modified))
    assert again.status == 304
    assert again.not_modified is True
    assert again.body == b""
    assert page_server.not_modified == before + 1

    stale = _fetch(settings, url, Validators(etag='"someone-else"'))
    assert stale.status == 200 and stale.etag == first.etag


def test_redirect_is_followed(page_server, settings) -> None:
    url = page_server.base_url + "/hop"
    fetched = _fetch(settings, url)
    assert fetched.status == 200
    assert fetched.url == url
    assert fetched.final_url == page_server.base_url + "/articles/06-easy-runs-zone-2.html"
    article = extract_page(fetched)
    assert len(article.text.split()) > 100


def test_redirect_not_followed_with_max_redirects_zero(page_server, settings) -> None:
    error = _fetch_error(
        dataclasses.replace(settings, max_redirects=0), page_server.base_url + "/hop"
    )
    assert error.permanent is True
    assert "redirects" in str(error)


def test_redirect_loop_is_permanent(page_server, settings) -> None:
    limited = dataclasses.replace(settings, max_redirects=3)
    before = page_server.hits.get("/loop", 0)
    error = _fetch_error(limited, page_server.base_url + "/loop")
    assert error.permanent is True
    assert "more than 3 redirects" in str(error)
    assert page_server.hits["/loop"] - before == 4


def test_page_over_the_size_cap_is_permanent(page_server, settings) -> None:
    small = dataclasses.replace(settings, max_page_bytes=1_000_000)
    error = _fetch_error(small, page_server.base_url + "/huge")
    assert error.permanent is True
    assert "1000000-byte cap" in str(error)


def test_page_under_the_default_cap_is_read_whole(page_server, settings) -> None:
    fetched = _fetch(settings, page_server.base_url + "/huge")
    assert fetched.status == 200
    assert len(fetched.body) > 3_000_000


def test_non_html_is_skipped(page_server, settings) -> None:
    error = _fetch_error(settings, page_server.base_url + "/report.pdf")
    assert error.permanent is True
    assert error.terminal_status == "skipped"
    assert "application/pdf" in str(error)


def test_service_unavailable_is_transient_with_retry_after(page_server, settings) -> None:
    error = _fetch_error(settings, page_server.base_url + "/unavailable")
    assert error.permanent is False
    assert error.retry_after == 120
    assert "503" in str(error)


@pytest.mark.parametrize("path", ["/gone", "/articles/no-such-article.html", "/nowhere"])
def test_not_found_is_permanent(page_server, settings, path: str) -> None:
    error = _fetch_error(settings, page_server.base_url + path)
    assert error.permanent is True
    assert error.terminal_status == "dead"
    assert "404" in str(error)


def test_private_address_refused_unless_allowed(page_server, settings) -> None:
    strict = dataclasses.replace(settings, crawl_allow_private=False)
    path = "/private-address-probe"
    error = _fetch_error(strict, page_server.base_url + path)
    assert error.permanent is True
    assert "BLOGQA_CRAWL_ALLOW_PRIVATE" in str(error)
    assert "127.0.0.1" in str(error)
    assert path not in page_server.hits

    error = _fetch_error(strict, page_server.base_url + ARTICLE)
    assert "BLOGQA_CRAWL_ALLOW_PRIVATE" in str(error)


def test_unreachable_host_is_transient(settings) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = _fetch_error(settings, f"http://127.0.0.1:{port}/")
    assert error.permanent is False


def test_latin1_page_is_decoded(page_server, settings) -> None:
    fetched = _fetch(settings, page_server.base_url + "/latin1")
    assert fetched.charset == "iso-8859-1"
    article = extract_page(fetched)
    assert "crème fraîche" in article.text
    assert "\ufffd" not in article.text
    assert "Ã" not in article.text


def test_extract_article(page_server, settings) -> None:
    article = extract_page(_fetch(settings, page_server.base_url + ARTICLE))
    assert article.title and "Sourdough" in article.title
    assert len(article.text.split()) > 300
    assert "<p>" not in article.text


def test_extract_login_page_is_permanent(page_server, settings) -> None:
    fetched = _fetch(settings, page_server.base_url + "/login")
    assert fetched.status == 200
    with pytest.raises(PageError) as info:
        extract_page(fetched)
    assert info.value.permanent is True
    assert info.value.stage == "crawl"


def test_content_hash_ignores_whitespace_layout() -> None:
    assert crawl.content_hash("a  b\n\nc ") == crawl.content_hash("a b c")
    assert crawl.content_hash("a b c") != crawl.content_hash("a b d")
