"""Duplicates paid once: a page that is another stored document under a second URL costs no
model call.

Two checks, made by the crawl stage on pages of URLs that have no stored document of their
own (a URL already stored keeps being refreshed as itself):

- canonical: the page declares a canonical URL (`<link rel=canonical>`, og:url) other than its
  own, and a stored document has that URL (or declared the same canonical URL);
- near-duplicate: the Jaccard similarity of the two texts' word 3-shingles, estimated by
  MinHash (128 hash functions), is at least BLOGQA_DEDUPE_THRESHOLD (default 0.8). Candidates
  are found by locality-sensitive hashing in PostgreSQL: the signature is cut into 32 bands
  of 4 values, each band hashed to a key, and stored documents sharing a key with the page
  (a GIN index on `bands`, one query for a whole crawl chunk) are compared signature to
  signature. With 32 bands of 4 a pair at similarity 0.8 becomes a candidate with probability
  1 - (1 - 0.8^4)^32 > 0.9999, one at 0.3 with about 0.23 (then rejected by the comparison).
  Texts under MIN_WORDS words are not compared: their shingle sets are too small for the
  estimate to mean much.

Why 0.8: syndicated copies of one article (a different header or footer, a "first published
at" line, a dropped image caption) score 0.9 and above on 3-shingles; two different posts of
one blog score well under 0.3, even with a shared boilerplate of a few sentences. The
threshold leaves room for copies with an added paragraph.

The pages of one crawl chunk are also compared with each other (the lower queue id is the
original), and a page whose declared canonical URL is queued or being processed is a
duplicate of it (if that original later fails, the copy stays skipped: enqueue it with
--force). Near-duplicate texts crawled at the same time by different chunks are not caught:
each sees only the documents already stored, and both are processed.

A duplicate's queue row ends `skipped` (last_stage 'dedupe', the reason in last_error) and
blogqa.duplicates links it to the original. MinHash is implemented here (the permutation
scheme of datasketch: (a*h + b) mod (2^61 - 1), truncated to 32 bits) rather than taken from
datasketch, which would add scipy as a pinned dependency for ~20 lines, and whose LSH index
has no PostgreSQL storage. The seed below must never change: stored signatures depend on it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from dataclasses import dataclass

import numpy as np
import psycopg

from blogqa import sql_queries
from blogqa.queue import Lease
from blogqa.urls import InvalidURLError, normalize_url

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/dedupe.sql

NUM_PERM = 128
BANDS = 32
ROWS_PER_BAND = NUM_PERM // BANDS
SHINGLE_WORDS = 3
MIN_WORDS = 50
DEFAULT_THRESHOLD = 0.8
SEED = 20261101  # fixed forever: stored signatures were made with it
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX_HASH = np.uint64((1 << 32) - 1)
_rng = np.random.Generator(np.random.PCG64(SEED))
_A = _rng.integers(1, (1 << 61) - 1, size=NUM_PERM, dtype=np.uint64)
_B = _rng.integers(0, (1 << 61) - 1, size=NUM_PERM, dtype=np.uint64)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Fingerprint:
    """A text's MinHash signature and its LSH band keys."""

    minhash: np.ndarray  # NUM_PERM uint32 values
    bands: list[int]  # BANDS signed 64-bit keys (PostgreSQL bigint)

    def similarity(self, other: np.ndarray) -> float:
        """Estimated Jaccard similarity: the share of equal signature values."""
        return float(np.mean(self.minhash == other))


@dataclass(frozen=True)
class Duplicate:
    """A page found to be a copy of `original_url`."""

    url: str
    original_url: str
    reason: str  # 'canonical' | 'near_duplicate'
    similarity: float | None = None

    def message(self) -> str:
        if self.reason == "canonical":
            return f"duplicate of {self.original_url}: declares it as its canonical URL"
        return (
            f"duplicate of {self.original_url}: near-duplicate text "
            f"(estimated similarity {self.similarity:.2f})"
        )


def shingles(text: str) -> set[str]:
    """Word 3-shingles of the lower-cased text (punctuation and spacing ignored)."""
    words = _WORD.findall(text.lower())
    if len(words) < SHINGLE_WORDS:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def fingerprint(text: str) -> Fingerprint | None:
    """The text's fingerprint, or None under MIN_WORDS words (not compared)."""
    if len(_WORD.findall(text)) < MIN_WORDS:
        return None
    base = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=4).digest(), "little")
            for s in shingles(text)
        ),
        dtype=np.uint64,
    )
    with np.errstate(over="ignore"):  # uint64 wrap-around is part of the scheme
        permuted = ((base[:, None] * _A[None, :] + _B[None, :]) % _MERSENNE) & _MAX_HASH
    minhash = permuted.min(axis=0).astype(np.uint32)
    return Fingerprint(minhash, band_keys(minhash))


