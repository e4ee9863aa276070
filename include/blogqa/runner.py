"""Run the pipeline DAG from the `blogqa` command, through Airflow's public `dag.test()`.

`blogqa` must work with no Airflow set-up of its own: when AIRFLOW_HOME and the metadata
database are not configured, they are derived from BLOGQA_HOME (metadata in its own database
on blogqa's server, the package's DAG file). This module must configure the environment
before anything imports airflow.

`dag.test()` runs the real DAG (params, mapping, retries, XCom, task states in the metadata
database, visible in the UI of any api-server on that database) one task instance at a time,
in this process. That is the debugging path Airflow documents, and the whole of what
`blogqa run` needs: no scheduler, no executor, no API server. Parallel runs are the
scheduler's job (`make airflow`, a deployment); `blogqa run` uses only public interfaces
(`airflow.sdk`'s DAG, the `airflow` CLI) so an Airflow upgrade cannot break it silently.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from blogqa import airflow_cli, db, queue_stats, sql_queries
from blogqa.config import DEFAULT_CHUNK_SIZE, MAX_URLS_PER_RUN, Settings
from blogqa.errors import BlogqaError

log = logging.getLogger(__name__)

SQL = sql_queries.load(__name__)  # queries/runner.sql

DAG_ID = "blogqa_pipeline"
LLM_POOL = "blogqa_llm"
# The DAG file travels as package data (a link to the repository's dags/ file), so a wheel
# installed without the checkout still has it.
DAGS_FOLDER = Path(str(resources.files("blogqa") / "dags"))
DAG_FILE = "blogqa_pipeline.py"
METADATA_STAMP = ".blogqa-metadata-revision"


class PipelineRunError(BlogqaError):
    """A DAG run could not start or ended in failure; the message says which."""


def configure_airflow(settings: Settings, *, log_level: str | None = None) -> None:
    """Fill in Airflow's settings from BLOGQA_HOME where the user has not set them."""
    env = os.environ
    # Task processes (here, or started by a local scheduler) must find the same results
    # database without an embedded fallback of their own.
    env.setdefault("BLOGQA_DATABASE_URL", db.database_dsn(settings))
    env.setdefault("AIRFLOW_HOME", str(settings.home / "airflow"))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_FOLDER))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    if log_level:
        env.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", log_level)
    if "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env:
        dsn = db.airflow_dsn(settings)
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = dsn.replace(
            "postgresql://", "postgresql+psycopg://", 1
        )
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)


def ensure_airflow_db() -> None:
    """Create or upgrade Airflow's metadata schema (`airflow db migrate`) when needed.

    The command costs seconds even when there is nothing to do, so a stamp in AIRFLOW_HOME
    remembers the Airflow version and the alembic revision it migrated the database to; while
    the database still reports that revision (one query) and Airflow is the same version, the
    command is skipped. Any other state (a new database, an upgraded Airflow) runs it.
    """
    import airflow

    stamp = Path(os.environ["AIRFLOW_HOME"]) / METADATA_STAMP
    expected = stamp.read_text().split() if stamp.is_file() else []
    revision = metadata_revision()
    if expected == [airflow.__version__, revision]:
        return
    log.info("migrating the Airflow metadata database")
    airflow_cli.run("db", "migrate", timeout=600)
    revision = metadata_revision()
    if revision:
        stamp.write_text(f"{airflow.__version__} {revision}")


def metadata_revision() -> str | None:
    """The alembic revision of Airflow's metadata database (None when it has none yet).

    Read with a plain query on the database, not through Airflow's ORM."""
    import psycopg

    dsn = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("+psycopg", "", 1)
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            row = conn.execute(SQL.metadata_revision).fetchone()
    except psycopg.Error:
        return None
    return row[0] if row else None


def ensure_pools(settings: Settings) -> None:
    """Create (or resize) the Airflow pool that caps concurrent model-calling tasks across runs
    and workers (BLOGQA_LLM_POOL_SLOTS), through the public `airflow pools set`."""
    airflow_cli.set_pool(
        LLM_POOL,
        settings.llm_pool_slots,
        "blogqa: concurrent summarize/embed tasks calling the model endpoint",
    )


