"""Fetch pages politely and safely, then extract the article.

httpx with connect/read timeouts, a streamed body cap, manual redirects (each hop connected
afresh through the vetting transport), a content-type check, a descriptive User-Agent and
conditional GET for pages seen before. Loopback/private/link-local/multicast addresses are
refused unless BLOGQA_CRAWL_ALLOW_PRIVATE (or BLOGQA_CRAWL_ALLOW_NETWORKS covers them).

The address check happens where the connection is made (`VettingBackend`): the host is
resolved once, every address it answers is vetted, and the socket is opened to a vetted IP.
Checking first and letting httpx resolve again to connect would leave a DNS-rebinding window
(a name answering a public address to the check and 169.254.169.254 to the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from blogqa.config import Settings
from blogqa.errors import PageError
from blogqa.extract import Fetched
from blogqa.limits import retry_after_value
from blogqa.politeness import CrawlPolicy

log = logging.getLogger(__name__)

STAGE = "crawl"
HTML_TYPES = ("text/html", "application/xhtml+xml")
# what feeds and sitemaps are served as (blogqa.sources fetches them through `fetch`)
XML_TYPES = ("application/rss+xml", "application/atom+xml", "application/rdf+xml",
             "application/xml", "text/xml")  # fmt: skip
REDIRECT_CODES = (301, 302, 303, 307, 308)
GONE_CODES = (404, 410)
TRANSIENT_CODES = (408, 425, 429, 500, 502, 503, 504)


@dataclass(frozen=True)
class Validators:
    """What the last fetch told us, for a conditional GET."""

    etag: str | None = None
    last_modified: str | None = None


def _blocked(address: str, allowed: tuple = ()) -> bool:
    """Non-public (loopback, private, link-local incl. cloud metadata, multicast, reserved)
    unless it falls in an operator-allowed network."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allowed):
        return False
    return not ip.is_global or ip.is_multicast


class VettingBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend that connects only to addresses it has vetted itself.

    httpcore calls `connect_tcp` with the URL's host name for every new connection (each
    redirect hop, each robots.txt fetch, each origin); keep-alive reuse stays on the socket
    already opened to a vetted IP. The name is resolved exactly once per connection attempt;
    if any answer is non-public (the `_blocked` rules) the whole host is refused with a
    permanent PageError before any socket is opened. Otherwise the vetted IPs are tried in
    resolver order within the connect timeout (no happy-eyeballs racing: a blackholed first
    address can use up the timeout). TLS is layered on afterwards by httpcore with
    `server_hostname` = the URL host, so SNI and certificate verification still use the name,
    and the Host header comes from the URL as before.
    """

    def __init__(
        self, settings: Settings, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._allow_private = settings.crawl_allow_private
        self._allowed = settings.crawl_allow_networks
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        addresses = await self._vetted_addresses(host, port, timeout)
        failure = httpcore.ConnectError(f"host {host!r} resolved to no address")
        for address in addresses:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise httpcore.ConnectTimeout(f"connecting to {host!r} timed out")
            log.debug("stage=crawl host=%s connecting to vetted address %s", host, address)
            try:
                return await self._inner.connect_tcp(
                    address, port, remaining, local_address, socket_options
                )
            except httpcore.ConnectError as exc:  # refused/unreachable: try the next address
                failure = exc
        raise failure

    async def _vetted_addresses(self, host: str, port: int, timeout: float | None) -> list[str]:
        """The host's addresses from one resolution, all vetted, in resolver order."""
        try:
            async with asyncio.timeout(timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving host {host!r} timed out") from None
        except socket.gaierror as exc:  # transient: DNS may answer next time
            raise httpcore.ConnectError(f"cannot resolve host {host!r}: {exc}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not self._allow_private:
            for address in addresses:
                if _blocked(address, self._allowed):
                    log.warning(
                        "stage=crawl host=%s resolves to non-public address %s; refused",
                        host,
                        address,
                    )
                    raise PageError(
                        f"host {host!r} resolves to non-public address {address}; refused "
                        "(set BLOGQA_CRAWL_ALLOW_PRIVATE=true to crawl private networks)",
                        stage=STAGE,
                        permanent=True,
                    )
        return addresses

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("the crawler does not connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# httpcore exception -> the httpx one callers catch; subclasses before their bases.
_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """Re-raise httpcore errors as httpx's, as httpx's own transport does; anything else
    (our PageError refusing an address) passes through unchanged."""
    try:
        yield
    except Exception as exc:
        for core_error, httpx_error in _HTTPX_ERRORS:
            if isinstance(exc, core_error):
                raise httpx_error(str(exc)) from exc
        raise


class _ResponseBody(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            with _as_httpx_errors():
                await self._stream.aclose()


class VettingTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool that connects through `VettingBackend`.

    httpx 0.28's AsyncHTTPTransport builds its httpcore pool itself and takes no network
    backend, so this does the same small request/response translation around a pool of our
    own (HTTP/1.1, system CA bundle with SSL_CERT_FILE/SSL_CERT_DIR honoured, as before).
    Proxies are out of scope: a client given a transport ignores HTTP(S)_PROXY, and a proxy
    would resolve the name itself, defeating the pinning; the crawler always connects direct.
    """

    def __init__(self, settings: Settings, limits: httpx.Limits) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=VettingBackend(settings),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseBody(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


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
    accept: tuple[str, ...] = HTML_TYPES,
) -> Fetched:
    """GET `url` following at most `max_redirects` redirects, each hop allowed by robots.txt
    and paced per host when there is a `policy`. Addresses are vetted by the client's
    transport (`http_client`) as each hop connects; a refused one raises a permanent
    PageError from inside the request. `accept`: the content types taken (HTML pages by
    default; feeds and sitemaps pass XML_TYPES), any other is a `skipped` PageError."""
    headers = {"User-Agent": settings.user_agent, "Accept": ",".join(accept)}
    if validators and validators.etag:
        headers["If-None-Match"] = validators.etag
    if validators and validators.last_modified:
        headers["If-Modified-Since"] = validators.last_modified
    current = url
    for _hop in range(settings.max_redirects + 1):
        if urlsplit(current).scheme not in ("http", "https"):
            raise PageError(f"redirected to unsupported URL {current}", stage=STAGE, permanent=True)
        delay = await policy.check(client, current) if policy is not None else 0.0
        paced = policy.slot(current, delay) if policy is not None else contextlib.nullcontext()
        try:
            async with paced, client.stream("GET", current, headers=headers) as response:
                if response.status_code in REDIRECT_CODES and "location" in response.headers:
                    current = urljoin(current, response.headers["location"])
                    continue
                return await _read(response, url, current, settings, accept)
        except httpx.TimeoutException as exc:
            raise PageError(f"timed out fetching {current}: {exc!r}", stage=STAGE, permanent=False)
        except httpx.TransportError as exc:
            raise PageError(f"could not fetch {current}: {exc!r}", stage=STAGE, permanent=False)
    raise PageError(
        f"more than {settings.max_redirects} redirects (last {current})",
        stage=STAGE,
        permanent=True,
    )


async def _read(
    response: httpx.Response,
    url: str,
    final_url: str,
    settings: Settings,
    accept: tuple[str, ...] = HTML_TYPES,
) -> Fetched:
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
            retry_after=retry_after_value(response.headers.get("retry-after")),
        )
    if status >= 400 or status < 200 or status in REDIRECT_CODES:
        raise PageError(f"HTTP {status} for {final_url}", stage=STAGE, permanent=True)
    content_type = response.headers.get("content-type", "")
    mime = content_type.split(";")[0].strip().lower()
    if mime and mime not in accept:
        raise PageError(
            f"not an HTML page (Content-Type {mime})"
            if accept == HTML_TYPES
            else f"unexpected Content-Type {mime} (wanted one of {', '.join(accept)})",
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


def content_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def http_client(settings: Settings) -> httpx.AsyncClient:
    """The crawler's client: every connection it opens goes to an address vetted at connect
    time (`VettingTransport`), for pages and robots.txt alike."""
    timeout = httpx.Timeout(settings.fetch_timeout, connect=min(settings.fetch_timeout, 10.0))
    limits = httpx.Limits(max_connections=settings.crawl_concurrency)
    return httpx.AsyncClient(
        transport=VettingTransport(settings, limits), timeout=timeout, follow_redirects=False
    )
