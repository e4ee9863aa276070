"""Run the pipeline DAG through Airflow from the `blogqa` command.

`blogqa` must work with no Airflow set-up of its own: when AIRFLOW_HOME and the metadata
database are not configured, they are derived from BLOGQA_HOME (metadata in its own database
on blogqa's server, the repository's dags/ folder). This module must configure the
environment before anything imports airflow.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from blogqa import db, llm, queue
from blogqa.config import DEFAULT_CHUNK_SIZE, MAX_URLS_PER_RUN, Settings

log = logging.getLogger(__name__)

DAG_ID = "blogqa_pipeline"
EXECUTOR_PATH = "blogqa.pipeline_executor.PipelineExecutor"  # imported by Airflow, after set-up
# The DAG file travels as package data (a link to the repository's dags/ file), so a wheel
# installed without the checkout still has it.
DAGS_FOLDER = Path(str(resources.files("blogqa") / "dags"))


class PipelineRunError(RuntimeError):
    """A DAG run ended in failure; the message names the run so its task logs can be found."""


def configure_airflow(settings: Settings, *, log_level: str | None = None) -> None:
    """Fill in Airflow's settings from BLOGQA_HOME where the user has not set them."""
    env = os.environ
    # Task processes (forked here, or started by a local scheduler) must find the same
    # results database without an embedded fallback of their own.
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
    """Create or upgrade Airflow's metadata schema when it is not at the installed version.

    Airflow's own check costs seconds (alembic's migration graph) on every `blogqa run`, so a
    stamp in AIRFLOW_HOME remembers the revision this Airflow version migrated to; when the
    database still reports that revision (one query), the check is skipped.
    """
    import airflow
    from airflow.utils import db as airflow_db

    stamp = Path(os.environ["AIRFLOW_HOME"]) / ".blogqa-metadata-revision"
    expected = stamp.read_text().split() if stamp.is_file() else []
    current = len(expected) == 2 and expected[0] == airflow.__version__
    if current and _metadata_revision() == expected[1]:
        return
    try:
        airflow_db.check_migrations(timeout=0)
    except TimeoutError:
        log.info("migrating the Airflow metadata database")
        airflow_db.upgradedb()
    revision = _metadata_revision()
    if revision:
        stamp.write_text(f"{airflow.__version__} {revision}")


def _metadata_revision() -> str | None:
    """The alembic revision Airflow's metadata database is at (None when it has none)."""
    from airflow import settings as airflow_settings
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with airflow_settings.get_engine().connect() as connection:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except SQLAlchemyError:
        return None


LLM_POOL = "blogqa_llm"


def ensure_pools(settings: Settings, *, read_first: bool = True) -> None:
    """Create (or resize) the Airflow pool that caps concurrent LLM tasks across runs and
    workers (BLOGQA_LLM_POOL_SLOTS).

    The pool is always written through Airflow's public CLI (`airflow pools set`), a
    subprocess of 4-5 s. `blogqa init` passes `read_first=False` and always writes.
    `blogqa run` calls this before every run, so by default it first reads the pool
    in-process (`Pool.get_pool`, milliseconds; that process already runs Airflow in-process:
    `dag.test`, XComs, sessions) and calls the CLI only when the pool is missing or has other
    slots. Should that private model move in a later Airflow, the CLI is used every time."""
    from blogqa import airflow_cli

    if read_first:
        try:
            from airflow.models.pool import Pool

            pool = Pool.get_pool(LLM_POOL)
        except (ImportError, AttributeError) as exc:
            log.info("cannot read Airflow pools in-process (%s); setting %s", exc, LLM_POOL)
        else:
            if pool is not None and pool.slots == settings.llm_pool_slots:
                return
    airflow_cli.set_pool(
        LLM_POOL,
        settings.llm_pool_slots,
        "blogqa: concurrent summarize/embed tasks calling the model endpoint",
    )


