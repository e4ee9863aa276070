"""Postgres side of the stages: work in progress between stages, and the final load.

Between stages a claimed URL's results live in blogqa.work_items (XCom carries only ids and
lease tokens). `load_documents` replaces a chunk's output rows in one transaction that
also marks their queue rows done, fenced by the lease tokens, so a re-run never duplicates rows
and a worker that lost its lease writes nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from blogqa import dedupe, queue, sql_queries
from blogqa.llm import ModelCall
from blogqa.queue import Lease

SQL = sql_queries.load(__name__)  # queries/store.sql


class IncompleteWorkError(RuntimeError):
    """A work item reached load without the results of an earlier stage."""


@dataclass(frozen=True)
class StoredResult:
    """What is already in the output tables for a URL: decides conditional GET and reuse."""

    document_id: int
    page: dict
    etag: str | None
    last_modified: str | None
    content_hash: str
    chat_model: str | None
    prompt_version: str | None
    embed_model: str | None

    def is_current(
        self, content_hash: str, chat_model: str, prompt_version: str, embed_model: str
    ) -> bool:
        return (
            self.content_hash == content_hash
            and self.chat_model == chat_model
            and self.prompt_version == prompt_version
            and self.embed_model == embed_model
        )


def stored_results(conn: psycopg.Connection, urls: list[str]) -> dict[str, StoredResult]:
    found = {}
    for row in conn.execute(SQL.stored, (urls,)):
        page = {
            "url": row[1],
            "final_url": row[1],
            "canonical_url": row[2],
            "title": row[3],
            "author": row[4],
            "published": row[5].isoformat() if row[5] else None,
            "site_name": row[6],
            "language": row[7],
            "text": row[8],
            "content_hash": row[9],
            "etag": row[10],
            "last_modified": row[11],
        }
        found[row[1]] = StoredResult(row[0], page, row[10], row[11], row[9], *row[12:15])
    return found


@dataclass
class WorkItem:
    lease: Lease
    page: dict | None
    unchanged: bool
    llm_result: dict | None
    chunks: list[dict] | None
    vectors: np.ndarray | None


def save_pages(conn: psycopg.Connection, pages: list[tuple[Lease, dict, bool]]) -> list[Lease]:
    """Crawl results, one row per claimed URL (replacing an older lease's leftovers), written
    only for the rows still held; returns the leases whose pages were not written.

    Fenced like every write after the claim: a worker whose lease lapsed mid-fetch and was
    taken over must not overwrite the new holder's work item with its own (older) page. The
    queue rows still processing under our tokens are locked first (SQL.lock_held), so a
    cancel or a claim recovering the lease either happens before (that page is refused) or
    waits until the commit.
    """
    if not pages:
        return []
    with conn.transaction():
        held = {
            row[0]
            for row in conn.execute(
                SQL.lock_held,
                (
                    [lease.id for lease, _, _ in pages],
                    [uuid.UUID(lease.token) for lease, _, _ in pages],
                ),
            )
        }
        mine = [(lease, page, unchanged) for lease, page, unchanged in pages if lease.id in held]
        if mine:
            with conn.cursor() as cur:
                cur.executemany(
                    SQL.save_pages,
                    [
                        (lease.id, uuid.UUID(lease.token), Jsonb(page), unchanged)
                        for lease, page, unchanged in mine
                    ],
                )
    return [lease for lease, _, _ in pages if lease.id not in held]


def save_llm_results(conn: psycopg.Connection, results: list[tuple[Lease, dict]]) -> set[int]:
    """Summaries and question/answer pairs; returns the queue ids written (fenced by lease)."""
    if not results:
        return set()
    with conn.transaction():
        rows = conn.execute(
            SQL.save_llm_results,
            (
                [lease.id for lease, _ in results],
                [uuid.UUID(lease.token) for lease, _ in results],
                [Jsonb(result) for _, result in results],
            ),
        ).fetchall()
    return {row[0] for row in rows}


def save_vectors(
    conn: psycopg.Connection, results: list[tuple[Lease, list[dict], np.ndarray]]
) -> set[int]:
    """Chunk texts (jsonb) and all of a document's vectors as one float32 matrix (bytea);
    returns the queue ids written (fenced by lease)."""
    if not results:
        return set()
    with conn.transaction():
        rows = conn.execute(
            SQL.save_vectors,
            (
                [lease.id for lease, _, _ in results],
                [uuid.UUID(lease.token) for lease, _, _ in results],
                [Jsonb(chunks) for _, chunks, _ in results],
                [np.ascontiguousarray(m, dtype=np.float32).tobytes() for _, _, m in results],
            ),
        ).fetchall()
    return {row[0] for row in rows}


def work_items(conn: psycopg.Connection, leases: list[Lease], dim: int) -> list[WorkItem]:
    """Work rows written under the leases still held (an older lease's leftovers are ignored),
    in lease order."""
    if not leases:
        return []
    by_id = {lease.id: lease for lease in leases}
    rows = conn.execute(
        SQL.work_items,
        ([lease.id for lease in leases], [uuid.UUID(lease.token) for lease in leases]),
    ).fetchall()
    items = []
    for queue_id, page, unchanged, llm_result, chunks, vectors in rows:
        matrix = None
        if vectors is not None:
            matrix = np.frombuffer(vectors, dtype=np.float32).reshape(-1, dim)
        items.append(WorkItem(by_id[queue_id], page, unchanged, llm_result, chunks, matrix))
    order = {lease.id: i for i, lease in enumerate(leases)}
    items.sort(key=lambda item: order[item.lease.id])
    return items


def usage_row(call: ModelCall, queue_id: int | None = None, url: str | None = None) -> tuple:
    """Parameters of SQL.usage_insert for one model call."""
    return (
        queue_id,
        url,
        call.stage,
        call.provider,
        call.model,
        call.prompt_tokens,
        call.completion_tokens,
        call.inputs,
        call.latency_ms,
        call.cost_usd,
    )


MICRO = Decimal("0.000001")  # the precision of llm_usage.cost_usd, numeric(12, 6)


@dataclass(frozen=True)
class Charge:
    """One ledger row: what one URL is charged for one model request.

    A chat request serves one URL and is charged whole. An embedding request carries inputs
    of several documents, so each of them is charged a share (`split_charges`); the shares of
    a request carry its request_id and add up exactly to its tokens, inputs and cost.
    `latency_ms` is the request's own on every share: time is not divided between the inputs.
    """

    lease: Lease
    call: ModelCall
    request_id: uuid.UUID
    prompt_tokens: int
    completion_tokens: int
    inputs: int
    cost_usd: Decimal | None

    def row(self) -> tuple:
        """Parameters of SQL.charge_insert."""
        call = self.call
        return (
            self.lease.id,
            self.lease.url,
            call.stage,
            call.provider,
            call.model,
            self.prompt_tokens,
            self.completion_tokens,
            self.inputs,
            call.latency_ms,
            self.cost_usd,
            self.request_id,
        )


def _micro_usd(cost: float | None) -> int | None:
    """A cost in whole micro-dollars, the ledger's unit (half-up, as numeric rounds)."""
    if cost is None:
        return None
    return int((Decimal(repr(cost)) / MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def whole_charge(lease: Lease, call: ModelCall) -> Charge:
    """The whole of a request that served one URL (a chat call)."""
    micro = _micro_usd(call.cost_usd)
    cost = None if micro is None else micro * MICRO
    return Charge(
        lease,
        call,
        uuid.uuid4(),
        call.prompt_tokens,
        call.completion_tokens,
        call.inputs,
        cost,
    )


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """`total` in integer parts proportional to `weights` that add up to `total` exactly.

    Largest remainder: every part is its exact share rounded down, and the units that leaves
    over go one each to the parts with the largest remainders (the earliest on a tie). With
    no positive weight the parts are equal.
    """
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    denominator = sum(weights)
    parts, remainders = [], []
    for weight in weights:
        part, remainder = divmod(total * weight, denominator)
        parts.append(part)
        remainders.append(remainder)
    left = total - sum(parts)
    for i in sorted(range(len(parts)), key=lambda i: -remainders[i])[:left]:
        parts[i] += 1
    return parts


def split_charges(call: ModelCall, shares: Sequence[tuple[Lease, int, int]]) -> list[Charge]:
    """A request that carried inputs of several URLs, as one Charge per URL.

    `shares` holds (lease, inputs, tokens) per URL: how many of the request's inputs were that
    URL's, and their token count as we estimate it. The request's prompt and completion
    tokens and its cost (in micro-dollars, the ledger's precision) are divided in proportion
    to those estimated tokens, since the endpoint bills tokens, not inputs; `apportion` makes
    the integer parts add up to what the endpoint reported. Inputs are each URL's own count.
    """
    if len(shares) == 1:
        [(lease, _, _)] = shares
        return [whole_charge(lease, call)]
    weights = [max(tokens, 0) for _, _, tokens in shares]
    prompt = apportion(call.prompt_tokens, weights)
    completion = apportion(call.completion_tokens, weights)
    micro = _micro_usd(call.cost_usd)
    costs = [None] * len(shares) if micro is None else apportion(micro, weights)
    request_id = uuid.uuid4()
    return [
        Charge(
            lease,
            call,
            request_id,
            prompt[i],
            completion[i],
            inputs,
            None if costs[i] is None else costs[i] * MICRO,
        )
        for i, (lease, inputs, _) in enumerate(shares)
    ]


def record_usage(conn: psycopg.Connection, charges: Sequence[Charge]) -> None:
    """Append charges to the blogqa.llm_usage ledger. Not fenced by lease: a call was paid
    for whether or not its result can still be used."""
    if not charges:
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(SQL.charge_insert, [charge.row() for charge in charges])


@dataclass
class Progress:
    """Model results that arrived while a stage runs, with the charges of their calls."""

    llm_results: list[tuple[Lease, dict]] = field(default_factory=list)
    vectors: list[tuple[Lease, list[dict], np.ndarray]] = field(default_factory=list)
    usage: list[Charge] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: Sequence[Progress]) -> Progress:
        merged = cls()
        for part in parts:
            merged.llm_results += part.llm_results
            merged.vectors += part.vectors
            merged.usage += part.usage
        return merged


def save_progress(conn: psycopg.Connection, progress: Progress) -> list[Lease]:
    """Save results and the charges of their calls in one transaction: a kept result always
    has its charge, and a retry that finds the result does not pay for it again. Returns the
    leases whose results were not written because the lease is gone (their charges are
    written all the same)."""
    with conn.transaction():
        written = save_llm_results(conn, progress.llm_results)
        written |= save_vectors(conn, progress.vectors)
        record_usage(conn, progress.usage)
    offered = [r[0] for r in progress.llm_results] + [v[0] for v in progress.vectors]
    return [lease for lease in offered if lease.id not in written]


def check_complete(item: WorkItem) -> None:
    """Raise IncompleteWorkError unless every earlier stage's result is there (and fits)."""
    if item.unchanged:
        return
    llm, chunks, vectors = item.llm_result, item.chunks, item.vectors
    if item.page is None or llm is None or chunks is None or vectors is None:
        raise IncompleteWorkError(f"work item for {item.lease.url} lacks an earlier stage")
    if vectors.shape[0] != 1 + len(llm["qa"]) + len(chunks):
        raise IncompleteWorkError(f"work item for {item.lease.url} has {len(vectors)} vectors")


def load_documents(
    conn: psycopg.Connection,
    items: list[WorkItem],
    *,
    embed_model: str,
    fetched_at: dt.datetime,
    timeout_seconds: float | None = None,
) -> tuple[list[WorkItem], list[WorkItem]]:
    """Write a chunk's outputs and mark its queue rows done in one transaction.

    The rows still ours are locked first, so a cancel or a takeover either happens before
    (that item is left out: its result discarded) or waits until the commit. Each table gets
    one set-based statement (COPY for the vector rows), not one per document: a chunk costs
    a handful of round trips. `items` must have passed `check_complete`. Returns (loaded,
    lost). Raises psycopg.errors.QueryCanceled past `timeout_seconds` rather than hanging.
    """
    if not items:
        return [], []
    with conn.transaction():
        if timeout_seconds:
            conn.execute(
                SQL.set_statement_timeout,
                (f"{int(timeout_seconds * 1000)}ms",),
            )
        held = {
            row[0]
            for row in conn.execute(
                SQL.lock_held,
                ([i.lease.id for i in items], [uuid.UUID(i.lease.token) for i in items]),
            )
        }
        mine = [i for i in items if i.lease.id in held]
        lost = [i for i in items if i.lease.id not in held]
        _touch_unchanged(conn, [i for i in mine if i.unchanged], fetched_at)
        _replace_outputs(conn, [i for i in mine if not i.unchanged], embed_model, fetched_at)
        ids = [i.lease.id for i in mine]
        queue.mark_done(conn, ids)
        queue.delete_work_items(conn, ids)
    return mine, lost


def _touch_unchanged(conn: psycopg.Connection, items: list[WorkItem], fetched_at) -> None:
    if items:
        pages = [i.page or {} for i in items]
        conn.execute(
            SQL.touch_documents,
            (
                fetched_at,
                [i.lease.url for i in items],
                [p.get("etag") for p in pages],
                [p.get("last_modified") for p in pages],
            ),
        )


DOCUMENT_COLUMNS = (
    "canonical_url", "title", "author", "published", "site_name", "language", "text",
    "word_count", "content_hash", "etag", "last_modified",
)  # fmt: skip


def _document_values(item: WorkItem) -> dict:
    page = dict(item.page or {})
    page["word_count"] = len(page["text"].split())
    return page


def _replace_outputs(
    conn: psycopg.Connection, items: list[WorkItem], embed_model: str, fetched_at: dt.datetime
) -> None:
    if not items:
        return
    values = [_document_values(i) for i in items]
    columns = [[i.lease.url for i in items]] + [
        [v.get(c) for v in values] for c in DOCUMENT_COLUMNS
    ]
    ids = dict(conn.execute(SQL.upsert_documents, (fetched_at, *columns)).fetchall())
    document_ids = [ids[i.lease.url] for i in items]
    # near-duplicate fingerprints follow the text; a URL stored as itself is no duplicate
    dedupe.save_fingerprints(
        conn,
        [(ids[i.lease.url], v, v["content_hash"]) for i, v in zip(items, values, strict=True)],
    )
    dedupe.forget(conn, [i.lease.url for i in items])
    for delete in (SQL.delete_summaries, SQL.delete_questions, SQL.delete_chunks):
        conn.execute(delete, (document_ids,))
    summaries, questions, chunks = [], [], []
    for item, document_id in zip(items, document_ids, strict=True):
        llm, vectors = item.llm_result, item.vectors
        qa = llm["qa"]
        summaries.append(
            (
                document_id,
                llm["summary"],
                llm["model"],
                llm["prompt_version"],
                item.page["content_hash"],
                embed_model,
                vectors[0],
            )
        )
        questions += [
            (
                document_id,
                n,
                p["question"],
                p["answer"],
                llm["model"],
                llm["prompt_version"],
                vectors[1 + n],
            )
            for n, p in enumerate(qa)
        ]
        offset = 1 + len(qa)
        chunks += [
            (document_id, n, c["text"], c["tokens"], vectors[offset + n])
            for n, c in enumerate(item.chunks)
        ]
    _copy(
        conn,
        SQL.copy_summaries,
        ["bigint", "text", "text", "text", "text", "text", "vector"],
        summaries,
    )
    _copy(
        conn,
        SQL.copy_questions,
        ["bigint", "smallint", "text", "text", "text", "text", "vector"],
        questions,
    )
    _copy(conn, SQL.copy_chunks, ["bigint", "integer", "text", "integer", "vector"], chunks)


def _copy(conn: psycopg.Connection, statement: str, types: list[str], rows: list[tuple]) -> None:
    """Binary COPY (`statement`, one of the copy_* queries): the fastest way to write many
    rows with vectors."""
    if not rows:
        return
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


# ---------------------------------------------------------------- quarantine


def quarantined_item(conn: psycopg.Connection, queue_id: int, dim: int) -> WorkItem | None:
    """The work item a quarantined row kept (its lease is gone: the row is no longer being
    processed, and only a reviewer's release loads it). None when it has none."""
    row = conn.execute(SQL.quarantined_item, (queue_id,)).fetchone()
    if row is None:
        return None
    row_id, url, attempts, token, page, unchanged, llm_result, chunks, vectors = row
    matrix = None if vectors is None else np.frombuffer(vectors, dtype=np.float32).reshape(-1, dim)
    lease = Lease(id=row_id, url=url, token=str(token), attempts=attempts)
    return WorkItem(lease, page, unchanged, llm_result, chunks, matrix)


def load_released(
    conn: psycopg.Connection, item: WorkItem, *, embed_model: str, fetched_at: dt.datetime
) -> None:
    """Load a released quarantined document as it is, inside the caller's transaction (which
    holds the queue row locked and marks it done): the same writes as `load_documents`."""
    check_complete(item)
    if item.unchanged:
        _touch_unchanged(conn, [item], fetched_at)
    else:
        _replace_outputs(conn, [item], embed_model, fetched_at)
    queue.delete_work_items(conn, [item.lease.id])
