"""blogqa_pipeline: URL queue -> crawl -> enrich (summarize -> embed -> validate -> load) ->
tables in schema blogqa; then a table-level validation, and a review of quarantined documents.

Wiring only: every task calls a function of `blogqa.pipeline`. XCom carries queue ids and
lease tokens, never page text; intermediate results live in Postgres (blogqa.work_items).
The dag-processor re-parses this file every 30 s, so it imports only `airflow.sdk` and
blogqa's settings module (and the standard provider's HITLOperator); the
pipeline (httpx, psycopg, openai, tokenizers, Great Expectations) is imported inside the tasks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import (
    Asset,
    BaseOperator,
    CronDataIntervalTimetable,
    Param,
    dag,
    get_current_context,
    task,
    task_group,
)
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from blogqa.config import DEFAULT_CHUNK_SIZE, MAX_URLS_PER_RUN, crawls_at_once
from blogqa.errors import ConfigError

# Task retries cover infrastructure failures (database restarted, worker lost); per-URL
# failures are retried through the queue instead. BLOGQA_TASK_RETRY_DELAY_SECONDS shortens
# the first delay (tests, impatient operators).
DEFAULT_ARGS = {
    "owner": "blogqa",
    "retries": 3,
    "retry_delay": timedelta(
        seconds=float(os.environ.get("BLOGQA_TASK_RETRY_DELAY_SECONDS", "10"))
    ),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=20),
}
CHUNK_LABEL = "{{ chunk_label }}"
LLM_POOL = "blogqa_llm"  # created by `blogqa init` / `blogqa run` (BLOGQA_LLM_POOL_SLOTS)


def _pipeline():
    """The task bodies' module, imported when a task runs, never at parse time. The task
    process is bound to its supervisor: if that dies (a Celery worker killed), so does the
    task, instead of running on as an orphan."""
    from blogqa import lifecycle, pipeline

    lifecycle.die_with_parent()
    return pipeline


@contextmanager
def _no_retry_for_settings():
    """A ConfigError fails the task without retries: a retry would find the same. It is a
    setting, or settings that do not match the database (another embedding model or
    dimension than the active vector set's)."""
    try:
        yield
    except ConfigError as exc:
        raise AirflowFailException(str(exc)) from None


def _under_dag_test(context) -> bool:
    """A `dag.test()` run (`blogqa run`): Airflow runs its task instances one at a time, in
    the calling process, with no scheduler to enforce timeouts."""
    return getattr(context["dag_run"], "triggering_user_name", None) == "dag_test"


def _claim(context) -> list[list[dict]]:
    params = context["params"]
    pipeline = _pipeline()
    try:
        reprocessed = pipeline.reprocess_interval(
            params.get("reprocess", "none"),
            context.get("data_interval_start"),
            context.get("data_interval_end"),
        )
    except pipeline.NoIntervalError as exc:
        raise AirflowFailException(str(exc)) from None  # a retry would find the same
    enqueued = pipeline.enqueue_urls(params["urls"], force=params.get("force", False))
    enqueued["reprocess"] = reprocessed
    if params.get("discover", True):
        enqueued["discovered"] = pipeline.discover()
    enqueued["refreshed"] = pipeline.refresh_stale(params["refresh_days"], params["max_urls"])
    context["ti"].xcom_push(key="enqueued", value=enqueued)  # shown in the task's XCom tab
    # Under dag.test() one chunk runs at a time, so the chunks are not rounded up to fill the
    # pool's slots: that would only add task instances, each costing seconds there.
    return pipeline.claim_chunks(
        params["max_urls"],
        params["chunk_size"],
        run_id=context["run_id"],
        lanes=1 if _under_dag_test(context) else None,
    )


def _label(chunk: list[dict]) -> None:
    """Name the mapped instance in the UI (rendered through map_index_template)."""
    get_current_context()["chunk_label"] = _pipeline().chunk_label(chunk)


# Nightly by default: each run refreshes pages older than `refresh_days` (conditional GET:
# unchanged pages cost no model call) and works through the backlog. BLOGQA_SCHEDULE takes a
# cron expression or "none" (manual and `blogqa run` only); read when the DAG is parsed.
SCHEDULE = os.environ.get("BLOGQA_SCHEDULE", "0 2 * * *").strip()
# Real data intervals (a cron string alone gives Airflow 3 a trigger timetable, whose runs
# have no window): the run at 02:00 on day D covers [D-1 02:00, D 02:00) UTC, each run of an
# `airflow backfill create` covers its own period, and a manual run with a logical date L gets
# the last complete period ending at or before L. The `reprocess` param acts on that window.
TIMETABLE = (
    None
    if SCHEDULE.lower() in ("", "none")
    else CronDataIntervalTimetable(SCHEDULE, timezone="UTC")
)

# The output tables, as Assets the enrich task (its last stage loads) updates: a downstream DAG with
# `schedule=[Asset.ref(name="blogqa.questions")]` (or the Asset itself) runs after loads.
# Each mapped enrich instance emits one event per table, its extra the rows it wrote
# (pipeline.loaded_rows). The URI is a stable, logical one (host "blogqa", database
# "blogqa", schema "blogqa"), whatever server BLOGQA_DATABASE_URL names.
OUTPUT_ASSETS = {
    table: Asset(
        name=f"blogqa.{table}",
        uri=f"postgres://blogqa:5432/blogqa/blogqa/{table}",
        group="blogqa",
    )
    for table in ("documents", "summaries", "questions", "chunks")  # pipeline.ASSET_TABLES
}

# One run at a time. A second run would claim other rows (safe), but it would not finish any
# sooner: its chunks queue for the same `blogqa_llm` slots and workers, and while they wait
# nothing of theirs runs to keep their leases alive (a run's own chunks keep each other's
# alive: queue.renew_claim). A trigger while a run is active is queued, not lost; a bigger
# backlog takes a bigger `max_urls`. No max_active_tis_per_dag on the model tasks: the pool
# (BLOGQA_LLM_POOL_SLOTS) is the one limit on model calls, across runs and DAGs alike.
MAX_ACTIVE_RUNS = 1

# Chunks of a run crawled at once (BLOGQA_CRAWLS_AT_ONCE, read when the DAG is parsed): by
# default just enough to fill the model endpoint's shared cap (2 with the defaults: 32 in
# flight, 16 per task). Crawling every chunk at once kept both cores busy with extraction
# while no model call ran, and the first enrich waited for all of it; with fewer at once the
# first chunks reach the model sooner and the others are crawled beside those calls
# (bench/README.md has the figures).
CRAWLS_AT_ONCE = crawls_at_once()

REVIEW_OPTIONS = ["Release", "Requeue", "Drop", "Leave quarantined"]  # pipeline.REVIEW_OPTIONS


class Enrich(BaseOperator):
    """Summarize, embed, validate (the quality gate) and load one crawled chunk: one task, one
    pool slot (see pipeline.enrich_chunk for why not four).

    In batch mode (BLOGQA_LLM_MODE=batch, or the run's `llm_mode` param) the pages are
    summarized through the OpenAI Batch API: the task submits them, defers to the triggerer
    (no worker and no pool slot held while the batch runs, up to 24 hours) and, woken when
    the batch has ended, collects the results and goes on with embed, validate and load.
    """

    def execute(self, context):
        return self._advance(context)

    def resume(self, context, event=None):
        """Called in a new task process when the batch this task waits for has ended."""
        from blogqa import batch_stage

        batch_stage.check_event(event)
        return self._advance(context)

    def _advance(self, context):
        pipeline = _pipeline()
        ti = context["ti"]
        # this chunk's crawl, the same map index of the mapped `process` group
        chunk = ti.xcom_pull(task_ids="process.crawl", map_indexes=ti.map_index) or []
        context["chunk_label"] = pipeline.chunk_label(chunk)
        mode = context["params"].get("llm_mode", "default")
        with _no_retry_for_settings():
            result = pipeline.enrich_chunk(chunk, context["run_id"], ti.map_index, llm_mode=mode)
        if "wait_for" in result:
            from blogqa import batch_stage

            trigger, timeout = batch_stage.wait(result["wait_for"])
            self.defer(trigger=trigger, method_name="resume", timeout=timeout)
        for table, extra in result["tables"].items():
            context["outlet_events"][OUTPUT_ASSETS[table]].extra = extra
        return result["loaded"]


class QuarantineReview(HITLOperator):
    """Asks a person what to do with the documents this run quarantined (Airflow's Required
    Actions; the task waits in `awaiting_input` without holding a worker slot). Skipped when
    nothing was quarantined, when BLOGQA_REVIEW is false, and in `dag.test()` runs (`blogqa
    run`), where nothing would enforce the timeout. Past BLOGQA_REVIEW_TIMEOUT (read where the
    task runs) the default answer applies: leave them quarantined."""

    def execute(self, context):
        chunks = context["ti"].xcom_pull(task_ids="claim")
        request = _pipeline().review_request(
            chunks, context["run_id"], under_test=_under_dag_test(context)
        )
        if request is None:
            raise AirflowSkipException("no quarantined document to review")
        self.subject, self.body = request["subject"], request["body"]
        self.response_timeout = timedelta(seconds=request["timeout_seconds"])
        return super().execute(context)

    def execute_complete(self, context, event):
        answer = super().execute_complete(context, event)
        chunks = context["ti"].xcom_pull(task_ids="claim")
        queue_ids = (answer["params_input"] or {}).get("queue_ids") or []
        return _pipeline().apply_review(
            chunks, answer["chosen_options"][0], queue_ids, context["run_id"]
        )


@dag(
    dag_id="blogqa_pipeline",
    schedule=TIMETABLE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=MAX_ACTIVE_RUNS,
    default_args=DEFAULT_ARGS,
    tags=["blogqa"],
    doc_md=__doc__,
    params={
        "urls": Param(
            [],
            type="array",
            items={"type": "string"},
            title="URLs to enqueue",
            description="Added to the queue before claiming (one per line). May be empty.",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Reprocess URLs already done",
            description="Put the given URLs back in the queue even when already processed. "
            "Each is refetched with a conditional GET: an unchanged page costs no model call.",
        ),
        "refresh_days": Param(
            30,
            type="integer",
            minimum=0,
            maximum=3650,
            title="Refresh pages older than (days)",
            description="Done URLs fetched longer ago go back to the queue (0: no refresh).",
        ),
        "max_urls": Param(
            500,
            type="integer",
            minimum=1,
            maximum=MAX_URLS_PER_RUN,
            title="Most URLs to claim in this run",
        ),
        "chunk_size": Param(
            DEFAULT_CHUNK_SIZE,
            type="integer",
            minimum=1,
            maximum=1000,
            title="URLs per mapped chunk",
        ),
        "reprocess": Param(
            "none",
            enum=["none", "summaries", "embeddings", "all"],
            title="Reprocess documents first fetched in this run's data interval",
            description="summaries: summarize and embed again those made by another chat "
            "model or prompt version (from the stored text); embeddings: embed again those "
            "made by another embedding model; all: refetch and redo every stage. A run "
            "without a data interval fails when this is not none.",
        ),
        "llm_mode": Param(
            "default",
            enum=["default", "sync", "batch"],
            title="How to call the chat model",
            description="sync: one Chat Completions call per page; batch: the OpenAI Batch "
            "API (half the price, results within 24 hours, the run waits deferred); "
            "default: BLOGQA_LLM_MODE of the workers (sync unless set).",
        ),
        "discover": Param(
            True,
            type="boolean",
            title="Poll the registered sources",
            description="Enqueue new or changed URLs from the feeds, sitemaps and sites "
            "added with `blogqa sources add` (nothing to do when none is registered).",
        ),
    },
)
def blogqa_pipeline():
    @task(execution_timeout=timedelta(minutes=5))
    def claim() -> list[list[dict]]:
        """Enqueue the run's URLs (params, reprocess over the data interval, the sources'
        new entries, stale pages), then claim up to max_urls of the queue in chunks. One
        task, not two: every hop costs a task process and a scheduler round on a small
        machine. Both halves are safe to retry: what is already queued is not added twice,
        and rows a failed try claimed come back when their leases lapse, at no attempt."""
        with _no_retry_for_settings():
            return _claim(get_current_context())

    @task_group(group_id="process")
    def process(chunk: list[dict]):
        @task(
            map_index_template=CHUNK_LABEL,
            execution_timeout=timedelta(minutes=15),
            max_active_tis_per_dagrun=CRAWLS_AT_ONCE,
        )
        def crawl(chunk: list[dict]) -> list[dict]:
            _label(chunk)
            with _no_retry_for_settings():
                return _pipeline().crawl_chunk(chunk)

        enrich = Enrich(
            task_id="enrich",
            map_index_template=CHUNK_LABEL,
            execution_timeout=timedelta(minutes=60),
            pool=LLM_POOL,
            outlets=list(OUTPUT_ASSETS.values()),
        )
        crawl(chunk) >> enrich
        return enrich.output

    @task(execution_timeout=timedelta(minutes=2))
    def finalize(chunks: list[list[dict]], loaded) -> dict:
        pipeline = _pipeline()
        try:
            return pipeline.finalize(chunks)
        except pipeline.NothingProcessedError as exc:
            raise AirflowFailException(str(exc)) from None  # a retry would find the same

    @task(execution_timeout=timedelta(minutes=10))
    def validate_tables(chunks: list[list[dict]], loaded) -> dict:
        return _pipeline().validate_run_tables(chunks, get_current_context()["run_id"])

    review = QuarantineReview(
        task_id="review",
        subject="Review quarantined documents",
        options=REVIEW_OPTIONS,
        defaults="Leave quarantined",
        params={
            "queue_ids": Param(
                [],
                type="array",
                items={"type": "integer"},
                title="Only these queue ids",
                description="Empty: every document of this run that is still quarantined.",
            )
        },
        # the wait itself is bounded by BLOGQA_REVIEW_TIMEOUT, set when the task runs
        response_timeout=timedelta(hours=1),
        execution_timeout=timedelta(minutes=5),
    )

    chunks = claim()
    loaded = process.expand(chunk=chunks)
    finalize(chunks, loaded) >> review
    validate_tables(chunks, loaded)


pipeline_dag = blogqa_pipeline()
