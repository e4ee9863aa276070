"""Discovery: feeds, sitemaps and sites polled for new or changed URLs.

A source (blogqa.sources) is a feed (RSS or Atom), a sitemap (a urlset, or a sitemap index
whose child sitemaps are read too, newest first, at most MAX_CHILD_SITEMAPS), or a site
(its robots.txt `Sitemap:` lines and the feeds its home page links with
`<link rel="alternate" type="application/rss+xml|atom+xml">`, else /sitemap.xml).

Every fetch goes through the crawler (`blogqa.crawl.fetch` on `crawl.http_client`): the same
address vetting (no private or metadata addresses unless allowed), robots.txt rules and
per-host pacing, redirects and size cap as pages. A source document fetched before is asked
for with a conditional GET (its ETag / Last-Modified). What a source lists is remembered in
blogqa.source_entries; a poll enqueues the entries that are new or whose lastmod (sitemap
`<lastmod>`, feed `<updated>`/`<pubDate>`) changed, newest first, at most the source's
`max_per_poll`; the rest wait for the next poll (also when the source itself is unchanged).
An entry robots.txt disallows is not enqueued. A changed entry whose URL is already done is
requeued (its refetch is a conditional GET; unchanged content costs no model call).

The XML is parsed by lxml with entity resolution and network access off. Gzipped sitemaps
(.xml.gz) are not read.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from urllib.parse import urljoin

import psycopg
from lxml import etree, html

from blogqa import db, politeness, queue, sql_queries
from blogqa.config import Settings
from blogqa.crawl import HTML_TYPES, XML_TYPES, Validators, fetch, http_client
from blogqa.errors import BlogqaError, PageError
from blogqa.politeness import CrawlPolicy
from blogqa.urls import InvalidURLError, normalize_url

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/sources.sql

KINDS = ("feed", "sitemap", "site")
MAX_CHILD_SITEMAPS = 20
MAX_ENTRIES = 50_000  # a sitemap's own limit
FEED_TYPES = ("application/rss+xml", "application/atom+xml")
_XML_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, huge_tree=False, recover=True
)


class SourceError(BlogqaError):
    """A source URL or kind the table refuses; the message says why."""


# ---------------------------------------------------------------- the table


def add(conn: psycopg.Connection, url: str, *, kind: str = "site", max_per_poll: int = 100) -> dict:
    """Follow a source (adding it again updates its kind and limit)."""
    if kind not in KINDS:
        raise SourceError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    if max_per_poll < 1:
        raise SourceError("--max-per-poll must be at least 1")
    try:
        url = normalize_url(url)
    except InvalidURLError as exc:
        raise SourceError(f"{url!r}: {exc}") from None
    cur = conn.execute(SQL.add, (url, kind, max_per_poll))
    names = [d.name for d in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def remove(conn: psycopg.Connection, target: str) -> bool:
    """Stop following a source (by id or URL); its remembered entries go with it."""
    text = target.strip()
    if text.isdigit():
        cur = conn.execute(SQL.remove_by_id, (int(text),))
    else:
        try:
            url = normalize_url(text)
        except InvalidURLError:
            return False
        cur = conn.execute(SQL.remove_by_url, (url,))
    return cur.rowcount > 0


def list_sources(conn: psycopg.Connection) -> list[dict]:
    cur = conn.execute(SQL.list)
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# ---------------------------------------------------------------- parsing


def _local(tag) -> str:
    return etree.QName(tag).localname.lower() if isinstance(tag, str) else ""


def _xml(body: bytes):
    try:
        root = etree.fromstring(body, parser=_XML_PARSER)
    except etree.XMLSyntaxError:
        root = None
    if root is None:
        raise PageError("not a well-formed XML document", stage="discover", permanent=True)
    return root


def _child_text(element, *names: str) -> str | None:
    for child in element:
        if _local(child.tag) in names and (child.text or "").strip():
            return child.text.strip()
    return None


def parse_sitemap(body: bytes, base: str) -> tuple[list[tuple[str, str | None]], list]:
    """(pages, child sitemaps) of a urlset or sitemap index, each as (url, lastmod)."""
    root = _xml(body)
    pages, children = [], []
    for element in root.iter():
        name = _local(element.tag)
        if name not in ("url", "sitemap"):
            continue
        loc = _child_text(element, "loc")
        if not loc:
            continue
        entry = (urljoin(base, loc), _child_text(element, "lastmod"))
        (pages if name == "url" else children).append(entry)
    return pages[:MAX_ENTRIES], children


def parse_feed(body: bytes, base: str) -> list[tuple[str, str | None]]:
    """The entries of an RSS (0.9x/1.0/2.0) or Atom feed as (url, updated)."""
    root = _xml(body)
    entries = []
    for element in root.iter():
        name = _local(element.tag)
        if name == "item":  # RSS
            link = _child_text(element, "link")
            stamp = _child_text(element, "updated", "pubdate", "date", "modified")
        elif name == "entry":  # Atom
            link = None
            for child in element:
                if _local(child.tag) == "link" and child.get("rel", "alternate") == "alternate":
                    link = child.get("href")
                    break
            stamp = _child_text(element, "updated", "published")
        else:
            continue
        if link:
            entries.append((urljoin(base, link.strip()), stamp))
    return entries[:MAX_ENTRIES]


def site_feeds(body: bytes, base: str) -> list[str]:
    """Feeds a home page links with <link rel="alternate" type="application/rss+xml">."""
    try:
        document = html.fromstring(body)
    except (etree.ParserError, ValueError):
        return []
    found = []
    for link in document.iter("link"):
        rel = (link.get("rel") or "").lower().split()
        if "alternate" in rel and (link.get("type") or "").lower() in FEED_TYPES:
            href = link.get("href")
            if href:
                found.append(urljoin(base, href))
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------- polling


@dataclass
class PollResult:
    """One source's poll: what it listed, what was enqueued, and how the fetch went."""

    source_id: int
    url: str
    status: str = "ok"  # ok | not modified | error
    found: int = 0
    enqueued: int = 0
    error: str | None = None
    entries: list[tuple[str, str | None]] = field(default_factory=list, repr=False)
    etag: str | None = None
    last_modified: str | None = None

    def as_dict(self) -> dict:
        return {
            "source_id": self.source_id,
            "url": self.url,
            "status": self.status,
            "found": self.found,
            "enqueued": self.enqueued,
            "error": self.error,
        }


