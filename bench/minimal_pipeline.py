"""The throughput limit: the pipeline's per-URL work in one minimal asyncio program.

Usage: python bench/minimal_pipeline.py --urls-file F --dsn postgresql://... [--concurrency 8]

bench/pipeline_throughput.py runs this next to the DAG under Airflow's scheduler, against the
same page server and the same slow OpenAI-compatible server (OPENAI_BASE_URL/OPENAI_API_KEY),
with as many model requests in flight as the pipeline may have in all, and reports pipeline
seconds / these seconds. So it does the same work per URL
and nothing else: fetch (httpx), extract (blogqa.extract.extract_article, in a process pool so
every core is used), one chat call with the pipeline's prompt and JSON schema, embeddings of
the same inputs (summary, questions, ~300-token chunks via blogqa.tokens) in requests of up to
256 inputs, and an insert of each document with its vectors into three tables with an HNSW
index each, as the pipeline's summaries, questions and chunks, by binary COPY as blogqa's load
writes them (a transaction per document, on one connection per core). Every URL
streams through on its own, so no stage waits for a batch of others; at most `--concurrency`
model requests (chat and embeddings together) are in flight. Embeddings come in the openai
client's default wire format (base64, decoded by the client); blogqa asks for base64 too and
decodes it straight into its matrix. `--encoding-format float` asks for JSON float lists.
No queue, leases, retries, ledger or Airflow: that overhead is what the ratio measures.

Prints one JSON line with the counts and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import sql

from blogqa.crawl import content_hash
from blogqa.embed import dimensions_kwargs
from blogqa.extract import NothingExtractedError, extract_article
from blogqa.llm import CHAT_TEMPERATURE, RESPONSE_FORMAT, chat_messages, fit_to_budget
from blogqa.tokens import chunk_text, tokenizer_for

SCHEMA = "bench_minimal"
DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
DROP TABLE IF EXISTS {schema}.vectors, {schema}.summaries, {schema}.questions, {schema}.chunks,
    {schema}.documents;
CREATE TABLE {schema}.documents (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url text NOT NULL UNIQUE,
    title text,
    text text NOT NULL,
    content_hash text NOT NULL,
    summary text NOT NULL,
    qa jsonb NOT NULL
);
"""
# one table with an HNSW index per kind of vector, as blogqa's schema has
VECTOR_TABLES = ("summaries", "questions", "chunks")
VECTOR_TABLE_DDL = """
CREATE TABLE {schema}.{table} (
    document_id bigint NOT NULL REFERENCES {schema}.documents (id) ON DELETE CASCADE,
    position integer NOT NULL,
    text text NOT NULL,
    embedding vector({dim}) NOT NULL,
    PRIMARY KEY (document_id, position)
);
CREATE INDEX ON {schema}.{table} USING hnsw (embedding vector_cosine_ops);
"""


@dataclass
class Doc:
    """One URL on its way through: page text, model output, vectors as they arrive."""

    url: str
    title: str | None
    text: str
    prompt_text: str
    chunks: list[str]
    summary: str = ""
    qa: list[dict] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # summary, questions, chunks: to embed
    vectors: np.ndarray | None = None
    missing: int = 0


def prepare(url: str, body: bytes, charset: str | None, settings: dict) -> dict | None:
    """CPU part of a page (runs in a worker process): extract, cut to the token budget, chunk."""
    html: str | bytes = body.decode(charset, errors="replace") if charset else body
    try:
        article = extract_article(html, url)
    except NothingExtractedError:
        return None
    prompt_text, _ = fit_to_budget(article.text, settings["chat_model"], settings["budget"])
    tokenizer = tokenizer_for(settings["embed_model"])
    chunks = chunk_text(
        article.text,
        tokenizer,
        max_tokens=settings["chunk_tokens"],
        overlap_tokens=settings["overlap_tokens"],
    )
    return {
        "title": article.title,
        "text": article.text,
        "prompt_text": prompt_text,
        "chunks": [text for text, _ in chunks],
    }


def _warm(settings: dict) -> None:
    """Start a worker (imports, tokenizers) before pages arrive, so none waits on a cold one."""
    tokenizer_for(settings["embed_model"])
    tokenizer_for(settings["chat_model"])


