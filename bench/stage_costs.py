"""Costs of the pipeline's stages in isolation: extraction, claim, embedding replies, load.

Usage: python bench/stage_costs.py [--pages 200] [--queue-sizes 1000 1000000]
           [--claim-limits 25 100 500 10000] [--claim-reps 200] [--load-docs 300]

- extraction: ms of CPU per page for blogqa.extract.extract_article over the synthetic
  articles of bench/servers.py (the first call of a process is reported apart: it pays
  trafilatura's lazy set-up);
- claim: latency of blogqa.queue.claim at each queue size (rows made with generate_series),
  for 25 and 100 rows (a small and the default chunk), the DAG's default max_urls 500, and
  the 10,000 that `blogqa run` asks for per DAG run; claimed rows are put back between
  repetitions so the queue keeps its size; the queue is checkpointed after it is filled and
  the first few claims are not timed, so the figures are the steady state, not the bulk
  insert's write-back; plus queue_stats.has_claimable, which `blogqa run` calls before every run;
- embedding replies: ms of client CPU per input to receive and parse an embeddings response
  with blogqa's embedder, and with the openai client's default (base64) format, from the
  zero-latency test server;
- load: ms per document of the load stage's store call (`load_documents`, a chunk of
  `--load-batch` documents per transaction, or `load_document`, one per transaction, whichever
  this version of blogqa.store has: document, summary, questions, chunks with their vectors,
  queue rows done) for realistic work items, with the schema's HNSW indexes and without them,
  to show what the indexes cost.

Runs in its own BLOGQA_HOME (.blogqa/bench-stages/, removed afterwards) and writes
bench/results/stage_costs.json. Wall-clock timings on a shared machine: compare runs of the
same machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from blogqa import db, embedded, pipeline, queue, queue_stats, store
from blogqa.config import Settings, load_settings
from blogqa.embed import OpenAIEmbedder
from blogqa.extract import extract_article
from blogqa.llm import PROMPT_VERSION
from blogqa.tokens import split_sentences
from blogqa.urls import normalize_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # run as a script: the sibling module below

from common import code_fingerprint, load_average, machine_facts
from servers import article_pages, start_latency_openai

RESULTS = ROOT / "bench" / "results" / "stage_costs.json"
HOMES = ROOT / ".blogqa" / "bench-stages"
EMBED_MODEL = "text-embedding-3-small"
OWNER = "bench-stage-costs"

console = Console(highlight=False)


def summary_ms(samples: list[float]) -> dict:
    """p50/p95/mean/max of millisecond samples."""
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "max_ms": round(ordered[-1], 3),
    }


# ---------------------------------------------------------------- extraction


def bench_extraction(pages: dict[str, bytes], repeats: int) -> dict:
    """ms per page of extract_article (the crawl stage's CPU work): CPU time of this process,
    and wall time, which is higher when other processes compete for the cores."""
    items = list(pages.items())
    path, body = items[0]
    started = time.process_time()
    extract_article(body.decode("utf-8"), f"http://127.0.0.1{path}")
    first_ms = (time.process_time() - started) * 1000
    cpu, wall, words = [], [], []
    for _ in range(repeats):
        for path, body in items:
            started, clock = time.process_time(), time.perf_counter()
            article = extract_article(body.decode("utf-8"), f"http://127.0.0.1{path}")
            cpu.append((time.process_time() - started) * 1000)
            wall.append((time.perf_counter() - clock) * 1000)
            words.append(len(article.text.split()))
    return {
        "pages": len(items),
        "repeats": repeats,
        "first_call_cpu_ms": round(first_ms, 1),
        "cpu_ms_per_page": summary_ms(cpu),
        "wall_ms_per_page": summary_ms(wall),
        "words_per_page": {
            "min": min(words),
            "mean": round(statistics.fmean(words)),
            "max": max(words),
        },
        "page_kb_mean": round(statistics.fmean(len(b) for b in pages.values()) / 1024, 1),
    }


# ---------------------------------------------------------------- claim


def fill_queue(conn: psycopg.Connection, rows: int) -> float:
    """An empty queue, then `rows` queued URLs in one INSERT ... SELECT; returns seconds."""
    conn.execute("TRUNCATE blogqa.url_queue RESTART IDENTITY CASCADE")
    started = time.perf_counter()
    conn.execute(
        "INSERT INTO blogqa.url_queue (url)"
        " SELECT 'https://bench.example/post/' || g FROM generate_series(1, %s) AS g",
        (rows,),
    )
    conn.execute("VACUUM ANALYZE blogqa.url_queue")
    # Write the fill's dirty pages out now, so the claims are not timed against a checkpoint
    # flushing a million freshly inserted rows (that is the fill's cost, not the claim's).
    conn.execute("CHECKPOINT")
    return time.perf_counter() - started


def requeue(conn: psycopg.Connection, ids: list[int]) -> None:
    """Put claimed rows back (untimed), so every repetition sees the same queue size."""
    conn.execute(
        "UPDATE blogqa.url_queue SET status = 'queued', attempts = 0, lease_owner = NULL,"
        " lease_token = NULL, lease_until = NULL, started_at = NULL, run_after = now()"
        " WHERE id = ANY(%s)",
        (ids,),
    )


WARM_UP_CLAIMS = 5


def bench_claim(settings: Settings, sizes: list[int], limits: list[int], reps: int) -> list[dict]:
    results = []
    with db.connect(settings) as conn:
        for size in sizes:
            seconds = fill_queue(conn, size)
            console.print(f"queue of {size:,} rows made in {seconds:.1f} s")
            counts = []
            for _ in range(20):
                started = time.perf_counter()
                queue_stats.has_claimable(conn)
                counts.append((time.perf_counter() - started) * 1000)
            results.append(
                {"queued_rows": size, "operation": "has_claimable", **summary_ms(counts)}
            )
            for limit in limits:
                # big claims are slow and move many rows: fewer repetitions, same row count
                n = max(5, min(reps, reps * 500 // limit))
                samples, claimed = [], 0
                for i in range(n + WARM_UP_CLAIMS):
                    started = time.perf_counter()
                    leases = queue.claim(
                        conn, limit, owner=OWNER, lease_seconds=settings.lease_seconds
                    )
                    if i >= WARM_UP_CLAIMS:  # the first ones read the index into memory
                        samples.append((time.perf_counter() - started) * 1000)
                    claimed = len(leases)
                    requeue(conn, [lease.id for lease in leases])
                results.append(
                    {
                        "queued_rows": size,
                        "operation": f"claim(limit={limit})",
                        "rows_per_claim": claimed,
                        **summary_ms(samples),
                    }
                )
                console.print(f"  claim {limit:>5} of {size:,}: p95 {results[-1]['p95_ms']} ms")
        conn.execute("TRUNCATE blogqa.url_queue RESTART IDENTITY CASCADE")
    return results


# ---------------------------------------------------------------- embedding replies


def bench_embedding_replies(settings: Settings, inputs: int, repeats: int) -> dict:
    """Client ms per input to get one embeddings reply from a zero-latency server: blogqa's
    OpenAIEmbedder as the pipeline calls it, and the raw client in its default format."""
    from openai import AsyncOpenAI

    api = start_latency_openai(0.0, 0.0, "bench-key")
    texts = [f"input {i}: a sentence of about the length of a question" for i in range(inputs)]

    def client() -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="bench-key", max_retries=0)

    async def blogqa_embedder() -> float:
        embedder = OpenAIEmbedder(settings, client=client())
        try:
            await embedder.embed(texts[:8])  # connection and first-use set-up
            started = time.perf_counter()
            for _ in range(repeats):
                await embedder.embed(texts)
            return (time.perf_counter() - started) * 1000 / (repeats * inputs)
        finally:
            await embedder.aclose()

    async def client_default() -> float:
        raw = client()
        try:
            await raw.embeddings.create(model=EMBED_MODEL, input=texts[:8], dimensions=1536)
            started = time.perf_counter()
            for _ in range(repeats):
                response = await raw.embeddings.create(
                    model=EMBED_MODEL, input=texts, dimensions=settings.embed_dim
                )
                np.asarray([row.embedding for row in response.data], dtype=np.float32)
            return (time.perf_counter() - started) * 1000 / (repeats * inputs)
        finally:
            await raw.close()

    try:
        return {
            "inputs_per_request": inputs,
            "repeats": repeats,
            "blogqa_embedder_ms_per_input": round(asyncio.run(blogqa_embedder()), 3),
            "openai_default_base64_ms_per_input": round(asyncio.run(client_default()), 3),
        }
    finally:
        api.stop()


# ---------------------------------------------------------------- load


def work_items(
    conn: psycopg.Connection, settings: Settings, pages: dict[str, bytes], rng: np.random.Generator
) -> list[store.WorkItem]:
    """Claimed queue rows with everything load needs: extracted page, a summary and five
    question/answer pairs from its sentences, ~300-token chunks, unit vectors."""
    urls = [f"https://bench.example{path}" for path in pages]
    queue.enqueue(conn, urls, force=True, max_attempts=settings.max_attempts)
    leases = {
        lease.url: lease
        for lease in queue.claim(conn, len(urls), owner=OWNER, lease_seconds=settings.lease_seconds)
    }
    items = []
    for (path, body), url in zip(pages.items(), urls, strict=True):
        article = extract_article(body.decode("utf-8"), url)
        sentences = split_sentences(article.text)
        llm = {
            "summary": " ".join(sentences[1:3]),
            "qa": [
                {"question": f"What does the post say in passage {i}?", "answer": sentences[i]}
                for i in range(3, 8)
            ],
            "model": "gpt-4o-mini",
            "prompt_version": PROMPT_VERSION,
            "input_truncated": False,
        }
        fetched = SimpleNamespace(url=url, final_url=url, etag=None, last_modified=None)
        item = store.WorkItem(
            lease=leases[normalize_url(url)],
            page=pipeline._page(fetched, article, f"bench-{path}"),
            unchanged=False,
            llm_result=llm,
            chunks=None,
            vectors=None,
        )
        # the texts the embed stage would send: summary, questions, retrieval chunks
        texts, chunks = pipeline.embedding_inputs(item, settings)
        vectors = rng.standard_normal((len(texts), settings.embed_dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        items.append(dataclasses.replace(item, chunks=chunks, vectors=vectors.astype(np.float32)))
    return items


def time_loads(
    conn: psycopg.Connection, settings: Settings, items: list[store.WorkItem], batch: int
) -> dict:
    now = dt.datetime.now(dt.UTC)
    per_doc = []
    for start in range(0, len(items), batch):
        group = items[start : start + batch]
        started = time.perf_counter()
        for item in group:
            store.check_complete(item)
        _, lost = store.load_documents(
            conn, group, embed_model=settings.embed_model, fetched_at=now
        )
        if lost:
            raise RuntimeError(f"{len(lost)} leases lost during the load benchmark")
        per_doc += [(time.perf_counter() - started) * 1000 / len(group)] * len(group)
    tenth = max(1, len(per_doc) // 10)
    vectors = sum(len(item.vectors) for item in items)
    return {
        "api": "store.load_documents",
        "documents_per_transaction": min(batch, len(items)),
        # per document: a batch's time divided by its documents
        **summary_ms(per_doc),
        "vectors_per_document": round(vectors / len(items), 2),
        "ms_per_vector": round(sum(per_doc) / vectors, 3),
        # HNSW inserts get dearer as the index grows
        "first_tenth_mean_ms": round(statistics.fmean(per_doc[:tenth]), 2),
        "last_tenth_mean_ms": round(statistics.fmean(per_doc[-tenth:]), 2),
    }


HNSW_INDEXES = ("summaries_embedding_idx", "questions_embedding_idx", "chunks_embedding_idx")


def bench_load(
    settings: Settings, pages: dict[str, bytes], batch: int, compare_without_hnsw: bool
) -> dict:
    rng = np.random.default_rng(0)
    result = {"documents": len(pages)}
    with db.connect(settings) as conn:
        items = work_items(conn, settings, pages, rng)
        result["with_hnsw"] = time_loads(conn, settings, items, batch)
        console.print(f"load: {result['with_hnsw']['mean_ms']} ms/document with HNSW indexes")
        if compare_without_hnsw:
            # a throwaway database: drop the indexes and load the same documents again
            conn.execute("TRUNCATE blogqa.documents RESTART IDENTITY CASCADE")
            for name in HNSW_INDEXES:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS blogqa.{}").format(sql.Identifier(name)))
            items = work_items(conn, settings, pages, rng)
            result["without_hnsw"] = time_loads(conn, settings, items, batch)
            console.print(f"load: {result['without_hnsw']['mean_ms']} ms/document without them")
    return result


# ---------------------------------------------------------------- main


def print_report(report: dict) -> None:
    ex = report["extraction"]["cpu_ms_per_page"]
    ex_wall = report["extraction"]["wall_ms_per_page"]
    table = Table(title="stage costs")
    table.add_column("stage")
    table.add_column("measure")
    table.add_column("p50 ms", justify="right")
    table.add_column("p95 ms", justify="right")
    table.add_column("mean ms", justify="right")
    for label, row in (("CPU per page", ex), ("wall per page", ex_wall)):
        table.add_row(
            "extract",
            label,
            f"{row['p50_ms']:.1f}",
            f"{row['p95_ms']:.1f}",
            f"{row['mean_ms']:.1f}",
        )
    for row in report["claim"]:
        table.add_row(
            "claim",
            f"{row['operation']} at {row['queued_rows']:,} queued",
            f"{row['p50_ms']:.2f}",
            f"{row['p95_ms']:.2f}",
            f"{row['mean_ms']:.2f}",
        )
    if "embedding_replies" in report:
        emb = report["embedding_replies"]
        table.add_row(
            "embed",
            "client per input, blogqa embedder",
            "",
            "",
            f"{emb['blogqa_embedder_ms_per_input']:.2f}",
        )
        table.add_row(
            "embed",
            "client per input, openai default (base64)",
            "",
            "",
            f"{emb['openai_default_base64_ms_per_input']:.2f}",
        )
    load = report["load"]
    for key, label in (("with_hnsw", "per document"), ("without_hnsw", "per document, no HNSW")):
        if key in load:
            row = load[key]
            table.add_row(
                "load",
                label,
                f"{row['p50_ms']:.1f}",
                f"{row['p95_ms']:.1f}",
                f"{row['mean_ms']:.1f}",
            )
    console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=200, help="synthetic pages to extract")
    parser.add_argument("--repeats", type=int, default=3, help="extraction passes")
    parser.add_argument("--queue-sizes", type=int, nargs="+", default=[1_000, 1_000_000])
    parser.add_argument("--claim-limits", type=int, nargs="+", default=[25, 100, 500, 10_000])
    parser.add_argument("--claim-reps", type=int, default=200)
    parser.add_argument("--embed-inputs", type=int, default=256)
    parser.add_argument("--load-docs", type=int, default=300)
    parser.add_argument(
        "--load-batch", type=int, default=25, help="documents per load call (a run's chunk size)"
    )
    parser.add_argument("--no-hnsw-comparison", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-home", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    home = HOMES / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    settings = dataclasses.replace(
        load_settings(), home=home, database_url=None, embed_model=EMBED_MODEL, embed_dim=1536
    )
    report: dict = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "code_fingerprint": code_fingerprint(),
        "parameters": {k: v for k, v in vars(args).items() if k != "output"},
    }
    started = time.perf_counter()
    pages = article_pages(max(args.pages, args.load_docs), seed=args.seed)
    try:
        console.rule("extraction")
        report["extraction"] = bench_extraction(
            dict(list(pages.items())[: args.pages]), args.repeats
        )
        console.print(f"extract: {report['extraction']['cpu_ms_per_page']['mean_ms']} ms/page")
        console.rule("embedding replies")
        report["embedding_replies"] = bench_embedding_replies(settings, args.embed_inputs, 3)
        console.rule("claim")
        db.migrate(settings)
        report["claim"] = bench_claim(
            settings, args.queue_sizes, args.claim_limits, args.claim_reps
        )
        console.rule("load")
        report["load"] = bench_load(
            settings,
            dict(list(pages.items())[: args.load_docs]),
            args.load_batch,
            not args.no_hnsw_comparison,
        )
    finally:
        embedded.release(settings)  # stops the embedded PostgreSQL of this home
        if not args.keep_home:
            with contextlib.suppress(OSError):
                shutil.rmtree(home)
    report["machine"]["load_average_at_end"] = load_average()
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    big = [
        r
        for r in report["claim"]
        if r["queued_rows"] >= 1_000_000 and r["operation"].startswith("claim(")
    ]
    report["targets"] = {
        f"claim_p95<5ms_at_{r['queued_rows']:,}_rows_{r['operation']}": {
            "value": r["p95_ms"],
            "met": r["p95_ms"] < 5,
        }
        for r in big
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    for name, target in report["targets"].items():
        console.print(
            f"target {name}: {target['value']} ms -> {'met' if target['met'] else 'NOT met'}"
        )
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    console.print(f"results in {shown}; {report['total_seconds']} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
