"""Warm task processes: import the pipeline in the Airflow processes that fork them.

On Linux, Airflow's LocalExecutor forks its workers from the scheduler and each task's
supervisor forks the task process from a worker; a Celery worker forks its pool, and the
task processes from it, likewise. A module the parent imported before forking costs the
task process nothing (its memory is shared copy-on-write); one it did not is imported again
by every task process: blogqa's pipeline (httpx, psycopg, numpy), the openai package, the
models' tokenizers and Great Expectations, seconds of CPU per task on a small machine, where
a run's task processes otherwise spend about as much CPU on imports as on the pages.

`preload()` is called from Airflow's local-settings hook (`airflow_local_settings.py`,
shipped in the plugins folder, which Airflow puts on sys.path) when Airflow starts. It acts
in the scheduler and in Celery workers only; the api-server, dag-processor, triggerer and
the CLI are left as they are. BLOGQA_PRELOAD=false turns it off.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

# The Airflow commands whose processes fork task processes (argv after the executable).
FORKING_COMMANDS = (("scheduler",), ("celery", "worker"), ("standalone",))
_preloaded: list[str] = []  # what this process (or the one it was forked from) preloaded


def forks_task_processes(argv: Sequence[str]) -> bool:
    """Whether this `airflow ...` command line is a process that forks task processes."""
    words = _command_words(argv)
    return any(words[: len(command)] == command for command in FORKING_COMMANDS)


def _command_words(argv: Sequence[str]) -> tuple[str, ...]:
    return tuple(word for word in argv[1:] if not word.startswith("-"))


def enabled() -> bool:
    return os.environ.get("BLOGQA_PRELOAD", "true").strip().lower() not in ("0", "false", "no")


def preload(argv: Sequence[str] | None = None) -> list[str]:
    """Import what every task process needs, here, before Airflow forks them; the modules
    imported. Never raises: a module that fails to import is logged and left to the tasks,
    which import it themselves and fail with the real error."""
    argv = sys.argv if argv is None else argv
    if not enabled() or not forks_task_processes(argv) or _preloaded:
        # (a task process forked from the scheduler still has its argv, and Airflow imports
        # the hook's file again there as a plugin: nothing to do twice)
        return []
    started = time.perf_counter()
    done = []
    steps = [
        ("blogqa.pipeline", _pipeline),
        ("model clients", _model_clients),
        ("great_expectations", _gx),
    ]
    if _is_celery_worker(argv):
        steps.append(("Celery pool warm-up", _warm_celery_pool))
    for name, load in steps:
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - the tasks report it where it matters
            log.warning("preload of %s failed (each task will import it itself): %s", name, exc)
        else:
            done.append(name)
    log.info("preloaded %s in %.1f s", ", ".join(done) or "nothing", time.perf_counter() - started)
    _preloaded.extend(done)
    return done


def _is_celery_worker(argv: Sequence[str]) -> bool:
    return _command_words(argv)[:2] == ("celery", "worker")


def _warm_celery_pool() -> None:
    """A Celery worker forks its pool after Airflow has started, and each pool process ran
    its first task cold: the result backend's first query configures SQLAlchemy's mappers,
    and Airflow's listener on that imports every Airflow ORM model (the DAG bag and the
    serializers with them); measured with py-spy, most of 0.2 s of CPU per pool process,
    0.6-0.9 s of wall time when it fell in a run's busiest second. Done once here, in the
    worker's main process just before it forks the pool (Celery's `worker_init` signal), the
    pool processes inherit it. Only SQLAlchemy's and Celery's public API: the task
    supervisor, which each pool process also imports on its first task, lives in a private
    Airflow module and is left to them."""
    from celery.signals import worker_init

    worker_init.connect(before_pool_forks, weak=False)


def before_pool_forks(sender: object = None, **_: object) -> None:
    """Celery's `worker_init` handler (see _warm_celery_pool); logs and carries on on any
    error, since each pool process does the same work itself anyway."""
    started = time.perf_counter()
    try:
        from sqlalchemy.orm import configure_mappers

        if sender is not None:
            # the result backend's ORM models: the mappers whose configuration runs
            # Airflow's listener, which imports every Airflow model
            sender.app.backend  # noqa: B018
        configure_mappers()
    except Exception as exc:  # noqa: BLE001 - the pool processes do it themselves
        log.warning("warming the Celery pool before it forks failed: %s", exc)
        return
    log.info(
        "configured the ORM mappers before the Celery pool forks, in %.1f s",
        time.perf_counter() - started,
    )


def _pipeline() -> None:
    import blogqa.batch_stage
    import blogqa.pipeline  # noqa: F401


def _model_clients() -> None:
    """The openai package (the pipeline imports it lazily: about a second per enrich task,
    measured with py-spy) and the configured models' tokenizers (a file read and parsed)."""
    from blogqa import llm
    from blogqa.config import load_settings

    llm.preload(load_settings())


def _gx() -> None:
    from blogqa import quality

    quality.gx()
