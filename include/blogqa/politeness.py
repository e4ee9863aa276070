"""Crawl politeness: robots.txt rules and per-host pacing.

A site's robots.txt is fetched at most once per origin while the stored copy is fresh
(`blogqa.robots_txt`, shared by every worker and run), so a run of thousands of pages from one
blog costs that blog one robots request. Per host, at most BLOGQA_PER_HOST_CONCURRENCY
requests run at a time and a Crawl-delay spaces their starts (capped by
BLOGQA_MAX_CRAWL_DELAY_SECONDS so one site cannot stall a chunk for hours). Both are kept in
the results database (`blogqa.limits`), so they hold across every crawl task running at once,
on any worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx
import psycopg
from protego import Protego

from blogqa import sql_queries
from blogqa.config import Settings
from blogqa.errors import PageError
from blogqa.limits import HostLimits

log = logging.getLogger(__name__)

SQL = sql_queries.load(__name__)  # queries/politeness.sql

STAGE = "crawl"
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to parse at least 500 KiB
ROBOTS_MAX_REDIRECTS = 5


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass(frozen=True)
class RobotsFile:
    """One origin's robots.txt as fetched (status and text)."""

    status: int
    body: str

    def parser(self) -> Protego:
        # Protego (Scrapy's parser) follows RFC 9309: wildcards, longest match, fractional
        # Crawl-delay. A 4xx robots.txt means no rules: everything allowed.
        return Protego.parse(self.body if 200 <= self.status < 300 else "")


def load_cached(conn: psycopg.Connection, origins: list[str], ttl: int) -> dict[str, RobotsFile]:
    rows = conn.execute(SQL.load_robots, (sorted(set(origins)), ttl)).fetchall()
    return {origin: RobotsFile(status, body) for origin, status, body in rows}


def save_fetched(conn: psycopg.Connection, files: dict[str, RobotsFile]) -> None:
    if not files:
        return
    origins = sorted(files)
    conn.execute(
        SQL.save_robots,
        (origins, [files[o].status for o in origins], [files[o].body for o in origins]),
    )


@dataclass
class CrawlPolicy:
    """What a crawl task may fetch and how fast: robots rules plus per-host slots.

    Built per task with the robots files already stored; `fetched` collects the ones this
    task downloaded so the caller can store them. `hosts` (default: the shared limits of the
    settings' results database) holds the per-host slots and Crawl-delay reservations.
    """

    settings: Settings
    cached: dict[str, RobotsFile] = field(default_factory=dict)
    fetched: dict[str, RobotsFile] = field(default_factory=dict)
    hosts: HostLimits | None = None
    _parsers: dict[str, Protego] = field(default_factory=dict)
    _pending: dict[str, asyncio.Future] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hosts is None:
            self.hosts = HostLimits(self.settings)

    async def check(self, client: httpx.AsyncClient, url: str) -> float:
        """Raise a `skipped` PageError when robots.txt forbids `url`; return its Crawl-delay.

        `client` is the crawler's (`blogqa.crawl.http_client`): its transport vets the address
        of every connection, so a robots.txt host (or redirect) that resolves to a refused
        address raises the same permanent PageError as a page would.
        """
        if not self.settings.respect_robots:
            return 0.0
        rules = await self._rules(client, origin_of(url))
        agent = self.settings.user_agent.split("/", 1)[0].strip()  # the product token
        if not rules.can_fetch(url, agent):
            raise PageError(
                f"robots.txt of {origin_of(url)} disallows {url}",
                stage=STAGE,
                permanent=True,
                terminal_status="skipped",
            )
        delay = float(rules.crawl_delay(agent) or 0.0)
        return min(delay, self.settings.max_crawl_delay)

    @contextlib.asynccontextmanager
    async def slot(self, url: str, delay: float = 0.0) -> AsyncIterator[None]:
        """Hold one of the host's request slots (shared by every crawl task), started no
        sooner than its Crawl-delay allows after the host's previous start."""
        assert self.hosts is not None
        async with self.hosts.slot(urlsplit(url).netloc, delay):
            yield

    async def _rules(self, client: httpx.AsyncClient, origin: str) -> Protego:
        if origin in self._parsers:
            return self._parsers[origin]
        if origin in self._pending:  # another page of this host is fetching it right now
            return await asyncio.shield(self._pending[origin])
        future = asyncio.get_running_loop().create_future()
        self._pending[origin] = future
        try:
            robots = self.cached.get(origin)
            if robots is None:
                robots = await self._download(client, origin)
                self.fetched[origin] = robots
            rules = robots.parser()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._pending[origin]
        self._parsers[origin] = rules
        future.set_result(rules)
        return rules

    async def _download(self, client: httpx.AsyncClient, origin: str) -> RobotsFile:
        """GET /robots.txt following a few redirects (each hop's address vetted by the
        client's transport as it connects)."""
        url = origin + "/robots.txt"
        for _hop in range(ROBOTS_MAX_REDIRECTS + 1):
            try:
                async with (
                    self.slot(url),
                    client.stream(
                        "GET", url, headers={"User-Agent": self.settings.user_agent}
                    ) as r,
                ):
                    if r.status_code in (301, 302, 303, 307, 308) and "location" in r.headers:
                        url = urljoin(url, r.headers["location"])
                        continue
                    return await self._robots_file(r, origin)
            except httpx.HTTPError as exc:
                raise PageError(
                    f"robots.txt of {origin} unreachable ({exc!r}); retrying later",
                    stage=STAGE,
                    permanent=False,
                ) from None
        log.warning("stage=crawl robots.txt of %s redirects too often; treated as absent", origin)
        return RobotsFile(404, "")

    @staticmethod
    async def _robots_file(response: httpx.Response, origin: str) -> RobotsFile:
        status = response.status_code
        if status >= 500 or status == 429:
            # RFC 9309: an unreachable robots.txt means "disallow all" for now; retry later.
            raise PageError(
                f"robots.txt of {origin} answered HTTP {status}; retrying later",
                stage=STAGE,
                permanent=False,
            )
        if not 200 <= status < 300:
            log.info("stage=crawl robots.txt of %s: HTTP %s, no rules", origin, status)
            return RobotsFile(status, "")
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) >= ROBOTS_MAX_BYTES:
                break
        text = bytes(body[:ROBOTS_MAX_BYTES]).decode("utf-8", errors="replace")
        log.info("stage=crawl robots.txt of %s: %d bytes", origin, len(text))
        return RobotsFile(status, text)
