"""Embedding vector sets: a new embedding model is embedded beside the active one and switched
to when complete, with the API serving throughout (`blogqa vectors`).

Why beside, and not in place: re-embedding in place mixes vectors of two models in one column
until the last document is done, and a new dimension does not fit the column at all. A set
(migration 013) is instead a column per table, suffixed with the set's id, with its own HNSW
index; SQL users and the API always read the unsuffixed `embedding` columns (the active set).

    create  adds the new set's columns (a catalog change, no table rewrite);
    build   embeds every summary, question and chunk without a vector in it, in pages that
            commit as they go (an interrupted build resumes), charging each request to the
            URLs it served in blogqa.llm_usage (stage `vectors`); then builds its indexes
            CONCURRENTLY, so readers and the pipeline's loads are never blocked;
    switch  in one transaction: blocks writers (the pipeline's loads wait, readers go on),
            embeds the few rows loaded since the build, renames the columns and indexes (a
            moment under an exclusive lock), records the new active set and dimension;
    drop    removes a retired (or abandoned building) set's columns.

The chunk boundaries are the stored ones: a set re-embeds the stored texts, it does not
re-chunk them. After a switch, BLOGQA_EMBED_MODEL and BLOGQA_EMBED_DIM must name the new
active set where the pipeline runs (checked on start by blogqa.db). The API reads the active
set from the database (blogqa.api.app.Database.search_settings).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg import sql

from blogqa import sql_queries, store
from blogqa.config import Settings
from blogqa.embed import embedder
from blogqa.errors import BlogqaError
from blogqa.queue import Lease
from blogqa.tokens import tokenizer_for

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/vector_sets.sql

STAGE = "vectors"
TABLES = ("summaries", "questions", "chunks")
# Rows a switch embeds itself, under its lock on writers: more means run `build` first.
CATCH_UP_LIMIT = 1000
# How long a switch waits for its locks before giving up (a long reader holds the tables).
SWITCH_LOCK_TIMEOUT = "10s"
BUILD_LOCK = 0x62716176  # the advisory lock class of builds (the set's id is the key)


# The rows of each table without a vector in a set, and the statement saving theirs.
MISSING = {
    "summaries": SQL.missing_summaries,
    "questions": SQL.missing_questions,
    "chunks": SQL.missing_chunks,
}
SAVE = {"summaries": SQL.save_summaries, "questions": SQL.save_questions, "chunks": SQL.save_chunks}


class VectorSetError(BlogqaError):
    """A vector set command cannot do what it was asked; the message says what to do."""


@dataclass(frozen=True)
class VectorSet:
    id: int
    embed_model: str | None
    embed_dim: int
    state: str
    created_at: dt.datetime
    built_at: dt.datetime | None
    switched_at: dt.datetime | None
    dropped_at: dt.datetime | None

    def settings_for(self, settings: Settings) -> Settings:
        """`settings` embedding with this set's model and dimension."""
        return dataclasses.replace(
            settings, embed_model=self.embed_model or settings.embed_model, embed_dim=self.embed_dim
        )

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class Names:
    """The columns, indexes and checks of one set: unsuffixed for the active set."""

    suffix: str

    @classmethod
    def of(cls, vector_set: VectorSet) -> Names:
        return cls("" if vector_set.active else f"_s{vector_set.id}")

    @property
    def vec(self) -> str:
        return f"embedding{self.suffix}"

    @property
    def model(self) -> str:
        return f"embed_model{self.suffix}"

    def index(self, table: str) -> str:
        return f"{table}_embedding{self.suffix}_idx"

    def columns(self, table: str) -> list[str]:
        return [self.vec, self.model] if table == "summaries" else [self.vec]


def _query(template: str, **names: str | sql.Composable) -> sql.Composed:
    """A template of queries/vector_sets.sql with identifiers (strings) or fragments filled in."""
    parts = {k: sql.Identifier(v) if isinstance(v, str) else v for k, v in names.items()}
    return sql.SQL(template).format(**parts)


