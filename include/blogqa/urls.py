"""URL normalization: the canonical form that keys the queue and the API's by-url lookups.

Two spellings of one page must give one key, or the page is crawled and stored twice. The
path is canonicalized by w3lib (dot segments resolved, percent-escapes of unreserved
characters decoded, the others upper-cased, non-ASCII encoded as UTF-8), so `/a/../b` is
`/b` and `%7E` is `~`. blogqa's own rules stay here: only http(s), no credentials, a length
limit, the host in IDNA form without the default port, the fragment dropped, and tracking
parameters (`utm_*`, click ids) removed from a query that is otherwise kept byte for byte.
"""

from __future__ import annotations

from urllib.parse import unquote_plus, urlsplit, urlunsplit

from w3lib.url import canonicalize_url

MAX_URL_LENGTH = 2048
TRACKING_PARAMS = {
    "fbclid", "gclid", "dclid", "gbraid", "wbraid", "msclkid", "yclid", "igshid",
    "mc_cid", "mc_eid", "_ga", "_gl", "mkt_tok", "oly_anon_id", "oly_enc_id", "vero_id",
}  # fmt: skip
DEFAULT_PORTS = {"http": 80, "https": 443}


class InvalidURLError(ValueError):
    """A URL the queue refuses; the message is the reason shown to the user."""


def _is_tracking(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("utm_") or lowered in TRACKING_PARAMS


def normalize_url(raw: str) -> str:
    """Canonical form used as the queue key (and by the API's by-url lookups).

    Lower-cases scheme and host (IDNA-encoded), drops the default port, the fragment and
    tracking parameters; the path is canonicalized by w3lib; the other query parameters are
    kept as given, in their order. Raises InvalidURLError with the reason for a URL the
    queue refuses.
    """
    text = (raw or "").strip()
    if not text:
        raise InvalidURLError("empty URL")
    if len(text) > MAX_URL_LENGTH:
        raise InvalidURLError(f"URL longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() for ch in text) or any(ord(ch) < 32 for ch in text):
        raise InvalidURLError("URL contains whitespace or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidURLError(f"malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        shown = scheme or "none"
        raise InvalidURLError(f"scheme {shown!r} is not supported: only http and https")
    if parts.username is not None or parts.password is not None:
        raise InvalidURLError("URL contains credentials (user:password@): remove them")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidURLError("URL has no host")
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InvalidURLError(f"host {host!r} is not a valid domain name") from None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    # w3lib sees no query: it would sort the parameters, and re-encoding them would merge
    # distinct URLs (invalid UTF-8) and change what is fetched. Only tracking parameters go.
    path = urlsplit(canonicalize_url(urlunsplit((scheme, netloc, parts.path, "", "")))).path
    query = "&".join(
        pair
        for pair in parts.query.split("&")
        if pair and not _is_tracking(unquote_plus(pair.split("=", 1)[0]))
    )
    return urlunsplit((scheme, netloc, path or "/", query, ""))