# The page key under which the crawl keeps a new page's signature for the load (base64 of
# NUM_PERM little-endian uint32), so the load does not compute it again (2-3 ms a page).
PAGE_KEY = "minhash"


def remember(page: dict, found: Fingerprint | None) -> None:
    """Keep the page's signature in the page (stored with it in its work item)."""
    if found is not None:
        page[PAGE_KEY] = base64.b64encode(found.minhash.astype("<u4").tobytes()).decode()


def page_fingerprint(page: dict) -> Fingerprint | None:
    """The signature the crawl kept in the page, else the text's (computed now)."""
    raw = page.get(PAGE_KEY)
    if isinstance(raw, str):
        minhash = np.frombuffer(base64.b64decode(raw), dtype="<u4")
        if minhash.shape == (NUM_PERM,):
            return Fingerprint(minhash, band_keys(minhash))
    return fingerprint(page.get("text") or "")


def band_keys(minhash: np.ndarray) -> list[int]:
    keys = []
    for band in range(BANDS):
        part = minhash[band * ROWS_PER_BAND : (band + 1) * ROWS_PER_BAND]
        digest = hashlib.blake2b(
            band.to_bytes(2, "little") + part.astype("<u4").tobytes(), digest_size=8
        ).digest()
        keys.append(int.from_bytes(digest, "little", signed=True))
    return keys