def list_sets(conn: psycopg.Connection) -> list[VectorSet]:
    return [VectorSet(*row) for row in conn.execute(SQL.list_sets)]


def get(conn: psycopg.Connection, set_id: int) -> VectorSet:
    for vector_set in list_sets(conn):
        if vector_set.id == set_id:
            return vector_set
    raise VectorSetError(f"no vector set {set_id}: `blogqa vectors list` shows the sets")


def active(conn: psycopg.Connection) -> VectorSet:
    return next(s for s in list_sets(conn) if s.active)


def missing(conn: psycopg.Connection, vector_set: VectorSet) -> dict[str, tuple[int, int]]:
    """(rows without a vector in the set, rows) per table."""
    vec = Names.of(vector_set).vec
    counts = {}
    for table in TABLES:
        row = conn.execute(_query(SQL.count_missing, table=table, vec=vec)).fetchone()
        counts[table] = (int(row[0]), int(row[1]))
    return counts


def create(conn: psycopg.Connection, model: str, dim: int) -> VectorSet:
    """A new building set: its columns added, empty (no table rewrite)."""
    if not model.strip():
        raise VectorSetError("give the embedding model of the new set: --model NAME")
    if not 1 <= dim <= 2000:
        raise VectorSetError(f"--dim {dim}: an HNSW index takes 1 to 2000 dimensions")
    building = [s for s in list_sets(conn) if s.state == "building"]
    if building:
        raise VectorSetError(
            f"set {building[0].id} ({building[0].embed_model}) is already building: build and "
            f"switch to it (`blogqa vectors build {building[0].id}`), or drop it first"
        )
    with conn.transaction():
        set_id = conn.execute(SQL.insert_set, (model, dim)).fetchone()[0]
        names = Names(f"_s{set_id}")
        for table in TABLES:
            conn.execute(
                _query(SQL.add_vector_column, table=table, vec=names.vec, dim=sql.Literal(dim))
            )
        conn.execute(_query(SQL.add_model_column, model=names.model))
    log.info("stage=vectors set %d created: %s, %d dimensions", set_id, model, dim)
    return get(conn, set_id)


@dataclass
class BuildReport:
    vector_set: VectorSet
    embedded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    requests: int = 0
    prompt_tokens: int = 0
    missing: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Row:
    key: int
    text: str
    url: str
    queue_id: int | None


async def _embed_page(
    conn: psycopg.Connection,
    provider,
    rows: list[_Row],
    table: str,
    names: Names,
    settings: Settings,
    report: BuildReport,
) -> None:
    """Embed `rows` of `table` in requests of BLOGQA_EMBED_BATCH_SIZE inputs, run at once
    (up to BLOGQA_LLM_CONCURRENCY of them: the page's size), and save each request's vectors
    with its charges as it comes back."""
    tokenizer = tokenizer_for(settings.embed_model)
    size = settings.embed_batch_size
    requests = [rows[i : i + size] for i in range(0, len(rows), size)]

    async def one(request: list[_Row]) -> None:
        matrix, call = await provider.embed([row.text for row in request])
        call = dataclasses.replace(call, stage=STAGE)
        shares: dict[str, tuple[Lease, int, int]] = {}
        for row in request:
            lease, inputs, tokens = shares.get(row.url, (Lease(row.queue_id, row.url, "", 0), 0, 0))
            shares[row.url] = (lease, inputs + 1, tokens + max(tokenizer.count(row.text), 1))
        _save(conn, table, names, request, matrix, provider.model)
        store.record_usage(conn, store.split_charges(call, list(shares.values())))
        report.embedded[table] += len(request)
        report.requests += 1
        report.prompt_tokens += call.prompt_tokens

    await asyncio.gather(*(one(request) for request in requests))