def _not_waiting_on_workers(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("No tasks to run")


def use_pipeline_executor() -> None:
    """Point this process's Airflow at blogqa's executor (`dag.test` uses the configured one).

    Only `blogqa run`'s own process is affected: a deployment's scheduler keeps its executor.
    """
    os.environ["AIRFLOW__CORE__EXECUTOR"] = EXECUTOR_PATH
    # Executors sign a token per task; the in-process execution API never checks it, so a
    # per-process secret does (and keeps Airflow from warning about an empty one).
    os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(64))
    from airflow.executors.executor_loader import ExecutorLoader

    # dag.test() warns "No tasks to run" every second while the workers run them: expected
    # here, so kept out of the user's log.
    logging.getLogger("airflow.sdk.definitions.dag").addFilter(_not_waiting_on_workers)
    configured = ExecutorLoader.get_default_executor_name().module_path
    if configured != EXECUTOR_PATH:
        raise PipelineRunError(
            f"Airflow in this process already chose the executor {configured}; run the "
            "pipeline from a fresh `blogqa run` process."
        )


def _wait_for_claimable(settings: Settings, wait_seconds: float) -> bool:
    """True once a row is claimable; False when none is, or none falls due in time."""
    deadline = time.monotonic() + wait_seconds
    while True:
        with db.connect(settings) as conn:
            if queue.has_claimable(conn):
                return True
            due = queue.next_due_seconds(conn)
        if due is None or time.monotonic() + due > deadline:
            return False
        log.info("waiting %.1fs for the next queued row to fall due", due)
        time.sleep(min(due + 0.05, max(deadline - time.monotonic(), 0.05)))


def load_dag():
    """The pipeline DAG, parsed from the DAGs folder the way the scheduler parses it."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_FOLDER)))
    if DAG_ID not in bag.dag_ids:
        errors = "; ".join(f"{path}: {err}" for path, err in bag.import_errors.items())
        raise PipelineRunError(f"DAG {DAG_ID} not found in {bag.dag_folder}. {errors}")
    return bag.dags[DAG_ID]


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
) -> RunTally:
    """Trigger DAG runs until nothing is claimable or `max_urls` have been claimed: real task
    instances, run by workers forked from this process (`blogqa.pipeline_executor`).

    With `wait_seconds`, a queue whose rows are all waiting (a retry's backoff, an open
    circuit breaker, a dead worker's lease) is waited for when the next one falls due within
    that many seconds, so one command drains it.
    """
    configure_airflow(settings)
    use_pipeline_executor()
    ensure_airflow_db()
    ensure_pools(settings)
    dag = load_dag()
    tally = RunTally()
    started = time.perf_counter()
    remaining = max_urls if max_urls is not None else float("inf")
    first = True
    claimed_ids: set[int] = set()
    while remaining > 0:
        if not (first and urls) and not _wait_for_claimable(settings, wait_seconds):
            break
        batch = int(min(remaining, MAX_URLS_PER_RUN))
        conf = {
            "urls": list(urls or []) if first else [],
            "max_urls": batch,
            "chunk_size": chunk_size,
        }
        if first:  # only once there is work: the preparation costs seconds
            _prepare_workers(dag, settings)
        first = False
        dag_run = dag.test(run_conf=conf, use_executor=True)
        tally.runs += 1
        ids = _claimed_in(dag_run)
        claimed_ids.update(ids)
        claimed = len(ids)
        tally.claimed += claimed
        remaining -= claimed
        if str(dag_run.state) != "success":
            tally.failed_runs.append(dag_run.run_id)
            break
        if claimed == 0:
            break
    tally.seconds = time.perf_counter() - started
    with db.connect(settings) as conn:
        tally.by_status = dict(
            conn.execute(
                "SELECT status, count(*) FROM blogqa.url_queue WHERE id = ANY(%s) GROUP BY status",
                (sorted(claimed_ids),),
            ).fetchall()
        )
    return tally


def _prepare_workers(dag, settings: Settings) -> None:
    """Load in this process what every forked task would otherwise load for itself."""
    from blogqa import pipeline_executor

    pipeline_executor.configure(dag, parallelism=settings.run_parallelism)
    pipeline_executor.prepare_workers()
    llm.preload(settings)


def _claimed_in(dag_run) -> list[int]:
    """Queue ids the run's claim task took, from its XCom."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = XComModel.get_many(
            run_id=dag_run.run_id, key="return_value", task_ids="claim", dag_ids=DAG_ID
        )
        row = session.scalars(query).first()
        chunks = XComModel.deserialize_value(row) if row is not None else []
    return [int(ref["id"]) for chunk in chunks or [] for ref in chunk]