async def _get(client, url: str, settings: Settings, policy, accept, validators=None):
    return await fetch(client, url, settings, validators, policy, accept=accept)


async def _read_sitemap(client, url, settings, policy, result: PollResult, fetched) -> None:
    pages, children = parse_sitemap(fetched.body, fetched.final_url)
    result.entries += pages
    children.sort(key=lambda child: child[1] or "", reverse=True)
    for child, _ in children[:MAX_CHILD_SITEMAPS]:
        try:
            sub = await _get(client, child, settings, policy, XML_TYPES)
            result.entries += parse_sitemap(sub.body, sub.final_url)[0]
        except PageError as exc:
            log.warning("url=%s stage=discover child sitemap not read: %s", child, exc)


async def _poll_one(client, source: dict, settings: Settings, policy) -> PollResult:
    result = PollResult(source["id"], source["url"])
    url, kind = source["url"], source["kind"]
    try:
        if kind == "site":
            await _poll_site(client, url, settings, policy, result)
        else:
            validators = Validators(source["etag"], source["last_modified"])
            fetched = await _get(client, url, settings, policy, XML_TYPES, validators)
            if fetched.not_modified:
                result.status = "not modified"
                return result
            result.etag, result.last_modified = fetched.etag, fetched.last_modified
            if kind == "feed":
                result.entries = parse_feed(fetched.body, fetched.final_url)
            else:
                await _read_sitemap(client, url, settings, policy, result, fetched)
    except PageError as exc:
        result.status, result.error = "error", str(exc)
        log.warning("url=%s stage=discover source not polled: %s", url, exc)
    result.found = len(result.entries)
    return result