def _save(
    conn: psycopg.Connection,
    table: str,
    names: Names,
    rows: Sequence[_Row],
    matrix: np.ndarray,
    model: str,
) -> None:
    rows_params = ([row.key for row in rows], [row.text for row in rows], list(matrix))
    params = (model, *rows_params) if table == "summaries" else rows_params  # its model column
    with conn.transaction():
        conn.execute(_query(SAVE[table], vec=names.vec, model=names.model), params)


async def _embed_missing(
    conn: psycopg.Connection,
    vector_set: VectorSet,
    settings: Settings,
    report: BuildReport,
    limit: int | None = None,
) -> None:
    """Embed every row without a vector in the set (at most `limit` of them)."""
    names = Names.of(vector_set)
    settings = vector_set.settings_for(settings)
    provider = embedder(settings)
    page = settings.embed_batch_size * max(settings.llm_concurrency, 1)
    left = limit
    try:
        for table in TABLES:
            while left is None or left > 0:
                size = page if left is None else min(page, left)
                found = conn.execute(_query(MISSING[table], vec=names.vec), (size,))
                rows = [_Row(*r) for r in found.fetchall()]
                if not rows:
                    break
                await _embed_page(conn, provider, rows, table, names, settings, report)
                log.info("stage=vectors set %d: %d %s embedded", vector_set.id, len(rows), table)
                if left is not None:
                    left -= len(rows)
    finally:
        await provider.aclose()


def build(conn: psycopg.Connection, settings: Settings, set_id: int) -> BuildReport:
    """Embed what the set lacks, then build its HNSW indexes (CONCURRENTLY). Resumable: each
    page of vectors commits as it comes back."""
    vector_set = get(conn, set_id)
    if vector_set.state not in ("building", "retired"):
        raise VectorSetError(
            f"set {set_id} is {vector_set.state}: only a building or retired set is built"
        )
    if not conn.execute(SQL.try_build_lock, (BUILD_LOCK, set_id)).fetchone()[0]:
        raise VectorSetError(f"set {set_id} is being built by another process: wait for it")
    report = BuildReport(vector_set)
    try:
        asyncio.run(_embed_missing(conn, vector_set, settings, report))
        _build_indexes(conn, Names.of(vector_set))
    finally:
        conn.execute(SQL.build_unlock, (BUILD_LOCK, set_id))
    report.missing = missing(conn, vector_set)
    if not any(n for n, _ in report.missing.values()):
        conn.execute(SQL.mark_built, (set_id,))
    report.vector_set = get(conn, set_id)
    return report


def _build_indexes(conn: psycopg.Connection, names: Names) -> None:
    for table in TABLES:
        index = names.index(table)
        valid = conn.execute(SQL.index_valid, (index,)).fetchone()
        if valid is not None and not valid[0]:
            conn.execute(_query(SQL.drop_index, index=index))
        conn.execute(_query(SQL.create_index, index=index, table=table, vec=names.vec))


@dataclass
class SwitchReport:
    previous: VectorSet
    current: VectorSet
    caught_up: BuildReport


def _rename(conn: psycopg.Connection, table: str, old: Names, new: Names) -> None:
    for old_name, new_name in zip(old.columns(table), new.columns(table), strict=True):
        conn.execute(_query(SQL.rename_column, table=table, old=old_name, new=new_name))
    conn.execute(_query(SQL.rename_index, old=old.index(table), new=new.index(table)))


def _check_name(table: str) -> str:
    return f"{table}_embedding_present"


def _swap(conn: psycopg.Connection, table: str, incoming: Names, retired: Names) -> None:
    """The active set's columns and index of `table` to the retired set's names (nullable:
    the pipeline no longer writes them), the incoming set's to the active names (checked
    non-null for rows written from now on)."""
    conn.execute(_query(SQL.drop_check, table=table, constraint=_check_name(table)))
    _rename(conn, table, Names(""), retired)
    for column in retired.columns(table):
        conn.execute(_query(SQL.drop_not_null, table=table, column=column))
    _rename(conn, table, incoming, Names(""))
    condition = sql.SQL(" AND ").join(
        sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in Names("").columns(table)
    )
    conn.execute(
        _query(SQL.add_check, table=table, constraint=_check_name(table), condition=condition)
    )