def load_dag() -> Any:
    """The pipeline DAG object, from the DAG file the scheduler parses (`airflow.sdk.DAG`)."""
    from airflow.sdk import DAG

    path = Path(os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_FOLDER))) / DAG_FILE
    if not path.is_file():
        raise PipelineRunError(
            f"DAG file {path} not found: point AIRFLOW__CORE__DAGS_FOLDER at a folder holding "
            f"{DAG_FILE}, or unset it to use the packaged one"
        )
    spec = importlib.util.spec_from_file_location("blogqa_pipeline_dag", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise PipelineRunError(f"DAG file {path} failed to import: {exc}") from exc
    for value in vars(module).values():
        if isinstance(value, DAG) and value.dag_id == DAG_ID:
            return value
    raise PipelineRunError(f"{path} defines no DAG {DAG_ID}")


def _wait_for_claimable(settings: Settings, wait_seconds: float) -> bool:
    """True once a row is claimable; False when none is, or none falls due in time."""
    deadline = time.monotonic() + wait_seconds
    while True:
        with db.connect(settings) as conn:
            if queue_stats.has_claimable(conn):
                return True
            due = queue_stats.next_due_seconds(conn)
        if due is None or time.monotonic() + due > deadline:
            return False
        log.info("waiting %.1fs for the next queued row to fall due", due)
        time.sleep(min(due + 0.05, max(deadline - time.monotonic(), 0.05)))


@dataclass
class RunTally:
    runs: int = 0
    claimed: int = 0
    seconds: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)
    failed_runs: list[str] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"claimed {self.claimed} url(s) in {self.runs} run(s), {self.seconds:.1f}s"]
        parts += [f"{status} {count}" for status, count in sorted(self.by_status.items())]
        if self.failed_runs:
            parts.append(f"FAILED runs: {', '.join(self.failed_runs)}")
        return "; ".join(parts)


def run_pipeline(
    settings: Settings,
    *,
    max_urls: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    urls: list[str] | None = None,
    wait_seconds: float = 0.0,
    reprocess: str = "none",
    discover: bool = False,
    logical_date: datetime | None = None,
) -> RunTally:
    """Run the DAG with `dag.test()` until nothing is claimable or `max_urls` were claimed.

    With `wait_seconds`, a queue whose rows are all waiting (a retry's backoff, an open
    circuit breaker, a dead worker's lease) is waited for when the next one falls due within
    that many seconds, so one command drains it.

    The first run carries `reprocess` and `discover` (the DAG params) and `logical_date`
    (timezone-aware; its data interval is the last complete period of BLOGQA_SCHEDULE ending
    at or before it; default now); the runs after it drain the queue only.
    """
    configure_airflow(settings)
    ensure_airflow_db()
    dag = load_dag()
    tally = RunTally()
    started = time.perf_counter()
    remaining = max_urls if max_urls is not None else float("inf")
    first = True
    claimed_ids: set[int] = set()
    while remaining > 0:
        asks_more = urls or reprocess != "none" or discover
        if not (first and asks_more) and not _wait_for_claimable(settings, wait_seconds):
            break
        conf = {
            "urls": list(urls or []) if first else [],
            "max_urls": int(min(remaining, MAX_URLS_PER_RUN)),
            "chunk_size": chunk_size,
            "reprocess": reprocess if first else "none",
            "discover": discover and first,
        }
        run_id, state = _test_run(dag, conf, logical_date if first else None)
        first = False
        tally.runs += 1
        with db.connect(settings) as conn:
            ids = queue_stats.claimed_by_run(conn, run_id)
        claimed_ids.update(ids)
        tally.claimed += len(ids)
        remaining -= len(ids)
        if state != "success":
            tally.failed_runs.append(run_id)
            break
        if not ids:
            break
    tally.seconds = time.perf_counter() - started
    with db.connect(settings) as conn:
        tally.by_status = queue_stats.status_counts(conn, sorted(claimed_ids))
    return tally


def _test_run(dag: Any, conf: dict, logical_date: datetime | None = None) -> tuple[str, str]:
    """One `dag.test()` run: its run_id and final state.

    `dag.test()` leaves sessions open after the run (its own, holding the returned run in an
    open transaction, and the in-process execution API's), each keeping a connection checked
    out until the next run; if the metadata database restarted meanwhile, that next run
    would fail on a dead connection. Every session is closed here once the two values are
    read (SQLAlchemy's `close_all_sessions`; nothing else runs between runs), so the next
    run checks connections out of the pool afresh, pre-pinged.
    """
    from sqlalchemy.orm import close_all_sessions

    if logical_date is None:
        dag_run = dag.test(run_conf=conf)
    else:
        dag_run = dag.test(run_conf=conf, logical_date=logical_date)
    run_id, state = dag_run.run_id, str(dag_run.state)
    close_all_sessions()
    return run_id, state
