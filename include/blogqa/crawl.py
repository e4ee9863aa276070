"""Fetch pages politely and safely, then extract the article.

httpx with connect/read timeouts, a streamed body cap, manual redirects (each hop re-checked),
a content-type check, a descriptive User-Agent and conditional GET for pages seen before.
Loopback/private/link-local/multicast addresses are refused unless BLOGQA_CRAWL_ALLOW_PRIVATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import hashlib
import ipaddress
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from blogqa.config import Settings
from blogqa.errors import PageError
from blogqa.extract import Article, NothingExtractedError, extract_article
from blogqa.politeness import CrawlPolicy

log = logging.getLogger(__name__)

STAGE = "crawl"
HTML_TYPES = ("text/html", "application/xhtml+xml")
REDIRECT_CODES = (301, 302, 303, 307, 308)
GONE_CODES = (404, 410)
TRANSIENT_CODES = (408, 425, 429, 500, 502, 503, 504)


@dataclass(frozen=True)
class Validators:
    """What the last fetch told us, for a conditional GET."""

    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class Fetched:
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


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)


def _blocked(address: str, allowed: tuple = ()) -> bool:
    """Non-public (loopback, private, link-local incl. cloud metadata, multicast, reserved)
    unless it falls in an operator-allowed network."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allowed):
        return False
    return not ip.is_global or ip.is_multicast


async def check_address(url: str, settings: Settings) -> None:
    """Refuse hosts that resolve to non-public addresses (SSRF guard) unless allowed."""
    if settings.crawl_allow_private:
        return
    host = urlsplit(url).hostname or ""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PageError(f"cannot resolve host {host!r}: {exc}", stage=STAGE, permanent=False)
    for info in infos:
        address = info[4][0]
        if _blocked(address, settings.crawl_allow_networks):
            raise PageError(
                f"host {host!r} resolves to non-public address {address}; refused "
                "(set BLOGQA_CRAWL_ALLOW_PRIVATE=true to crawl private networks)",
                stage=STAGE,
                permanent=True,
            )


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip("\"'").lower()
    return None


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    settings: Settings,
    validators: Validators | None = None,
    policy: CrawlPolicy | None = None,
) -> Fetched:
    """GET `url` following at most `max_redirects` redirects, each hop address-checked and,
    with a `policy`, allowed by robots.txt and paced per host."""
    headers = {"User-Agent": settings.user_agent, "Accept": "text/html,application/xhtml+xml"}
    if validators and validators.etag:
        headers["If-None-Match"] = validators.etag
    if validators and validators.last_modified:
        headers["If-Modified-Since"] = validators.last_modified
    current = url
    for _hop in range(settings.max_redirects + 1):
        if urlsplit(current).scheme not in ("http", "https"):
            raise PageError(f"redirected to unsupported URL {current}", stage=STAGE, permanent=True)
        await check_address(current, settings)
        delay = 0.0
        if policy is not None:
            delay = await policy.check(client, current, lambda u: check_address(u, settings))
        paced = policy.slot(current, delay) if policy is not None else contextlib.nullcontext()
        try:
            async with paced, client.stream("GET", current, headers=headers) as response:
                if response.status_code in REDIRECT_CODES and "location" in response.headers:
                    current = urljoin(current, response.headers["location"])
                    continue
                return await _read(response, url, current, settings)
        except httpx.TimeoutException as exc:
            raise PageError(f"timed out fetching {current}: {exc!r}", stage=STAGE, permanent=False)
        except httpx.TransportError as exc:
            raise PageError(f"could not fetch {current}: {exc!r}", stage=STAGE, permanent=False)
    raise PageError(
        f"more than {settings.max_redirects} redirects (last {current})",
        stage=STAGE,
        permanent=True,
    )


async def _read(response: httpx.Response, url: str, final_url: str, settings: Settings) -> Fetched:
    status = response.status_code
    if status == 304:
        return Fetched(url, final_url, 304, b"", None, None, None)
    if status in GONE_CODES:
        raise PageError(f"HTTP {status} for {final_url}", stage=STAGE, permanent=True)
    if status in TRANSIENT_CODES:
        raise PageError(
            f"HTTP {status} for {final_url}",
            stage=STAGE,
            permanent=False,
            retry_after=_retry_after_seconds(response.headers.get("retry-after")),
        )
    if status >= 400 or status < 200 or status in REDIRECT_CODES:
        raise PageError(f"HTTP {status} for {final_url}", stage=STAGE, permanent=True)
    content_type = response.headers.get("content-type", "")
    mime = content_type.split(";")[0].strip().lower()
    if mime and mime not in HTML_TYPES:
        raise PageError(
            f"not an HTML page (Content-Type {mime})",
            stage=STAGE,
            permanent=True,
            terminal_status="skipped",
        )
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_page_bytes:
        raise PageError(
            f"page is {declared} bytes, over the {settings.max_page_bytes}-byte cap",
            stage=STAGE,
            permanent=True,
        )
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > settings.max_page_bytes:
            raise PageError(
                f"page exceeds the {settings.max_page_bytes}-byte cap",
                stage=STAGE,
                permanent=True,
            )
    return Fetched(
        url,
        final_url,
        status,
        bytes(body),
        _charset(content_type),
        response.headers.get("etag"),
        response.headers.get("last-modified"),
    )


def decode_page(fetched: Fetched) -> str | bytes:
    """The page as text when its declared charset really decodes it; otherwise the bytes,
    for trafilatura to detect the encoding (meta tag, then statistical detection)."""
    if fetched.charset:
        try:
            return fetched.body.decode(fetched.charset)
        except (LookupError, UnicodeDecodeError):  # unknown name, or the header lies
            log.info(
                "url=%s stage=crawl declared charset %s does not fit; detecting",
                fetched.url,
                fetched.charset,
            )
    return fetched.body


def extract(fetched: Fetched) -> Article:
    """Main text and metadata; a page with none is a permanent per-URL failure."""
    html = decode_page(fetched)
    try:
        return extract_article(html, fetched.final_url)
    except NothingExtractedError as exc:
        raise PageError(str(exc), stage=STAGE, permanent=True) from None


def content_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def http_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.fetch_timeout, connect=min(settings.fetch_timeout, 10.0))
    limits = httpx.Limits(max_connections=settings.crawl_concurrency)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)