def switch(conn: psycopg.Connection, settings: Settings, set_id: int) -> SwitchReport:
    """Make set `set_id` the active one (see the module docstring)."""
    target = get(conn, set_id)
    if target.active:
        raise VectorSetError(f"set {set_id} is already the active set")
    if target.state == "dropped":
        raise VectorSetError(f"set {set_id} was dropped: create a new set")
    names = Names.of(target)
    for table in TABLES:
        if conn.execute(SQL.index_valid, (names.index(table),)).fetchone() != (True,):
            raise VectorSetError(
                f"set {set_id} has no index on {table} yet: run `blogqa vectors build "
                f"{set_id}` first"
            )
    with conn.transaction():
        conn.execute(SQL.lock_timeout, (SWITCH_LOCK_TIMEOUT,))
        conn.execute(SQL.lock_outputs)
        lacking = sum(n for n, _ in missing(conn, target).values())
        if lacking > CATCH_UP_LIMIT:
            raise VectorSetError(
                f"{lacking} rows have no vector in set {set_id}: run `blogqa vectors build "
                f"{set_id}`, then switch"
            )
        caught_up = BuildReport(target)
        asyncio.run(_embed_missing(conn, target, settings, caught_up, limit=lacking))
        previous = active(conn)
        retired = Names(f"_s{previous.id}")
        views = conn.execute(
            SQL.dependent_views, ([f"blogqa.{t}" for t in TABLES], Names("").columns("summaries"))
        ).fetchall()
        for table in TABLES:
            _swap(conn, table, names, retired)
        for schema, view, definition in views:
            conn.execute(
                _query(
                    SQL.replace_view,
                    view=sql.Identifier(schema, view),
                    definition=sql.SQL(definition.rstrip().rstrip(";")),
                )
            )
        conn.execute(SQL.retire_set, (previous.id,))
        conn.execute(SQL.activate_set, (set_id,))
        conn.execute(SQL.record_dim, (str(target.embed_dim),))
    for table in TABLES:  # proves the rows already there, blocking neither reads nor writes
        conn.execute(_query(SQL.validate_check, table=table, constraint=_check_name(table)))
    current = get(conn, set_id)
    log.info(
        "stage=vectors switched from set %d (%s) to set %d (%s, %d dimensions)",
        previous.id,
        previous.embed_model,
        current.id,
        current.embed_model,
        current.embed_dim,
    )
    return SwitchReport(get(conn, previous.id), current, caught_up)


def drop(conn: psycopg.Connection, set_id: int) -> VectorSet:
    """Remove a retired or building set's columns (and with them its indexes). The space is
    reused by later writes; VACUUM FULL returns it to the operating system."""
    target = get(conn, set_id)
    if target.state not in ("building", "retired"):
        raise VectorSetError(
            f"set {set_id} is {target.state}: only a retired or building set can be dropped"
            + (" (switch to another set first)" if target.active else "")
        )
    names = Names.of(target)
    try:
        with conn.transaction():
            for table in TABLES:
                for column in names.columns(table):
                    conn.execute(_query(SQL.drop_column, table=table, column=column))
            conn.execute(SQL.mark_dropped, (set_id,))
    except psycopg.errors.DependentObjectsStillExist as exc:
        raise VectorSetError(
            f"set {set_id} is still used: {exc.diag.message_detail}. Change or drop that "
            "object (it reads the retired set's columns), then drop the set"
        ) from exc
    log.info("stage=vectors set %d (%s) dropped", set_id, target.embed_model)
    return get(conn, set_id)
