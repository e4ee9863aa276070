"""Extraction in worker processes: same result as in-process, errors and timeouts intact."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from blogqa import crawl, extraction_pool
from blogqa.errors import PageError
from tests.fakes import ARTICLE_FILES, ARTICLES


def page(body: bytes, url: str = "https://example.com/post") -> crawl.Fetched:
    return crawl.Fetched(url, url, 200, body, "utf-8", None, None)


@pytest.fixture
def pooled(settings):
    yield dataclasses.replace(settings, extract_workers=2)
    extraction_pool.discard_pool()


def test_pool_gives_the_same_article_as_in_process(pooled):
    fetched = page(ARTICLES.joinpath(ARTICLE_FILES[0]).read_bytes())
    assert asyncio.run(extraction_pool.extract_async(fetched, pooled)) == crawl.extract(fetched)


def test_pool_errors_keep_their_class_and_status(pooled):
    login = page(b"<html><body><form><input name=u><input type=password></form></body></html>")
    with pytest.raises(PageError) as caught:
        asyncio.run(extraction_pool.extract_async(login, pooled))
    assert caught.value.permanent is True and caught.value.stage == "crawl"


def test_timeout_is_transient_and_the_pool_recovers(pooled):
    fetched = page(ARTICLES.joinpath(ARTICLE_FILES[1]).read_bytes())
    hasty = dataclasses.replace(pooled, extract_timeout=0.0001)

    async def both():
        with pytest.raises(PageError, match="extraction took longer") as caught:
            await extraction_pool.extract_async(fetched, hasty)
        assert caught.value.permanent is False
        return await extraction_pool.extract_async(fetched, pooled)

    assert asyncio.run(both()).title == crawl.extract(fetched).title
