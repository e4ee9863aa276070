"""The API benchmark of issue 3: `blogqa serve` on 100k question+chunk vectors.

`python bench/api_bench.py [--requests 2000] [--clients 16] [--workers 1] [--access-log on|off]
[--rebuild] [--phase all|closed|open] [--shared-buffers 1GB]`

What it does, and why:

1. A private database. BLOGQA_HOME is set to `.blogqa/bench-api` (gitignored) and every other
   BLOGQA_*/OPENAI_* variable is dropped, so the embedded PostgreSQL it starts holds only the
   bench's corpus and the user's data is never touched. The provider is the offline one, the
   embedding dimension the default 1536, the server settings the embedded defaults except
   `--shared-buffers` (ALTER SYSTEM on this private server, restarted when it changes). A
   reused corpus whose tables hold dead rows (a migration rewrote them) is vacuumed before
   anything is measured, so autovacuum does not run during the measurement.
2. A generated corpus (`CorpusSpec`): 10,000 documents, each with a summary, 5 questions and
   5 chunks of ~200 words: 50,000 question + 50,000 chunk vectors (+ 10,000 summary vectors).
   Vectors are a hierarchical Gaussian mixture, L2-normalised, not uniform noise: 300 topic
   centres with Zipf-like popularity; a document is its topic centre plus noise; a question or
   chunk is its document plus noise; every vector shares one offset direction, as real text
   embeddings do (they are anisotropic). The noise levels give cosine ~0.15 between unrelated
   texts, ~0.4 within a topic and ~0.65 within a document, levels typical of
   text-embedding-3-small. It is still a stand-in: real embeddings have more structure
   (sub-topics, near-duplicates) and a lower intrinsic dimension, which usually makes HNSW
   recall higher than on isotropic noise, so the recall measured here is on the hard side.
   Loading uses binary COPY with the HNSW indexes dropped, then rebuilds them (the definitions
   of include/blogqa/sql/002_outputs.sql) with a large maintenance_work_mem and times each build. A row in
   blogqa.settings marks a complete load: later runs reuse it (`--rebuild` regenerates).
3. Recall@10 of the HNSW search against exact search, on 200 held-out query vectors from the
   same distribution (half new questions about stored documents, half questions of documents
   that were generated but not stored). It is measured on the query the similar route runs to
   rank chunks (search.SQL.nearest_ids, through `search.nearest_chunk_ids_async`; the route
   then keeps each document's best chunk, ask runs the same index scan with LIMIT k). Exact
   neighbours are a numpy brute force over the stored vectors, checked against PostgreSQL's
   own sequential scan (index scans disabled) on a few queries. The sweep runs LIMIT 10 at
   several hnsw.ef_search values; the smallest reaching recall 0.95 is given to the server
   (BLOGQA_HNSW_EF_SEARCH). The similar route's own recall (80 chunks ranked, collapsed to 10
   documents) is reported at that value too.
4. `blogqa serve` as a subprocess on a free port (`--workers` uvicorn worker processes, the
   access log on or off), and per route 16 concurrent clients in a
   closed loop (each sends its next request when it has the previous answer, on its own
   keep-alive connection), then one client alone: a warm-up, then `--requests` requests on
   random keys (uniform over all documents and questions, not one hot key). p50/p95/p99,
   requests/s and the CPU time per request of the client, the API server and PostgreSQL are
   reported: they share the machine's cores, and with 16 clients in a closed loop the mean
   latency is 16 / throughput (Little's law), so on few cores it is mostly waiting for a CPU.
   The one-client figures are the service time without that queue.

Results go to bench/results/api_bench.json and a table on stdout. Other work running on the
machine at the same time makes the figures noisy: the load average is recorded.

5. The open-loop phase (`--phase open`, issue 13): `blogqa serve` with the OpenAI provider
   against an OpenAI-compatible server that answers at once (bench/servers.py's, in a process
   of its own so its GIL is not the load generator's), and requests sent at fixed offered rates
   whatever the answers do (an open loop: each request has a scheduled send time, i * 1/rate,
   on a keep-alive connection that is free or a new one; its latency is counted from that
   scheduled time, so a server that falls behind shows it instead of slowing the sender down:
   no coordinated omission). Per route and rate: p50/p95/p99, the send lag of the generator
   itself, and CPU ms per request of the API server, PostgreSQL, the model server and the
   generator. Run it on the 100k corpus and on a small one (`--documents 120 --home
   .blogqa/bench-api-120`, the size issue 13 measured on); each run adds its corpus's section
   to bench/results/api_open_loop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import psutil
import psycopg
import uvloop
from pgvector.psycopg import register_vector_async
from psycopg import sql
from rich.console import Console
from rich.table import Table

from blogqa import db, embedded, search
from blogqa.api.app import LEDGER_POOL_MAX_SIZE, POOL_MAX_SIZE
from blogqa.config import HNSW_EF_SEARCH_DEFAULT, Settings, load_settings
from blogqa.urls import normalize_url

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO / ".blogqa" / "bench-api"
RESULTS = REPO / "bench" / "results" / "api_bench.json"
OPEN_RESULTS = REPO / "bench" / "results" / "api_open_loop.json"
# (route, offered requests/s, p95 target in ms) of the open-loop phase (issue 13)
OPEN_LOOP = (
    ("GET /api/v1/questions/by-url", 300, 10.0),
    ("POST /api/v1/search/similar (text)", 60, 25.0),
    ("POST /api/v1/search/similar (text)", 50, 25.0),
    ("POST /api/v1/search/similar (url)", 50, 25.0),  # the same search without the model call
)
MARKER_KEY = "bench_api_corpus"  # blogqa.settings row written once a load is complete
# The HNSW indexes of include/blogqa/sql/002_outputs.sql (pgvector defaults: m = 16, ef_construction = 64).
HNSW_INDEXES = (
    ("summaries_embedding_idx", "summaries"),
    ("questions_embedding_idx", "questions"),
    ("chunks_embedding_idx", "chunks"),
)
EF_SWEEP = (40, 64, 100, 200, 400)
RECALL_TARGET = 0.95
K = 10
SIMILAR_CHUNKS = search.similar_candidates(K)  # what the similar route ranks at k = 10
TARGET_P95_MS = {"by-url": 10.0, "by-id": 10.0, "similar": 25.0}
SITES = tuple(f"site{n:02d}.example" for n in range(40))

console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)


# ---------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusSpec:
    """Everything the generated corpus depends on; stored with it so a later run can tell
    whether the database holds exactly this corpus."""

    documents: int = 10_000
    questions_per_document: int = 5
    chunks_per_document: int = 5
    words_per_chunk: int = 200
    dim: int = 1536
    topics: int = 300
    topic_zipf: float = 0.8  # topic popularity ~ 1 / rank**0.8: a few large topics
    document_spread: float = 1.0  # norm of a document's noise around its topic centre
    item_spread: float = 1.2  # norm of a question's or chunk's noise around its document
    summary_spread: float = 0.6  # a summary is closer to its document than one chunk
    shared_offset: float = 0.77  # norm of the direction common to all vectors
    seed: int = 3
    version: int = 1

    @property
    def questions(self) -> int:
        return self.documents * self.questions_per_document

    @property
    def chunks(self) -> int:
        return self.documents * self.chunks_per_document


@dataclass(frozen=True)
class Space:
    """The fixed part of the mixture: topic centres, their weights, the shared direction."""

    centres: np.ndarray
    weights: np.ndarray
    shared: np.ndarray


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)


def _rng(spec: CorpusSpec, stream: int) -> np.random.Generator:
    """An independent, reproducible stream per part, so regenerating one part (the stored
    documents, for recall queries) does not depend on generating the others."""
    return np.random.default_rng([spec.seed, stream])


def make_space(spec: CorpusSpec) -> Space:
    rng = _rng(spec, 0)
    centres = _unit(rng.standard_normal((spec.topics, spec.dim), dtype=np.float32))
    weights = 1.0 / np.arange(1, spec.topics + 1) ** spec.topic_zipf
    shared = _unit(rng.standard_normal(spec.dim, dtype=np.float32))
    return Space(centres, weights / weights.sum(), shared)


def _noise(rng: np.random.Generator, rows: int, dim: int, norm: float) -> np.ndarray:
    """Gaussian noise whose rows have a norm of about `norm` (isotropic in `dim`)."""
    return rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(norm / np.sqrt(dim))


def document_points(spec: CorpusSpec, space: Space, rng: np.random.Generator, n: int) -> np.ndarray:
    """Unnormalised document points: topic centre + noise + the shared offset."""
    topics = rng.choice(spec.topics, size=n, p=space.weights)
    points = space.centres[topics] + _noise(rng, n, spec.dim, spec.document_spread)
    return points + np.float32(spec.shared_offset) * space.shared


def stored_documents(spec: CorpusSpec, space: Space) -> np.ndarray:
    return document_points(spec, space, _rng(spec, 1), spec.documents)


def item_vectors(
    points: np.ndarray, per: int, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """`per` unit vectors around each document point (rows grouped by document)."""
    base = np.repeat(points, per, axis=0)
    return _unit(base + _noise(rng, len(base), points.shape[1], spread)).astype(np.float32)


class TextMaker:
    """Filler text with a Zipf-like vocabulary: realistic sizes for responses and for the
    offline extractive answerer, no meaning (the vectors are generated separately)."""

    def __init__(self, rng: np.random.Generator, vocabulary: int = 4000) -> None:
        syllables = [a + b for a in "bcdfglmnprstvz" for b in ("a", "e", "i", "o", "u", "ai")]
        words: set[str] = set()
        while len(words) < vocabulary:
            size = int(rng.integers(1, 4))
            words.add("".join(syllables[i] for i in rng.integers(0, len(syllables), size)))
        self.vocabulary = np.array(sorted(words), dtype=object)
        weights = 1.0 / np.arange(1, vocabulary + 1) ** 1.05
        self.weights = weights / weights.sum()
        self.rng = rng

    def words(self, n: int) -> list[str]:
        return list(self.vocabulary[self.rng.choice(len(self.vocabulary), n, p=self.weights)])

    def sentences(self, n: int) -> str:
        words = self.words(n)
        out, start = [], 0
        while start < n:
            end = min(n, start + int(self.rng.integers(8, 19)))
            sentence = " ".join(words[start:end])
            out.append(sentence[0].upper() + sentence[1:] + ".")
            start = end
        return " ".join(out)

    def phrase(self, low: int, high: int) -> str:
        return " ".join(self.words(int(self.rng.integers(low, high + 1))))


# ---------------------------------------------------------------- loading


def _copy_documents(conn: psycopg.Connection, spec: CorpusSpec, text: TextMaker) -> list:
    """COPY the documents; returns their chunk texts (kept for the chunks table)."""
    fetched = datetime(2025, 1, 1, tzinfo=UTC)
    chunk_texts = []
    columns = (
        "url, title, author, published, site_name, language, text, word_count,"
        " content_hash, fetched_at"
    )
    with conn.cursor() as cur, cur.copy(f"COPY blogqa.documents ({columns}) FROM STDIN") as copy:
        for i in range(spec.documents):
            chunks = [text.sentences(spec.words_per_chunk) for _ in range(spec.chunks_per_document)]
            chunk_texts.append(chunks)
            body = "\n\n".join(chunks)
            site = SITES[i % len(SITES)]
            slug = "-".join(text.words(4))
            copy.write_row(
                (
                    normalize_url(f"https://{site}/posts/{i:05d}-{slug}"),
                    text.phrase(4, 8).title(),
                    text.phrase(2, 2).title(),
                    date(2020, 1, 1) + timedelta(days=i % 1800),
                    site,
                    "en",
                    body,
                    spec.chunks_per_document * spec.words_per_chunk,
                    hashlib.sha256(body.encode()).hexdigest(),
                    fetched,
                )
            )
    return chunk_texts


def _document_ids(conn: psycopg.Connection) -> list[int]:
    """Ids in insertion order (identity values follow COPY's row order)."""
    return [row[0] for row in conn.execute("SELECT id FROM blogqa.documents ORDER BY id")]


def _copy_vectors(
    conn: psycopg.Connection, table: str, columns: str, types: list[str], rows: Iterator
) -> None:
    query = sql.SQL("COPY blogqa.{} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(columns)
    )
    with conn.cursor() as cur, cur.copy(query) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


def _load_rows(conn: psycopg.Connection, spec: CorpusSpec) -> dict:
    """Generate and COPY every table; returns the seconds spent per step."""
    timings = {}
    space = make_space(spec)
    text = TextMaker(_rng(spec, 6))
    started = time.perf_counter()
    chunk_texts = _copy_documents(conn, spec, text)
    ids = _document_ids(conn)
    points = stored_documents(spec, space)
    timings["documents_s"] = time.perf_counter() - started

    started = time.perf_counter()
    summaries = item_vectors(points, 1, spec.summary_spread, _rng(spec, 2))
    _copy_vectors(
        conn,
        "summaries",
        "document_id, summary, model, prompt_version, content_hash, embed_model, embedding",
        ["int8", "text", "text", "text", "text", "text", "vector"],
        (
            (doc, text.sentences(60), "bench-synthetic", "bench", "-", "bench-gmm", vec)
            for doc, vec in zip(ids, summaries, strict=True)
        ),
    )
    timings["summaries_s"] = time.perf_counter() - started

    started = time.perf_counter()
    per = spec.questions_per_document
    questions = item_vectors(points, per, spec.item_spread, _rng(spec, 3))
    _copy_vectors(
        conn,
        "questions",
        "document_id, position, question, answer, embedding",
        ["int8", "int2", "text", "text", "vector"],
        (
            (ids[i // per], i % per, f"How does {text.phrase(3, 9)} work?", text.sentences(25), v)
            for i, v in enumerate(questions)
        ),
    )
    del questions
    timings["questions_s"] = time.perf_counter() - started

    started = time.perf_counter()
    per = spec.chunks_per_document
    chunks = item_vectors(points, per, spec.item_spread, _rng(spec, 4))
    tokens = int(spec.words_per_chunk * 1.3)
    _copy_vectors(
        conn,
        "chunks",
        "document_id, position, text, tokens, embedding",
        ["int8", "int4", "text", "int4", "vector"],
        (
            (ids[i // per], i % per, chunk_texts[i // per][i % per], tokens, v)
            for i, v in enumerate(chunks)
        ),
    )
    timings["chunks_s"] = time.perf_counter() - started
    return timings


def _build_indexes(conn: psycopg.Connection) -> dict:
    """(Re)create the HNSW indexes after the load: building once is much faster than
    inserting 110k rows into live graphs. The graph must fit in maintenance_work_mem;
    pgvector builds in parallel with max_parallel_maintenance_workers."""
    workers = max((os.cpu_count() or 1) - 1, 0)
    conn.execute("SET maintenance_work_mem = '2GB'")
    conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(workers))
    built = {}
    for name, table in HNSW_INDEXES:
        started = time.perf_counter()
        conn.execute(
            sql.SQL("CREATE INDEX {} ON blogqa.{} USING hnsw (embedding vector_cosine_ops)").format(
                sql.Identifier(name), sql.Identifier(table)
            )
        )
        size = conn.execute(
            "SELECT pg_relation_size(%s::regclass)", (f"blogqa.{name}",)
        ).fetchone()[0]
        built[name] = {
            "seconds": round(time.perf_counter() - started, 1),
            "size_mb": round(size / 2**20),
        }
        console.print(f"  built {name} in {built[name]['seconds']} s ({built[name]['size_mb']} MB)")
    return {"parallel_maintenance_workers": workers, "maintenance_work_mem": "2GB", **built}


def load_corpus(conn: psycopg.Connection, spec: CorpusSpec) -> dict:
    """Replace the bench database's rows with a freshly generated corpus and mark it."""
    console.print(
        f"generating {spec.documents:,} documents ({spec.questions:,} question and "
        f"{spec.chunks:,} chunk vectors, dimension {spec.dim})…"
    )
    conn.execute("DELETE FROM blogqa.settings WHERE key = %s", (MARKER_KEY,))
    conn.execute("TRUNCATE blogqa.documents, blogqa.llm_usage RESTART IDENTITY CASCADE")
    for name, _ in HNSW_INDEXES:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS blogqa.{}").format(sql.Identifier(name)))
    conn.execute("SET synchronous_commit = off")
    started = time.perf_counter()
    load = {"copy": {k: round(v, 1) for k, v in _load_rows(conn, spec).items()}}
    load["copy_total_s"] = round(time.perf_counter() - started, 1)
    console.print(f"  loaded with COPY in {load['copy_total_s']} s; building HNSW indexes…")
    started = time.perf_counter()
    load["indexes"] = _build_indexes(conn)
    load["index_build_total_s"] = round(time.perf_counter() - started, 1)
    conn.execute("VACUUM ANALYZE blogqa.documents, blogqa.summaries")
    conn.execute("VACUUM ANALYZE blogqa.questions, blogqa.chunks")
    load["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    marker = json.dumps({"spec": asdict(spec), "load": load})
    conn.execute("INSERT INTO blogqa.settings (key, value) VALUES (%s, %s)", (MARKER_KEY, marker))
    return load


def existing_load(conn: psycopg.Connection, spec: CorpusSpec) -> dict | None:
    """The marker's load figures when the database holds this exact corpus, complete."""
    row = conn.execute("SELECT value FROM blogqa.settings WHERE key = %s", (MARKER_KEY,))
    found = row.fetchone()
    if found is None or json.loads(found[0])["spec"] != asdict(spec):
        return None
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM blogqa.documents), (SELECT count(*) FROM blogqa.questions),"
        " (SELECT count(*) FROM blogqa.chunks),"
        " (SELECT count(*) FROM pg_indexes WHERE schemaname = 'blogqa'"
        "  AND indexname = ANY(%s))",
        ([name for name, _ in HNSW_INDEXES],),
    ).fetchone()
    if counts != (spec.documents, spec.questions, spec.chunks, len(HNSW_INDEXES)):
        return None
    return json.loads(found[0])["load"]


# ---------------------------------------------------------------- recall


def recall_queries(spec: CorpusSpec, count: int) -> tuple[np.ndarray, list[str]]:
    """Held-out question vectors from the corpus's distribution: half about stored documents
    (a reader asking about something the corpus holds), half from generated documents that
    were never stored (same topics, new documents)."""
    space = make_space(spec)
    rng = _rng(spec, 9)
    half = count // 2
    stored = stored_documents(spec, space)[rng.choice(spec.documents, half, replace=False)]
    unseen = document_points(spec, space, rng, count - half)
    vectors = item_vectors(np.vstack([stored, unseen]), 1, spec.item_spread, rng)
    return vectors, ["stored document"] * half + ["unstored document"] * (count - half)


async def _reader(settings: Settings) -> psycopg.AsyncConnection:
    """A connection set up like the API's pooled ones (read-only, pgvector types)."""
    conn = await psycopg.AsyncConnection.connect(
        db.database_dsn(settings), autocommit=True, application_name="blogqa-bench"
    )
    await conn.execute("SET default_transaction_read_only = on")
    await register_vector_async(conn)
    return conn


@dataclass(frozen=True)
class Exact:
    """Exact neighbours of one query, best first: (chunk id, document id) rows like those of
    search.nearest_chunk_ids_async, and their cosine similarities."""

    ranked: list[tuple[int, int]]
    scores: list[float]


@dataclass(frozen=True)
class StoredChunks:
    ids: np.ndarray
    document_ids: np.ndarray
    vectors: np.ndarray

    def nearest(self, queries: np.ndarray, n: int) -> list[Exact]:
        """Exact top `n` by cosine for each query row: brute force over every stored vector
        (all unit length, so cosine similarity is the dot product)."""
        found = []
        for row in queries @ self.vectors.T:
            top = np.argpartition(-row, n)[:n]
            top = top[np.argsort(-row[top], kind="stable")]
            ranked = [(int(self.ids[i]), int(self.document_ids[i])) for i in top]
            found.append(Exact(ranked, [float(row[i]) for i in top]))
        return found


def stored_chunks(conn: psycopg.Connection) -> StoredChunks:
    """Every chunk vector, read back with binary COPY (the exact search runs on what the
    database holds, not on what the generator meant to write)."""
    ids, documents, vectors = [], [], []
    query = "COPY (SELECT id, document_id, embedding FROM blogqa.chunks) TO STDOUT (FORMAT BINARY)"
    with conn.cursor() as cur, cur.copy(query) as copy:
        copy.set_types(["int8", "int8", "vector"])
        for chunk_id, document_id, vector in copy.rows():
            ids.append(chunk_id)
            documents.append(document_id)
            vectors.append(vector.to_numpy())
    return StoredChunks(np.array(ids), np.array(documents), np.vstack(vectors).astype(np.float32))


async def _seq_scan(conn: psycopg.AsyncConnection, vector: np.ndarray, n: int) -> list:
    """The API's ranking query with index scans off: a sequential scan, exact by construction
    (slow at this size, so only used to check the brute force on a few queries)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_indexscan = off")
        return await search.nearest_chunk_ids_async(conn, vector, n)


def _documents_of(ranked: list[tuple[int, int]], k: int) -> list[int]:
    """Document ids ranked by their best chunk (what the similar route returns)."""
    return list(dict.fromkeys(document for _, document in ranked))[:k]


def _recall(found: list[tuple[int, int]], truth: list[tuple[int, int]]) -> float:
    return len({c for c, _ in found} & {c for c, _ in truth}) / len(truth)


async def _sweep_one(conn, vectors: np.ndarray, truth: list[Exact], ef: int) -> dict:
    """The 10 nearest chunks by the HNSW index at one ef_search, against the exact 10."""
    recalls, latencies = [], []
    for vector, exact in zip(vectors, truth, strict=True):
        started = time.perf_counter()
        found = await search.nearest_chunk_ids_async(conn, vector, K, ef_search=ef)
        latencies.append((time.perf_counter() - started) * 1000)
        recalls.append(_recall(found, exact.ranked[:K]))
    return {"recalls": recalls, **_percentiles(latencies)}


async def _route_recall(conn, vectors: np.ndarray, truth: list[Exact], ef: int) -> dict:
    """Recall of the similar route's ranking (80 chunks for k = 10, ef raised to 80): its top
    10 chunks, and the 10 documents it returns after keeping each document's best chunk."""
    chunk_recall, doc_recall, returned = [], [], []
    for vector, exact in zip(vectors, truth, strict=True):
        found = await search.nearest_chunk_ids_async(conn, vector, SIMILAR_CHUNKS, ef_search=ef)
        returned.append(len(found))
        chunk_recall.append(_recall(found[:K], exact.ranked[:K]))
        documents = set(_documents_of(found, K))
        doc_recall.append(len(documents & set(_documents_of(exact.ranked, K))) / K)
    return {
        "ef_search_effective": search.ef_search_for(SIMILAR_CHUNKS, ef),
        "chunk_recall_at_10": round(float(np.mean(chunk_recall)), 4),
        "document_recall_at_10": round(float(np.mean(doc_recall)), 4),
        "mean_rows_returned": float(np.mean(returned)),
    }


async def _check_exact(conn, vectors: np.ndarray, truth: list[Exact], count: int) -> dict:
    """Agreement of the brute force with PostgreSQL's own exact scan on a few queries."""
    agree, started = [], time.perf_counter()
    for vector, exact in zip(vectors[:count], truth[:count], strict=True):
        agree.append(_recall(await _seq_scan(conn, vector, K), exact.ranked[:K]))
    return {
        "queries": count,
        "top10_agreement": round(float(np.mean(agree)), 4),
        "seq_scan_ms": round((time.perf_counter() - started) * 1000 / count),
    }


async def measure_recall(
    settings: Settings, spec: CorpusSpec, chunks: StoredChunks, count: int
) -> dict:
    """Exact neighbours by brute force, then the HNSW search at each ef_search of the sweep."""
    vectors, kinds = recall_queries(spec, count)
    truth = chunks.nearest(vectors, SIMILAR_CHUNKS)
    conn = await _reader(settings)
    try:
        check = await _check_exact(conn, vectors, truth, 3)
        for vector in vectors[:50]:  # bring the index into the cache
            await search.nearest_chunk_ids_async(conn, vector, K, ef_search=max(EF_SWEEP))
        sweep = {}
        for ef in EF_SWEEP:
            result = await _sweep_one(conn, vectors, truth, ef)
            recalls = np.array(result.pop("recalls"))
            by_kind = {
                kind: round(float(recalls[[k == kind for k in kinds]].mean()), 4)
                for kind in dict.fromkeys(kinds)
            }
            sweep[ef] = {"recall_at_10": round(float(recalls.mean()), 4), **result, **by_kind}
            console.print(
                f"  ef_search {ef:>3}: recall@10 {sweep[ef]['recall_at_10']:.3f}, "
                f"p50 {result['p50_ms']} ms"
            )
        chosen = _choose_ef(sweep)
        route = await _route_recall(conn, vectors, truth, chosen)
        plan = await _plan(conn, vectors[0], chosen)
    finally:
        await conn.close()
    return {
        "queries": count,
        "query_kinds": {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)},
        "measured_query": "search.SQL.nearest_ids (the similar route's ranking), LIMIT 10",
        "exact": "numpy brute force over the stored chunk vectors",
        "exact_check_against_seq_scan": check,
        "cosine": _cosine_levels(vectors, truth),
        "sweep": sweep,
        "chosen_ef_search": chosen,
        "target_met": sweep[chosen]["recall_at_10"] >= RECALL_TARGET,
        "similar_route_at_chosen": route,
        "plan_uses_hnsw_index": "chunks_embedding_idx" in plan,
    }


def _choose_ef(sweep: dict) -> int:
    """The smallest ef_search reaching the target, else the largest tried."""
    passing = [ef for ef, row in sweep.items() if row["recall_at_10"] >= RECALL_TARGET]
    return min(passing) if passing else max(sweep)


async def _plan(conn: psycopg.AsyncConnection, vector: np.ndarray, ef: int) -> str:
    """EXPLAIN of the similar route's ranking query: does it use the HNSW index?"""
    async with conn.transaction():
        await conn.execute(search.SQL.ef_search, (str(ef),))
        cur = await conn.execute(
            "EXPLAIN " + search.SQL.nearest_ids,
            {"v": vector, "n": SIMILAR_CHUNKS, "exclude": None},
        )
        return "\n".join(row[0] for row in await cur.fetchall())


def _cosine_levels(vectors: np.ndarray, truth: list[Exact]) -> dict:
    """How the generated space looks: cosine of each query to its 1st and 10th nearest chunk,
    and the median between two queries (nearly always of unrelated documents)."""
    pairs = vectors @ vectors.T
    return {
        "nearest_1": round(float(np.mean([t.scores[0] for t in truth])), 3),
        "nearest_10": round(float(np.mean([t.scores[K - 1] for t in truth])), 3),
        "query_pairs_median": round(float(np.median(pairs[np.triu_indices(len(vectors), 1)])), 3),
    }


# ---------------------------------------------------------------- server and load


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_options(workers: int, access_log: bool) -> list[str]:
    """The `blogqa serve` options of a run (besides host and port)."""
    options = ["--workers", str(workers)] if workers > 1 else []
    return options if access_log else [*options, "--no-access-log"]


@contextlib.contextmanager
def running_server(
    home: Path,
    ef_search: int,
    workers: int,
    access_log: bool = True,
    extra_env: dict[str, str] | None = None,
) -> Iterator[tuple[int, int]]:
    """`blogqa serve` on a free port; yields (port, pid) once /health answers 200."""
    port = _free_port()
    command = [str(Path(sys.executable).with_name("blogqa")), "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), *serve_options(workers, access_log)]
    env = {
        **os.environ,
        "BLOGQA_HNSW_EF_SEARCH": str(ef_search),
        # one client sends every request: the per-client limit would refuse the bench
        "BLOGQA_API_RATE_LIMIT_PER_MINUTE": "0",
        **(extra_env or {}),
    }
    log_path = home / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", process, log_path)
            yield port, process.pid
        finally:
            # SIGINT, not SIGTERM: uvicorn re-raises the signal after its graceful shutdown, and
            # a process killed by SIGTERM skips its exit handlers, which is where pgserver
            # forgets a process using the embedded server (it then never stops the server).
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(base: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"blogqa serve exited: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"blogqa serve did not become healthy: {log_path.read_text()[-2000:]}")


class KeepAliveClient:
    """A minimal HTTP/1.1 client on one keep-alive connection: one per simulated client.

    The load generator shares the machine's cores with the server and PostgreSQL, so its own
    CPU per request is taken from theirs. httpx.AsyncClient spent 2.5-3.8 ms of CPU per request
    here; this spends a small fraction of that. It reads exactly what uvicorn sends for these
    routes (a Content-Length body) and fails loudly on anything else.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n"
        if method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        message = head.encode() + b"\r\n" + body
        reused = self._writer is not None
        try:
            return await self._exchange(message, method, target)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
        # uvicorn closes a keep-alive connection idle for 5 s (while one client runs alone, the
        # others wait): like any HTTP client, open a new one and send again.
        await self.close()
        return await self._exchange(message, method, target)

    async def _exchange(self, message: bytes, method: str, target: str) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._writer.write(message)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if line)
        if b"content-length" not in headers:
            raise RuntimeError(f"no Content-Length in the response to {method} {target}")
        content = await self._reader.readexactly(int(headers[b"content-length"]))
        if headers.get(b"connection") == b"close":
            await self.close()
        return int(lines[0].split()[1]), content

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None


@dataclass(frozen=True)
class Route:
    """One measured route: `make(rng)` returns (method, target, JSON body bytes)."""

    name: str
    group: str  # which target applies: by-url, by-id, similar or none
    make: Callable[[np.random.Generator], tuple[str, str, bytes]]


def _get(path: str, **params: str) -> tuple[str, str, bytes]:
    return "GET", f"{path}?{urlencode(params)}" if params else path, b""


def _post(path: str, payload: dict) -> tuple[str, str, bytes]:
    return "POST", path, json.dumps(payload).encode()


def routes(keys: dict, text: TextMaker) -> list[Route]:
    """The routes of the issue, each on keys drawn uniformly from every stored row."""
    urls, documents, questions = keys["urls"], keys["documents"], keys["questions"]

    def pick(values: list, rng: np.random.Generator) -> object:
        return values[int(rng.integers(len(values)))]

    similar = "/api/v1/search/similar"
    return [
        Route(
            "GET /api/v1/questions/by-url",
            "by-url",
            lambda r: _get("/api/v1/questions/by-url", url=pick(urls, r)),
        ),
        Route(
            "GET /api/v1/documents/{id}",
            "by-id",
            lambda r: _get(f"/api/v1/documents/{pick(documents, r)}"),
        ),
        Route(
            "GET /api/v1/questions/{id}",
            "by-id",
            lambda r: _get(f"/api/v1/questions/{pick(questions, r)}"),
        ),
        Route(
            "POST /api/v1/search/similar (url)",
            "similar",
            lambda r: _post(similar, {"url": pick(urls, r), "k": K}),
        ),
        Route(
            "POST /api/v1/search/similar (text)",
            "similar",
            lambda r: _post(similar, {"text": text.phrase(3, 8), "k": K}),
        ),
        Route(
            "POST /api/v1/qa/ask",
            "none",
            lambda r: _post("/api/v1/qa/ask", {"question": text.phrase(4, 10) + "?"}),
        ),
    ]


def sample_keys(conn: psycopg.Connection) -> dict:
    """Every document URL and id and every question id, to draw request keys from."""
    docs = conn.execute("SELECT id, url FROM blogqa.documents").fetchall()
    questions = [row[0] for row in conn.execute("SELECT id FROM blogqa.questions")]
    return {
        "documents": [d[0] for d in docs],
        "urls": [d[1] for d in docs],
        "questions": questions,
    }


class CpuMeter:
    """CPU seconds used by this process, the API server (with any workers) and PostgreSQL
    (the postmaster's live children plus those it has reaped)."""

    def __init__(self, server_pid: int, postmaster_pid: int) -> None:
        self.server = psutil.Process(server_pid)
        self.postmaster = psutil.Process(postmaster_pid)
        self.me = psutil.Process()

    @staticmethod
    def _tree(process: psutil.Process) -> float:
        total = 0.0
        for member in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = member.cpu_times()
                total += times.user + times.system
                if member is process:
                    total += times.children_user + times.children_system
        return total

    def read(self) -> dict:
        times = self.me.cpu_times()
        return {
            "client": times.user + times.system,
            "server": self._tree(self.server),
            "postgres": self._tree(self.postmaster),
        }


@dataclass
class Outcome:
    latencies: list[float]
    elapsed: float
    failures: dict
    result_counts: list[int]


async def _drive(clients: list[KeepAliveClient], requests: list) -> Outcome:
    """Each client sends its next request as soon as it has its previous answer (a closed
    loop), taking requests from one shared iterator until it is empty."""
    pending = iter(requests)
    outcome = Outcome([], 0.0, {}, [])

    async def one_client(client: KeepAliveClient) -> None:
        for method, target, body in pending:
            started = time.perf_counter()
            status, content = await client.request(method, target, body)
            outcome.latencies.append((time.perf_counter() - started) * 1000)
            if status != 200:
                outcome.failures[status] = outcome.failures.get(status, 0) + 1
            elif target.endswith("/similar"):
                outcome.result_counts.append(len(json.loads(content)["results"]))

    started = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in clients))
    outcome.elapsed = time.perf_counter() - started
    return outcome


def _percentiles(latencies: list[float]) -> dict:
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
    }


async def _measure(clients, route: Route, rng, requests: int, warmup: int, meter) -> dict:
    await _drive(clients, [route.make(rng) for _ in range(warmup)])
    batch = [route.make(rng) for _ in range(requests)]
    before = meter.read()
    outcome = await _drive(clients, batch)
    after = meter.read()
    row = {
        "requests": requests,
        **_percentiles(outcome.latencies),
        "mean_ms": round(float(np.mean(outcome.latencies)), 2),
        "requests_per_s": round(requests / outcome.elapsed, 1),
        "non_200": outcome.failures,
        "cpu_ms_per_request": {
            name: round((after[name] - before[name]) * 1000 / requests, 3) for name in after
        },
    }
    if outcome.result_counts:
        row["mean_results"] = round(float(np.mean(outcome.result_counts)), 2)
    return row


async def measure_routes(
    base: tuple[str, int], route_list: list[Route], args: argparse.Namespace, meter: CpuMeter
) -> dict:
    """Per route: `clients` concurrent clients, then one client alone (the service time
    without queueing, to tell the server's own latency from the wait for a CPU)."""
    rng = np.random.default_rng(11)
    clients = [KeepAliveClient(*base) for _ in range(args.clients)]
    results = {}
    try:
        for route in route_list:
            row = await _measure(clients, route, rng, args.requests, args.warmup, meter)
            alone = await _measure(clients[:1], route, rng, args.single_requests, 20, meter)
            row["group"] = route.group
            row["one_client"] = {k: alone[k] for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")}
            results[route.name] = row
            console.print(
                f"  {route.name:36} p50 {row['p50_ms']:7.2f}  p95 {row['p95_ms']:7.2f}  "
                f"p99 {row['p99_ms']:7.2f} ms  {row['requests_per_s']:6.1f} req/s  "
                f"(1 client: p95 {alone['p95_ms']:.2f} ms)"
            )
    finally:
        for client in clients:
            await client.close()
    return results


# ---------------------------------------------------------------- open loop (issue 13)

# The handler writes a response's head and body in two sends; on a kept-alive connection
# Nagle's algorithm then holds the body until the client's delayed ACK of the head (40 ms
# here), a stall of the test server that a real endpoint does not have: TCP_NODELAY.
MODEL_SERVER_CODE = """
import socket, sys, time
sys.path.insert(0, {root!r})
from bench.servers import LatencyOpenAI, LatencyOpenAIHandler

class Handler(LatencyOpenAIHandler):
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

server = LatencyOpenAI(chat_latency=0.0, embed_latency=0.0, api_key="bench-key")
server.httpd.RequestHandlerClass = Handler
server.start()
print(server.base_url, flush=True)
while True:
    time.sleep(3600)
"""


@contextlib.contextmanager
def model_server() -> Iterator[tuple[str, int]]:
    """The OpenAI-compatible server answering at once, in its own process; yields (base URL,
    pid)."""
    process = subprocess.Popen(
        [sys.executable, "-c", MODEL_SERVER_CODE.format(root=str(REPO))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base = process.stdout.readline().strip()
        if not base.startswith("http://"):
            raise RuntimeError("the model server did not start")
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


class OpenCpuMeter(CpuMeter):
    """CpuMeter plus the model server's process."""

    def __init__(self, server_pid: int, postmaster_pid: int, model_pid: int) -> None:
        super().__init__(server_pid, postmaster_pid)
        self.model = psutil.Process(model_pid)

    def read(self) -> dict:
        return {**super().read(), "model_server": self._tree(self.model)}


async def open_loop(
    base: tuple[str, int], route: Route, rate: float, count: int, rng: np.random.Generator
) -> dict:
    """`count` requests at `rate` per second on a fixed schedule; latency from each request's
    scheduled send time. A request whose turn comes while every connection is busy opens a new
    one (as a fleet of independent clients would)."""
    # perf_counter, not loop.time(): uvloop's clock has millisecond steps and is read once
    # per loop iteration, which would round every latency to whole milliseconds
    clock = time.perf_counter
    idle: list[KeepAliveClient] = []
    opened = 0
    latencies: list[float] = []
    lags: list[float] = []
    failures: dict[int, int] = {}

    async def one(scheduled: float, request: tuple[str, str, bytes]) -> None:
        nonlocal opened
        lags.append((clock() - scheduled) * 1000)
        if idle:
            client = idle.pop()
        else:
            client, opened = KeepAliveClient(*base), opened + 1
        status, _ = await client.request(*request)
        latencies.append((clock() - scheduled) * 1000)
        idle.append(client)
        if status != 200:
            failures[status] = failures.get(status, 0) + 1

    requests = [route.make(rng) for _ in range(count)]
    interval = 1.0 / rate
    start = clock() + 0.05
    tasks = []
    for i, request in enumerate(requests):
        scheduled = start + i * interval
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, request)))
    await asyncio.gather(*tasks)
    elapsed = clock() - start
    for client in idle:
        await client.close()
    return {
        "offered_per_s": rate,
        "requests": count,
        **_percentiles(latencies),
        "max_ms": round(max(latencies), 2),
        "achieved_per_s": round(count / elapsed, 1),
        "send_lag_p95_ms": round(float(np.percentile(lags, 95)), 2),
        "connections_opened": opened,
        "non_200": failures,
    }


async def measure_open_loop(
    base: tuple[str, int], route_list: list[Route], seconds: float, meter: OpenCpuMeter
) -> list[dict]:
    by_name = {route.name: route for route in route_list}
    rng = np.random.default_rng(13)
    results = []
    for name, rate, target in OPEN_LOOP:
        route = by_name[name]
        await open_loop(base, route, rate, int(rate * 2), rng)  # warm-up: 2 s at the rate
        count = int(rate * seconds)
        before = meter.read()
        row = await open_loop(base, route, rate, count, rng)
        after = meter.read()
        row["cpu_ms_per_request"] = {
            key: round((after[key] - before[key]) * 1000 / count, 3) for key in after
        }
        row.update({"route": name, "target_p95_ms": target, "met": row["p95_ms"] < target})
        results.append(row)
        console.print(
            f"  {name:36} {rate:4d}/s offered  p50 {row['p50_ms']:6.2f}  p95 {row['p95_ms']:6.2f}"
            f"  p99 {row['p99_ms']:7.2f} ms  server CPU {row['cpu_ms_per_request']['server']:.2f}"
            f" ms/req  ({'met' if row['met'] else 'MISSED'}: p95 < {target:g} ms)"
        )
    return results


def run_open(args: argparse.Namespace) -> dict:
    """The open-loop phase on the corpus of `args` (built if missing)."""
    _isolate(args.home)
    settings = load_settings()
    spec = CorpusSpec(documents=args.documents, dim=settings.embed_dim)
    machine = machine_facts()
    apply_shared_buffers(settings, args.shared_buffers)
    with db.connect(settings) as conn:
        load = _corpus(conn, spec, args)
        conn.execute("TRUNCATE blogqa.llm_usage")
        keys, facts = sample_keys(conn), postgres_facts(conn)
        ef = args.ef_search
        with model_server() as (model_base, model_pid):
            env = {
                "BLOGQA_LLM_PROVIDER": "openai",
                "OPENAI_BASE_URL": f"{model_base}/v1",
                "OPENAI_API_KEY": "bench-key",
                "BLOGQA_CHAT_MODEL": "bench-chat",
                "BLOGQA_EMBED_MODEL": "text-embedding-3-small",
            }
            console.print(
                f"blogqa serve, OpenAI provider at {model_base} (answers at once),"
                f" {args.documents} documents, open loop…"
            )
            access_log = args.access_log == "on"
            with running_server(args.home, ef, args.workers, access_log, env) as (port, pid):
                meter = OpenCpuMeter(pid, _postmaster_pid(settings), model_pid)
                route_list = routes(keys, TextMaker(np.random.default_rng(12)))
                rows = uvloop.run(
                    measure_open_loop(("127.0.0.1", port), route_list, args.seconds, meter)
                )
    return {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/api_bench.py " + " ".join(sys.argv[1:]),
        "machine": {**machine, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "corpus": {
            "documents": spec.documents,
            "question_vectors": spec.questions,
            "chunk_vectors": spec.chunks,
            "reused": load.get("reused"),
            "vacuumed_before_measuring": load.get("vacuumed_before_measuring"),
        },
        "postgres": facts,
        "server": {
            "command": "blogqa serve " + " ".join(serve_options(args.workers, access_log)),
            "provider": "openai (AsyncOpenAI, one client per event loop) against"
            " bench/servers.py's OpenAI-compatible server answering at once",
            "hnsw_ef_search": ef,
            "rate_limit": "off (BLOGQA_API_RATE_LIMIT_PER_MINUTE=0)",
        },
        "seconds_per_rate": args.seconds,
        "results": rows,
    }


# ---------------------------------------------------------------- report


def postgres_facts(conn: psycopg.Connection) -> dict:
    names = ("server_version", "shared_buffers", "work_mem", "max_connections", "jit")
    facts = {
        name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
        for name in names
    }
    facts["pgvector"] = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
    ).fetchone()[0]
    return facts


def machine_facts() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def targets(recall: dict, route_results: dict) -> dict:
    """Each target of the issue with the measured value and whether it is met."""
    checks = {}
    for name, row in route_results.items():
        limit = TARGET_P95_MS.get(row["group"])
        if limit is not None:
            checks[f"{name} p95 < {limit:g} ms"] = {
                "value": row["p95_ms"],
                "met": row["p95_ms"] < limit,
            }
    chosen = recall["sweep"][recall["chosen_ef_search"]]["recall_at_10"]
    checks[f"recall@10 >= {RECALL_TARGET}"] = {"value": chosen, "met": chosen >= RECALL_TARGET}
    return checks


def print_report(results: dict) -> None:
    table = Table(title=f"blogqa serve, {results['clients']} concurrent clients")
    columns = ("route", "p50 ms", "p95 ms", "p99 ms", "req/s", "1 client p95", "CPU ms/req")
    for column in columns:
        table.add_column(column, justify="left" if column == "route" else "right")
    for name, row in results["routes"].items():
        cpu = row["cpu_ms_per_request"]
        table.add_row(
            name,
            f"{row['p50_ms']:.2f}",
            f"{row['p95_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            f"{row['requests_per_s']:.0f}",
            f"{row['one_client']['p95_ms']:.2f}",
            f"{cpu['client']:.2f} / {cpu['server']:.2f} / {cpu['postgres']:.2f}",
        )
    console.print(table)
    recall = results["recall"]
    sweep = Table(title=f"HNSW recall@10 vs exact, {recall['queries']} held-out queries")
    for column in ("ef_search", "recall@10", "query p50 ms", "query p95 ms"):
        sweep.add_column(column, justify="right")
    for ef, row in recall["sweep"].items():
        mark = " (chosen)" if ef == recall["chosen_ef_search"] else ""
        sweep.add_row(
            f"{ef}{mark}", f"{row['recall_at_10']:.3f}", f"{row['p50_ms']}", f"{row['p95_ms']}"
        )
    console.print(sweep)
    for name, check in results["targets"].items():
        colour = "green" if check["met"] else "red"
        console.print(
            f"[{colour}]{'met ' if check['met'] else 'MISSED'}[/{colour}] {name}: {check['value']}"
        )


# ---------------------------------------------------------------- main


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per route")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per route")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument(
        "--single-requests", type=int, default=300, help="requests per route with one client"
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of blogqa serve")
    parser.add_argument(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="uvicorn's access log (blogqa serve --no-access-log when off)",
    )
    parser.add_argument("--documents", type=int, default=10_000, help="documents to generate")
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--rebuild", action="store_true", help="regenerate the corpus")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="the bench's BLOGQA_HOME")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--phase",
        choices=("all", "closed", "open"),
        default="all",
        help="closed: recall and 16 closed-loop clients (offline provider); open: the OpenAI"
        " provider at fixed offered rates (issue 13); all: both",
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="measured seconds per rate (open loop)"
    )
    parser.add_argument(
        "--shared-buffers",
        default="default",
        help="PostgreSQL shared_buffers of the bench's private server, e.g. 1GB (set with ALTER"
        " SYSTEM, the server restarted when it changes); default: the server's own (128MB in"
        " the embedded server)",
    )
    parser.add_argument(
        "--ef-search",
        type=int,
        default=HNSW_EF_SEARCH_DEFAULT,
        help="hnsw.ef_search of the open-loop server (the closed phase measures its own)",
    )
    return parser.parse_args()


def _isolate(home: Path) -> None:
    """Only the bench's own settings: its BLOGQA_HOME, offline provider, default dimension."""
    for name in list(os.environ):
        if name.startswith(("BLOGQA_", "OPENAI_")) or name == "AIRFLOW_CONN_BLOGQA_DB":
            del os.environ[name]
    os.environ["BLOGQA_HOME"] = str(home.resolve())
    os.environ["BLOGQA_LLM_PROVIDER"] = "local"


def _postmaster_pid(settings: Settings) -> int:
    return int((settings.pgdata / "postmaster.pid").read_text().split()[0])


def _corpus(conn: psycopg.Connection, spec: CorpusSpec, args: argparse.Namespace) -> dict:
    """The load figures of the corpus in the database, generating it when needed."""
    load = None if args.rebuild else existing_load(conn, spec)
    if load is None:
        return {**load_corpus(conn, spec), "reused": False}
    console.print(f"reusing the corpus in {args.home.name} (--rebuild regenerates it)")
    vacuumed = vacuum_dead_rows(conn)
    return {**load, "reused": True, "vacuumed_before_measuring": vacuumed}


# Tables of the corpus a migration may rewrite rows of (011 set two new columns of every
# question): each then holds dead rows until a VACUUM, which is slow on a table with an HNSW
# index (the vacuum scans the whole index).
CORPUS_TABLES = ("documents", "summaries", "questions", "chunks")


def vacuum_dead_rows(conn: psycopg.Connection) -> dict:
    """VACUUM (ANALYZE) each corpus table that holds dead rows; returns {table: seconds}.

    The embedded server only runs while a bench runs, and autovacuum starts on such a table
    within a minute of start-up: it then spends a core on the vacuum during the measurement
    (the PostgreSQL CPU per request counts it) and is cut off when the bench stops the
    server, so every later run repeats it. Vacuumed here, before the clock starts, it is
    done once."""
    rows = conn.execute(
        "SELECT relname FROM pg_stat_user_tables"
        " WHERE schemaname = 'blogqa' AND relname = ANY(%s) AND n_dead_tup > 0",
        (list(CORPUS_TABLES),),
    ).fetchall()
    done = {}
    for (name,) in rows:
        console.print(f"VACUUM (ANALYZE) blogqa.{name}: it holds dead rows…")
        started = time.perf_counter()
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier("blogqa", name)))
        done[name] = round(time.perf_counter() - started, 1)
    return done