class Minimal:
    """The streaming program: every URL is its own coroutine from fetch to chat; inputs are
    pooled into embedding requests as they come; finished documents go to the writers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = {
            "chat_model": args.chat_model,
            "embed_model": args.embed_model,
            "budget": args.input_token_budget,
            "chunk_tokens": args.chunk_tokens,
            "overlap_tokens": args.chunk_overlap_tokens,
        }
        self.model_gate = asyncio.Semaphore(args.concurrency)
        self.fetch_gate = asyncio.Semaphore(args.crawl_concurrency)
        self.pending: list[tuple[Doc, int]] = []  # (document, input index) not yet sent
        self.embed_tasks: list[asyncio.Task] = []
        self.done: asyncio.Queue[Doc | None] = asyncio.Queue()
        self.failed: list[tuple[str, str]] = []
        self.counts = {"chat_calls": 0, "embedding_calls": 0, "embedding_inputs": 0}
        self.started = time.perf_counter()
        self.timeline: dict[str, float] = {}  # seconds from start to each milestone

    def mark(self, name: str) -> None:
        """Record when a milestone is first reached (where the time went, in the result)."""
        if name not in self.timeline:
            self.timeline[name] = round(time.perf_counter() - self.started, 3)

    async def run(self, urls: list[str]) -> dict:
        from openai import AsyncOpenAI

        args = self.args
        self.pool = ProcessPoolExecutor(args.workers)
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self.pool, _warm, self.settings) for _ in range(args.workers))
        )
        self.mark("workers_ready")
        self.client = AsyncOpenAI(timeout=60.0, max_retries=2)
        limits = httpx.Limits(max_connections=args.crawl_concurrency)
        self.http = httpx.AsyncClient(timeout=20.0, limits=limits)
        conns = [
            await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
            for _ in range(args.writers)
        ]
        for conn in conns:
            await register_vector_async(conn)
        writers = [asyncio.create_task(self.write(conn)) for conn in conns]
        try:
            await asyncio.gather(*(self.one(url) for url in urls))
            self.mark("last_chat_done")
            self.flush(final=True)
            await asyncio.gather(*self.embed_tasks)
            self.mark("last_embedding_done")
            for _ in writers:
                await self.done.put(None)
            written = sum(await asyncio.gather(*writers))
            self.mark("all_written")
        finally:
            await self.http.aclose()
            await self.client.close()
            for conn in conns:
                await conn.close()
            self.pool.shutdown()
        return {
            "documents": written,
            "failed": len(self.failed),
            "first_errors": self.failed[:5],
            "timeline": self.timeline,
            "writers": self.args.writers,
            "workers": self.args.workers,
            "encoding_format": self.args.encoding_format,
            **self.counts,
        }

    async def one(self, url: str) -> None:
        try:
            async with self.fetch_gate:
                response = await self.http.get(url)
                response.raise_for_status()
            charset = response.charset_encoding
            loop = asyncio.get_running_loop()
            page = await loop.run_in_executor(
                self.pool, prepare, url, response.content, charset, self.settings
            )
            self.mark("first_page_extracted")
            if page is None:
                self.failed.append((url, "nothing extracted"))
                return
            doc = Doc(url, page["title"], page["text"], page["prompt_text"], page["chunks"])
            await self.chat(doc)
        except Exception as exc:  # noqa: BLE001 - counted and reported, like a failed URL
            self.failed.append((url, repr(exc)))
            return
        doc.inputs = [doc.summary] + [p["question"] for p in doc.qa] + doc.chunks
        self.pending.extend((doc, i) for i in range(len(doc.inputs)))
        doc.missing = len(doc.inputs)
        self.flush()

    async def chat(self, doc: Doc) -> None:
        async with self.model_gate:
            self.mark("first_chat_sent")
            self.counts["chat_calls"] += 1
            response = await self.client.chat.completions.create(
                model=self.args.chat_model,
                messages=chat_messages(doc.title, doc.prompt_text),
                response_format=RESPONSE_FORMAT,
                temperature=CHAT_TEMPERATURE,
            )
        parsed = json.loads(response.choices[0].message.content or "{}")
        doc.summary, doc.qa = parsed["summary"], parsed["qa"]

    def flush(self, *, final: bool = False) -> None:
        """Send full batches of pending inputs (and the rest at the end)."""
        size = self.args.batch_size
        while len(self.pending) >= size or (final and self.pending):
            batch, self.pending = self.pending[:size], self.pending[size:]
            self.embed_tasks.append(asyncio.create_task(self.embed(batch)))

    async def embed(self, batch: list[tuple[Doc, int]]) -> None:
        texts = [doc.inputs[i] for doc, i in batch]
        kwargs = dimensions_kwargs(self.args.embed_model, self.args.dim)
        if self.args.encoding_format != "default":
            kwargs["encoding_format"] = self.args.encoding_format
        async with self.model_gate:
            self.counts["embedding_calls"] += 1
            self.counts["embedding_inputs"] += len(texts)
            response = await self.client.embeddings.create(
                model=self.args.embed_model, input=texts, **kwargs
            )
        rows = sorted(response.data, key=lambda d: d.index)
        matrix = np.asarray([row.embedding for row in rows], dtype=np.float32)
        for (doc, i), vector in zip(batch, matrix, strict=True):
            if doc.vectors is None:
                doc.vectors = np.zeros((len(doc.inputs), matrix.shape[1]), dtype=np.float32)
            doc.vectors[i] = vector
            doc.missing -= 1
            if doc.missing == 0:
                self.done.put_nowait(doc)

    async def write(self, conn: psycopg.AsyncConnection) -> int:
        """One of `--writers` writers, each on its own connection (HNSW inserts cost Postgres
        CPU per vector, so one connection would use one core), one document per transaction
        as soon as it is ready. Stops at the None each writer is sent at the end."""
        written = 0
        while (doc := await self.done.get()) is not None:
            await self.insert(conn, doc)
            written += 1
        return written

    async def insert(self, conn: psycopg.AsyncConnection, doc: Doc) -> None:
        schema = sql.Identifier(SCHEMA)
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                sql.SQL(
                    "INSERT INTO {}.documents (url, title, text, content_hash, summary, qa)"
                    " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id"
                ).format(schema),
                (
                    doc.url,
                    doc.title,
                    doc.text,
                    content_hash(doc.text),
                    doc.summary,
                    json.dumps(doc.qa),
                ),
            )
            (document_id,) = await cur.fetchone()
            questions = len(doc.qa)
            # the summary, the questions, the chunks: binary COPY, as blogqa's load writes them
            spans = (range(1), range(1, 1 + questions), range(1 + questions, len(doc.inputs)))
            for table, span in zip(VECTOR_TABLES, spans, strict=True):
                statement = sql.SQL(
                    "COPY {}.{} (document_id, position, text, embedding) FROM STDIN (FORMAT BINARY)"
                ).format(schema, sql.Identifier(table))
                async with cur.copy(statement) as copy:
                    copy.set_types(["bigint", "integer", "text", "vector"])
                    for i in span:
                        await copy.write_row(
                            (document_id, i - span.start, doc.inputs[i], doc.vectors[i])
                        )


def create_tables(dsn: str, dim: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema, dim_literal = sql.Identifier(SCHEMA), sql.Literal(int(dim))
        conn.execute(sql.SQL(DDL).format(schema=schema))
        for table in VECTOR_TABLES:
            conn.execute(
                sql.SQL(VECTOR_TABLE_DDL).format(
                    schema=schema, table=sql.Identifier(table), dim=dim_literal
                )
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls-file", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, default=8, help="model requests in flight")
    parser.add_argument("--crawl-concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chat-model", default="gpt-4o-mini")
    parser.add_argument("--embed-model", default="text-embedding-3-small")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--encoding-format",
        choices=("default", "float", "base64"),
        default="default",
        help="embedding wire format; default: the openai client's (base64, decoded by it)",
    )
    parser.add_argument(
        "--writers", type=int, default=os.cpu_count() or 1, help="database connections"
    )
    parser.add_argument("--input-token-budget", type=int, default=6000)
    parser.add_argument("--chunk-tokens", type=int, default=300)
    parser.add_argument("--chunk-overlap-tokens", type=int, default=40)
    args = parser.parse_args()
    started = time.perf_counter()
    with open(args.urls_file) as handle:
        urls = [line.strip() for line in handle if line.strip()]
    create_tables(args.dsn, args.dim)
    work_started = time.perf_counter()
    result = asyncio.run(Minimal(args).run(urls))
    result["work_seconds"] = round(time.perf_counter() - work_started, 3)
    result["seconds_in_process"] = round(time.perf_counter() - started, 3)
    print(json.dumps(result))
    return 0 if result["documents"] == len(urls) else 1


if __name__ == "__main__":
    sys.exit(main())
