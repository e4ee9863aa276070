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
    words = tuple(word for word in argv[1:] if not word.startswith("-"))
    return any(words[: len(command)] == command for command in FORKING_COMMANDS)


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
    for name, load in (
        ("blogqa.pipeline", _pipeline),
        ("model clients", _model_clients),
        ("great_expectations", _gx),
    ):
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - the tasks report it where it matters
            log.warning("preload of %s failed (each task will import it itself): %s", name, exc)
        else:
            done.append(name)
    log.info("preloaded %s in %.1f s", ", ".join(done) or "nothing", time.perf_counter() - started)
    _preloaded.extend(done)
    return done


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