def apply_shared_buffers(settings: Settings, value: str) -> str:
    """Set the bench server's shared_buffers (`default`: the server's own configured value,
    128MB in the embedded server) and restart it when that changes it; returns the value in
    force.

    An HNSW scan reads each visited graph element's page (one 1536-dimension element per
    8 KB page in pgvector 0.6): when the index does not fit in shared_buffers, most of those
    pages are copied in from the OS page cache on every search, which is most of the
    search's CPU. The setting belongs to the server, not the API, so the bench takes it as
    a parameter and records it."""
    with db.connect(settings) as conn:
        if value == "default":
            conn.execute("ALTER SYSTEM RESET shared_buffers")
        else:
            conn.execute(sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # the postmaster rereads the files asynchronously
        pending = conn.execute(
            "SELECT pending_restart FROM pg_settings WHERE name = 'shared_buffers'"
        ).fetchone()[0]
    if pending:
        console.print(f"restarting the bench's PostgreSQL for shared_buffers = {value}…")
        embedded.release(settings)  # this process is the only holder: the server stops
    with db.connect(settings) as conn:
        return conn.execute("SHOW shared_buffers").fetchone()[0]


def _run_recall(conn: psycopg.Connection, settings: Settings, spec: CorpusSpec, count: int) -> dict:
    console.print(f"recall@10 against exact search, {count} queries…")
    chunks = stored_chunks(conn)
    return uvloop.run(measure_recall(settings, spec, chunks, count))


def _serve_and_measure(settings: Settings, keys: dict, ef: int, args: argparse.Namespace) -> dict:
    console.print(
        f"blogqa serve (ef_search {ef}, {args.workers} worker(s), access log {args.access_log}),"
        f" {args.clients} clients…"
    )
    with running_server(args.home, ef, args.workers, args.access_log == "on") as (port, pid):
        meter = CpuMeter(pid, _postmaster_pid(settings))
        route_list = routes(keys, TextMaker(np.random.default_rng(12)))
        return uvloop.run(measure_routes(("127.0.0.1", port), route_list, args, meter))


def run(args: argparse.Namespace) -> dict:
    """Corpus, recall sweep, then the server under load; returns every figure."""
    _isolate(args.home)
    settings = load_settings()
    spec = CorpusSpec(documents=args.documents, dim=settings.embed_dim)
    machine = machine_facts()
    apply_shared_buffers(settings, args.shared_buffers)
    started = time.perf_counter()
    # This connection stays open for the whole run: the embedded server lives while a process
    # that started or attached to it is alive.
    with db.connect(settings) as conn:
        load = _corpus(conn, spec, args)
        conn.execute("TRUNCATE blogqa.llm_usage")  # the ask route's ledger, from earlier runs
        keys, facts = sample_keys(conn), postgres_facts(conn)
        recall = _run_recall(conn, settings, spec, args.recall_queries)
        route_results = _serve_and_measure(settings, keys, recall["chosen_ef_search"], args)
    return {
        "benchmark": "api_bench",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/api_bench.py " + " ".join(sys.argv[1:]),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": {**machine, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "postgres": facts,
        "server": {
            "command": " ".join(
                [
                    "blogqa serve --host 127.0.0.1 --port <free port>",
                    *serve_options(args.workers, args.access_log == "on"),
                ]
            ),
            "uvicorn_workers": args.workers,
            "uvicorn_loop_http": "auto: uvloop and httptools (both installed)",
            "pool_max_size_per_worker": POOL_MAX_SIZE,
            "ledger_pool_max_size_per_worker": LEDGER_POOL_MAX_SIZE,
            "hnsw_ef_search": recall["chosen_ef_search"],
            "hnsw_ef_search_app_default": HNSW_EF_SEARCH_DEFAULT,
            "access_log": f"{args.access_log} (uvicorn log level info, to a file)",
            "provider": "local (offline)",
        },
        "clients": args.clients,
        "warmup_per_route": args.warmup,
        "corpus": {
            **asdict(spec),
            "question_vectors": spec.questions,
            "chunk_vectors": spec.chunks,
            "summary_vectors": spec.documents,
            "distribution": "hierarchical Gaussian mixture (topic > document > question/chunk)"
            " + shared offset, L2-normalised",
            "load": load,
        },
        "recall": recall,
        "routes": route_results,
        "targets": targets(recall, route_results),
    }


def open_results_key(args: argparse.Namespace) -> str:
    """The section of bench/results/api_open_loop.json a run replaces: one per corpus size
    and shared_buffers, so runs with the server's default and a larger value sit side by side."""
    key = f"{args.documents}_documents"
    return (
        key if args.shared_buffers == "default" else f"{key}_shared_buffers_{args.shared_buffers}"
    )


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def main() -> int:
    args = _parse_args()
    if args.phase in ("all", "closed"):
        results = run(args)
        print_report(results)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {_shown(args.output)}")
    if args.phase in ("all", "open"):
        section = run_open(args)
        merged = json.loads(OPEN_RESULTS.read_text()) if OPEN_RESULTS.exists() else {}
        merged["benchmark"] = "api_bench --phase open"
        merged.setdefault("corpora", {})[open_results_key(args)] = section
        OPEN_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        OPEN_RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
        console.print(f"wrote {_shown(OPEN_RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