async def _poll_site(client, url: str, settings: Settings, policy, result: PollResult) -> None:
    """A site: the sitemaps its robots.txt names and the feeds its home page links."""
    robots = politeness.origin_of(url) + "/robots.txt"
    sitemaps = []
    try:
        fetched = await _get(client, robots, settings, policy, ("text/plain",))
        text = fetched.body.decode("utf-8", "replace")
        sitemaps = [
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.lower().startswith("sitemap:")
        ]
    except PageError as exc:
        log.info("url=%s stage=discover no robots.txt sitemaps: %s", robots, exc)
    home = await _get(client, url, settings, policy, HTML_TYPES)
    feeds = site_feeds(home.body, home.final_url)
    if not sitemaps and not feeds:
        sitemaps = [politeness.origin_of(url) + "/sitemap.xml"]
    for feed in feeds:
        try:
            fetched = await _get(client, feed, settings, policy, XML_TYPES)
            result.entries += parse_feed(fetched.body, fetched.final_url)
        except PageError as exc:
            log.warning("url=%s stage=discover feed not read: %s", feed, exc)
    for sitemap in sitemaps:
        try:
            fetched = await _get(client, sitemap, settings, policy, XML_TYPES)
            await _read_sitemap(client, sitemap, settings, policy, result, fetched)
        except PageError as exc:
            log.warning("url=%s stage=discover sitemap not read: %s", sitemap, exc)


def _normalized(entries: list[tuple[str, str | None]]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for raw, lastmod in entries:
        try:
            found.setdefault(normalize_url(raw), lastmod)
        except InvalidURLError:
            log.info("url=%s stage=discover entry skipped: not a valid URL", raw)
    return found


async def _allowed(client, policy: CrawlPolicy, urls: list[str]) -> set[str]:
    allowed = set()
    for url in urls:
        try:
            await policy.check(client, url)
            allowed.add(url)
        except PageError as exc:
            log.info("url=%s stage=discover not enqueued: %s", url, exc)
    return allowed


async def _poll_all(conn, sources: list[dict], settings: Settings, policy) -> list[PollResult]:
    results = []
    async with http_client(settings) as client:
        for source in sources:
            result = await _poll_one(client, source, settings, policy)
            entries = _normalized(result.entries)
            if entries:
                conn.execute(SQL.upsert_entries, (source["id"], list(entries)))
                due = conn.execute(
                    SQL.due, (list(entries), list(entries.values()), source["id"])
                ).fetchall()
                conn.execute(
                    SQL.pending_lastmod, (list(entries), list(entries.values()), source["id"])
                )
            else:
                due = conn.execute(SQL.backlog, (source["id"],)).fetchall()
            limit = source["max_per_poll"]
            wanted = due[: limit * 2]  # room for some robots refusals
            allowed = await _allowed(client, policy, [url for url, _, _ in wanted])
            chosen = [row for row in wanted if row[0] in allowed][:limit]
            new = [url for url, _, seen in chosen if not seen]
            changed = [url for url, _, seen in chosen if seen]
            added = queue.enqueue(conn, new, max_attempts=settings.max_attempts)
            again = queue.enqueue(conn, changed, force=True, max_attempts=settings.max_attempts)
            conn.execute(
                SQL.mark_enqueued,
                (
                    [url for url, _, _ in chosen],
                    [lastmod for _, lastmod, _ in chosen],
                    source["id"],
                ),
            )
            result.enqueued = len(added.new) + len(added.requeued) + len(again.requeued)
            result.enqueued += len(again.new)
            conn.execute(
                SQL.source_polled,
                (
                    result.status,
                    result.error,
                    result.found,
                    result.enqueued,
                    result.etag,
                    result.last_modified,
                    source["id"],
                ),
            )
            log.info(
                "url=%s stage=discover %s: %d listed, %d due, %d enqueued",
                source["url"],
                result.status,
                result.found,
                len(due),
                result.enqueued,
            )
            results.append(result)
    return results


def poll_all(settings: Settings) -> list[PollResult]:
    """Poll every enabled source once and enqueue what is new or changed (the nightly run's
    first step, and `blogqa sources poll`). A source that cannot be read is recorded with
    its error; the others are polled all the same."""
    with db.connect(settings) as conn:
        cur = conn.execute(SQL.sources_due)
        names = [d.name for d in cur.description]
        sources = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        if not sources:
            return []
        origins = sorted({politeness.origin_of(s["url"]) for s in sources})
        policy = CrawlPolicy(
            settings, cached=politeness.load_cached(conn, origins, settings.robots_ttl_seconds)
        )
        results = asyncio.run(_poll_all(conn, sources, settings, policy))
        politeness.save_fetched(conn, policy.fetched)
    return results
