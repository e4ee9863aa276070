"""Reprocessing by cause: redo only the stages a change made stale.

What changed decides what a document needs (`stage_plan`):
- its content (a refetch found another text), or `--cause all`: every stage, the fetch
  unconditional for `all`;
- the chat model or the prompt version (`llm.PROMPT_VERSION`), or `--cause summaries`:
  summarize and embed again, from the stored text when the stored copy is fresh (fetched
  within BLOGQA_REPROCESS_FRESH_DAYS), so no page is fetched;
- the embedding model, or `--cause embeddings`: embed the stored summary, questions and text
  again; no chat call, no fetch while the copy is fresh.

The normal path (refresh, `enqueue --force`) applies the same rules after its conditional
GET. `blogqa reprocess` (and the DAG's `reprocess` param) requeues stored documents with
`url_queue.redo` set to the cause, which the crawl stage reads to skip the fetch and to
force the stages named even when the stored rows look current (a prompt edited without a new
version). `redo` is cleared when the row is done.

Re-embedding here is done in place: the new vectors replace the old ones document by
document as the load commits, so until every document is done the tables mix vectors of two
models. That is possible while set 1 is the only vector set and the dimension stays. A new
model embedded beside the active one and switched to when complete, or a new dimension, is
`blogqa vectors` (blogqa.vector_sets).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import psycopg

from blogqa import db, sql_queries, store
from blogqa.config import Settings, _env_bool, _env_float, _env_int
from blogqa.errors import ConfigError
from blogqa.llm import PROMPT_VERSION
from blogqa.queue import Lease

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/reprocess.sql

CAUSES = ("all", "summaries", "embeddings")
DAG_CHOICES = ("none", *CAUSES)  # the DAG param's values
# the stronger cause wins when a row is flagged twice
RANK = {None: 0, "embeddings": 1, "summaries": 2, "all": 3}
MAX_REQUEUE = 1_000_000


@dataclass(frozen=True)
class FreshSettings:
    """Settings of refresh, reprocessing and duplicate detection (read where a task runs)."""

    fresh_days: int  # BLOGQA_REPROCESS_FRESH_DAYS: stored text younger than this is reused
    dedupe: bool  # BLOGQA_DEDUPE
    dedupe_threshold: float  # BLOGQA_DEDUPE_THRESHOLD: estimated Jaccard similarity

    @classmethod
    def load(cls) -> FreshSettings:
        threshold = _env_float("BLOGQA_DEDUPE_THRESHOLD", 0.8, minimum=0.5)
        if threshold > 1.0:
            raise ConfigError(f"BLOGQA_DEDUPE_THRESHOLD={threshold} must be at most 1.0.")
        return cls(
            fresh_days=_env_int("BLOGQA_REPROCESS_FRESH_DAYS", 30, minimum=0, maximum=3650),
            dedupe=_env_bool("BLOGQA_DEDUPE", True),
            dedupe_threshold=threshold,
        )


# ---------------------------------------------------------------- requeue


@dataclass
class RequeueResult:
    """What `requeue` did: rows put back from done, rows already queued that got the flag,
    and rows left alone because a worker holds them."""

    cause: str
    requeued: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    in_progress: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict:
        return {
            "cause": self.cause,
            "requeued": len(self.requeued),
            "flagged": len(self.flagged),
            "in_progress": self.in_progress,
            "dry_run": self.dry_run,
        }


def requeue(
    conn: psycopg.Connection,
    cause: str,
    *,
    chat_model: str,
    prompt_version: str,
    embed_model: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    force: bool = False,
    limit: int = MAX_REQUEUE,
    dry_run: bool = False,
) -> RequeueResult:
    """Flag the stored documents the cause makes stale for reprocessing (queries/reprocess.sql, `stale`).

    Idempotent: `summaries` and `embeddings` pick only documents whose stored rows do not
    match the current models and prompt, so a second call after the reprocessing finds
    nothing, and a second call before it finds the rows already flagged. `all` (or `force`)
    picks every document of the window each time it is asked; rows already flagged with it
    are not counted again. Rows being processed are left alone (counted as in progress).
    """
    if cause not in CAUSES:
        raise ValueError(f"unknown cause {cause!r}: one of {', '.join(CAUSES)}")
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware (a naive time is ambiguous)")
    params = {
        "since": since,
        "until": until,
        "force": force,
        "cause": cause,
        "rank": RANK[cause],
        "chat_model": chat_model,
        "prompt": prompt_version,
        "embed_model": embed_model,
        "limit": max(0, min(int(limit), MAX_REQUEUE)),
    }
    result = RequeueResult(cause, dry_run=dry_run)
    with conn.transaction():
        rows = conn.execute(SQL.stale, params).fetchall()
        result.in_progress = sum(1 for _, _, status in rows if status == "processing")
        wanted = [(row_id, url, status) for row_id, url, status in rows if status != "processing"]
        if not dry_run and wanted:
            conn.execute(SQL.requeue, {**params, "ids": [row_id for row_id, _, _ in wanted]})
    for _, url, status in wanted:
        (result.requeued if status == "done" else result.flagged).append(url)
    log.info(
        "stage=reprocess cause=%s window=[%s, %s) requeued %d, flagged %d queued, %d in progress%s",
        cause,
        since,
        until,
        len(result.requeued),
        len(result.flagged),
        result.in_progress,
        " (dry run)" if dry_run else "",
    )
    return result


# ---------------------------------------------------------------- the crawl stage's side


@dataclass(frozen=True)
class Redo:
    """A claimed row's reprocessing flag, and whether its stored copy is fresh."""

    cause: str
    fresh: bool