def _signature(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<u4")


# ---------------------------------------------------------------- stored fingerprints


def save_fingerprints(conn: psycopg.Connection, documents: list[tuple[int, dict, str]]) -> int:
    """Store the fingerprints of (document id, page, content hash), replacing older ones; a
    text too short to compare gets none (and an older one is removed). Called by the load,
    in its transaction, so a stored document's fingerprint always matches its text (the
    page's own: the one the crawl kept with it, or computed here)."""
    if not documents:
        return 0
    ids = [doc_id for doc_id, _, _ in documents]
    conn.execute(SQL.delete_fingerprints, (ids,))
    rows = []
    for doc_id, page, content_hash in documents:
        found = page_fingerprint(page)
        if found is not None:
            rows.append((doc_id, content_hash, found.minhash.astype("<u4").tobytes(), found.bands))
    if rows:
        with conn.cursor() as cur:
            cur.executemany(SQL.save_fingerprint, rows)
    return len(rows)


BACKFILL_DONE_KEY = "fingerprints_backfilled"


def backfill(conn: psycopg.Connection, limit: int = 500) -> int:
    """Fingerprint up to `limit` stored documents that have none (those loaded before
    migration 011). Once a pass finds none, blogqa.settings remembers it and later calls
    return at once: from then on the load keeps every fingerprint current."""
    done = conn.execute(SQL.backfill_done, (BACKFILL_DONE_KEY,)).fetchone()
    if done:
        return 0
    with conn.transaction():
        rows = conn.execute(SQL.backfill, (MIN_WORDS, limit)).fetchall()
        saved = save_fingerprints(conn, [(doc, {"text": text}, h) for doc, text, h in rows])
        if len(rows) < limit:
            conn.execute(SQL.mark_backfill_done, (BACKFILL_DONE_KEY,))
    if saved:
        log.info("stage=dedupe fingerprinted %d stored documents", saved)
    return saved


# ---------------------------------------------------------------- the check


def _canonical(page: dict, url: str) -> str | None:
    """The page's declared canonical URL in queue form, when it names another URL."""
    raw = page.get("canonical_url")
    if not raw:
        return None
    try:
        canonical = normalize_url(raw)
    except InvalidURLError:
        return None
    return canonical if canonical != url else None


def find_duplicates(
    conn: psycopg.Connection,
    pages: list[tuple[Lease, dict]],
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[int, Duplicate]:
    """The pages (of URLs with no stored document) that copy a stored document or an
    earlier page of the same batch, by queue id. The stored side is looked up for the whole
    batch in two statements (a crawl chunk is hundreds of pages: a round trip or three per
    page was most of the check's time), the batch's own pages are compared in memory."""
    ordered = sorted(pages, key=lambda p: p[0].id)
    prints = [_kept_fingerprint(page) for _, page in ordered]
    canonicals = [_canonical(page, lease.url) for lease, page in ordered]
    declared = _declared_originals(conn, ordered, canonicals)
    stored = _stored_candidates(conn, ordered, prints)
    batch = _Batch()
    found: dict[int, Duplicate] = {}
    for i, (lease, _) in enumerate(ordered):
        duplicate = _canonical_duplicate(lease, canonicals[i], declared.get(i), batch)
        if duplicate is None and prints[i] is not None:
            duplicate = _near_duplicate(lease, prints[i], stored.get(i, []), batch, threshold)
        if duplicate is not None:
            found[lease.id] = duplicate
            log.info("url=%s stage=dedupe %s", lease.url, duplicate.message())
        else:
            batch.add(lease.url, canonicals[i], prints[i])
    return found


def _kept_fingerprint(page: dict) -> Fingerprint | None:
    """The page's fingerprint, kept in the page for the load (`remember`)."""
    found = fingerprint(page.get("text") or "")
    remember(page, found)
    return found


class _Batch:
    """The originals of the batch so far (pages that were not duplicates), in queue order."""

    def __init__(self) -> None:
        self.by_canonical: dict[str, str] = {}  # a URL or declared canonical URL -> original
        self.prints: list[tuple[str, set[int], Fingerprint]] = []

    def add(self, url: str, canonical: str | None, found: Fingerprint | None) -> None:
        self.by_canonical.setdefault(url, url)
        if canonical is not None:
            self.by_canonical.setdefault(canonical, url)
        if found is not None:
            self.prints.append((url, set(found.bands), found))


def _declared_originals(
    conn: psycopg.Connection, ordered: list[tuple[Lease, dict]], canonicals: list[str | None]
) -> dict[int, str]:
    """By position in `ordered`: the stored document (else the queued or processing URL)
    that a page's declared canonical URL names."""
    asked = [i for i, canonical in enumerate(canonicals) if canonical is not None]
    if not asked:
        return {}
    rows = conn.execute(
        SQL.declared_originals,
        (
            asked,
            [canonicals[i] for i in asked],
            [ordered[i][1]["canonical_url"] for i in asked],
            [ordered[i][0].url for i in asked],
        ),
    ).fetchall()
    return dict(rows)


def _stored_candidates(
    conn: psycopg.Connection,
    ordered: list[tuple[Lease, dict]],
    prints: list[Fingerprint | None],
) -> dict[int, list[tuple[str, bytes]]]:
    """By position in `ordered`: (URL, signature) of the stored documents sharing at least
    one LSH band with the page."""
    asked = [i for i, found in enumerate(prints) if found is not None]
    if not asked:
        return {}
    candidates: dict[int, list[tuple[str, bytes]]] = {}
    rows = conn.execute(
        SQL.candidates,
        (
            [i for i in asked for _ in range(BANDS)],
            [band for i in asked for band in prints[i].bands],
            asked,
            [ordered[i][0].url for i in asked],
        ),
    )
    for i, url, raw in rows:
        candidates.setdefault(i, []).append((url, raw))
    return candidates


def _canonical_duplicate(
    lease: Lease, canonical: str | None, declared: str | None, batch: _Batch
) -> Duplicate | None:
    if canonical is None:
        return None
    original = declared or batch.by_canonical.get(canonical)
    return None if original is None else Duplicate(lease.url, original, "canonical")


def _near_duplicate(
    lease: Lease,
    mine: Fingerprint,
    stored: list[tuple[str, bytes]],
    batch: _Batch,
    threshold: float,
) -> Duplicate | None:
    best_url, best = None, 0.0
    for url, raw in stored:
        similarity = mine.similarity(_signature(raw))
        if similarity > best:
            best_url, best = url, similarity
    bands = set(mine.bands)
    for url, other_bands, other in batch.prints:
        if not bands.isdisjoint(other_bands):
            similarity = mine.similarity(other.minhash)
            if similarity > best:
                best_url, best = url, similarity
    if best_url is not None and best >= threshold:
        return Duplicate(lease.url, best_url, "near_duplicate", round(best, 4))
    return None


def record(conn: psycopg.Connection, found: list[tuple[Lease, dict, Duplicate]]) -> None:
    """Link each duplicate to its original (blogqa.duplicates)."""
    if not found:
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            SQL.record,
            [
                (
                    lease.url,
                    lease.id,
                    dup.original_url,
                    dup.reason,
                    dup.similarity,
                    page.get("content_hash"),
                )
                for lease, page, dup in found
            ],
        )


def forget(conn: psycopg.Connection, urls: list[str]) -> None:
    """Drop the duplicate links of URLs now stored as documents of their own."""
    if urls:
        conn.execute(SQL.forget, (urls,))
