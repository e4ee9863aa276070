"""One worker process of tests/test_limits.py: crawls pages or makes chat calls the way a
task does (real crawler and politeness, real openai client), under the limits shared through
the test database (BLOGQA_DATABASE_URL in its environment).

    python -m tests.limits_driver crawl URL...      fetch the URLs at once
    python -m tests.limits_driver chat N PARALLEL  N summaries, PARALLEL at a time
    python -m tests.limits_driver embed N PARALLEL N embedding requests, PARALLEL at a time
    python -m tests.limits_driver hold SCOPE LEASE take a slot of SCOPE, print "ready" and
                                                   keep it until killed

The other modes print "ready" once imported and set up, wait for a line on stdin (so that
every worker starts at once), then print one JSON line with their outcome.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from blogqa import crawl, limits
from blogqa.config import load_settings
from blogqa.embed import OpenAIEmbedder
from blogqa.errors import PageError
from blogqa.extract import extract_article
from blogqa.llm import OpenAIChat
from blogqa.politeness import CrawlPolicy

ARTICLE = Path(__file__).resolve().parents[1] / "include/blogqa/demo/articles"


def _go() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


async def _crawl(urls: list[str]) -> dict:
    settings = load_settings()
    policy = CrawlPolicy(settings)
    async with crawl.http_client(settings) as client:
        _go()

        async def one(url: str) -> str:
            try:
                fetched = await crawl.fetch(client, url, settings, policy=policy)
            except PageError as exc:
                return f"error: {exc}"
            return str(fetched.status)

        return {"results": await asyncio.gather(*(one(url) for url in urls))}


async def _chat(n: int, parallel: int) -> dict:
    settings = load_settings()
    html = (ARTICLE / "01-sourdough-starter.html").read_text("utf-8")
    article = extract_article(html)
    provider = OpenAIChat(settings)

    def request(i: int):
        return provider.summarize(url=f"https://x.test/{i}", title=article.title, text=article.text)

    return await _requests(provider, request, n, parallel)


async def _embed(n: int, parallel: int) -> dict:
    provider = OpenAIEmbedder(load_settings())
    return await _requests(
        provider, lambda i: provider.embed([f"passage {i} of a page"]), n, parallel
    )


async def _requests(provider, request, n: int, parallel: int) -> dict:
    """`n` requests (`request(i)`), `parallel` at a time, each's outcome "ok" or its error."""
    gate = asyncio.Semaphore(parallel)
    _go()

    async def one(i: int) -> str:
        async with gate:
            try:
                await request(i)
            except PageError as exc:
                return f"error: {exc}"
            return "ok"

    try:
        return {"results": await asyncio.gather(*(one(i) for i in range(n)))}
    finally:
        await provider.aclose()


async def _hold(scope: str, lease: float) -> None:
    shared = limits.SharedLimits.for_settings(load_settings())
    await shared.acquire(scope, max_slots=1, lease=lease)
    print("ready", flush=True)  # holding the slot (renewing its lease) until killed
    await asyncio.sleep(3600)


def main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "crawl":
        outcome = asyncio.run(_crawl(args))
    elif mode == "chat":
        outcome = asyncio.run(_chat(int(args[0]), int(args[1])))
    elif mode == "embed":
        outcome = asyncio.run(_embed(int(args[0]), int(args[1])))
    elif mode == "hold":
        asyncio.run(_hold(args[0], float(args[1])))
        return
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