def redo_flags(conn: psycopg.Connection, leases: list[Lease], fresh_days: int) -> dict[int, Redo]:
    """The claimed rows that carry a `redo` flag, by queue id."""
    if not leases:
        return {}
    rows = conn.execute(SQL.redo_flags, (fresh_days, [lease.id for lease in leases])).fetchall()
    return {row_id: Redo(cause, bool(fresh)) for row_id, cause, fresh in rows}


def reuses_stored_text(redo: Redo | None, previous: store.StoredResult | None) -> bool:
    """Whether the crawl skips the fetch and works from the stored text: only for a
    summaries or embeddings reprocess of a document whose stored copy is fresh."""
    return (
        redo is not None
        and redo.cause in ("summaries", "embeddings")
        and redo.fresh
        and previous is not None
    )


def stage_plan(
    previous: store.StoredResult | None,
    page: dict,
    redo: Redo | None,
    *,
    chat_model: str,
    prompt_version: str,
    embed_model: str,
) -> str:
    """What a crawled (or reused) page needs: 'summarize' (summarize and embed), 'embed'
    (embed the stored summary and questions), or 'unchanged' (nothing: the stored rows are
    current)."""
    cause = redo.cause if redo is not None else None
    if previous is None or cause == "all" or previous.content_hash != page.get("content_hash"):
        return "summarize"
    if (
        cause == "summaries"
        or previous.chat_model != chat_model
        or previous.prompt_version != prompt_version
    ):
        return "summarize"
    if cause == "embeddings" or previous.embed_model != embed_model:
        return "embed"
    return "unchanged"


def stored_llm_results(conn: psycopg.Connection, urls: list[str]) -> dict[str, dict]:
    """The stored summary and question/answer pairs of each URL, in the shape summarize
    saves (`QAResult.as_json`), with the model and prompt version that made them: what a
    re-embed feeds to the embed stage instead of a chat call."""
    if not urls:
        return {}
    found = {}
    for url, summary, model, prompt_version, qa in conn.execute(SQL.stored_qa, (urls,)):
        found[url] = {
            "summary": summary,
            "qa": qa,
            "model": model,
            "prompt_version": prompt_version,
            "input_truncated": False,
            "reused": True,
        }
    return found


def reprocess_window(
    cause: str, start: dt.datetime | None, end: dt.datetime | None, settings: Settings
) -> dict:
    """The body a DAG task would run for a `reprocess` param: flag the documents first
    fetched in the run's data interval [start, end) for `cause` ('none': nothing). Safe to
    run twice for one interval (see `requeue`). The DAG's `reprocess` param calls it."""
    if cause == "none":
        return {"cause": "none"}
    if cause not in CAUSES:
        raise ValueError(f"unknown reprocess value {cause!r}: one of {', '.join(DAG_CHOICES)}")
    with db.connect(settings) as conn:
        result = requeue(
            conn,
            cause,
            chat_model=settings.chat_model,
            prompt_version=PROMPT_VERSION,
            embed_model=settings.embed_model,
            since=start,
            until=end,
        )
    return result.as_dict()
