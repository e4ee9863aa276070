"""blogqa.preload: the scheduler and Celery workers import the pipeline before they fork task
processes (the effect under a real scheduler: tests/test_airflow_local.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blogqa import preload


@pytest.mark.parametrize(
    ("argv", "forks"),
    [
        (["airflow", "scheduler"], True),
        (["airflow", "scheduler", "--num-runs", "1"], True),
        (["airflow", "celery", "worker", "--concurrency", "4"], True),
        (["airflow", "standalone"], True),
        (["airflow", "api-server"], False),
        (["airflow", "dag-processor"], False),
        (["airflow", "triggerer"], False),
        (["airflow", "celery", "flower"], False),
        (["airflow", "db", "migrate"], False),
        (["blogqa", "run"], False),
        (["pytest"], False),
    ],
)
def test_only_the_processes_that_fork_task_processes_preload(argv, forks):
    assert preload.forks_task_processes(argv) is forks


def _fresh(code: str, env: dict[str, str] | None = None) -> str:
    """The last line `code` prints in a fresh interpreter: run apart, so this test process's
    own imports do not count."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def _preloaded(env: dict[str, str]) -> str:
    """What an interpreter that calls itself `airflow scheduler` has imported after
    preload()."""
    return _fresh(
        "import sys; from blogqa import preload;"
        "done = preload.preload(['airflow', 'scheduler']);"
        "again = preload.preload(['airflow', 'scheduler']);"
        "print(done, again, 'great_expectations' in sys.modules, 'blogqa.pipeline' in sys.modules,"
        " 'openai.resources.embeddings' in sys.modules)",
        env,
    )


def test_preload_imports_the_pipeline_and_great_expectations():
    import os

    env = {k: v for k, v in os.environ.items() if k != "BLOGQA_PRELOAD"}
    env["BLOGQA_LLM_PROVIDER"] = "openai"  # a deployment with a model endpoint
    assert _preloaded(env) == (
        "['blogqa.pipeline', 'model clients', 'great_expectations'] [] True True True"
    )
    assert _preloaded({**env, "BLOGQA_PRELOAD": "false"}) == "[] [] False False False"


def test_a_celery_worker_warms_its_pool_before_forking_it():
    """`airflow celery worker` also connects a `worker_init` handler, which imports what each
    pool process otherwise imported on its first task: every Airflow ORM model (through
    SQLAlchemy's mapper configuration). In a real worker: tests/test_airflow_celery.py."""
    printed = _fresh(
        "import sys, celery.signals; from blogqa import preload;"
        "done = preload.preload(['airflow', 'celery', 'worker']);"
        "from airflow.providers.celery.executors.celery_executor import app;"
        "Worker = type('Worker', (), {'app': app});"  # what Celery sends: its WorkController
        "before = 'airflow.models.taskinstancehistory' in sys.modules;"
        "celery.signals.worker_init.send(sender=Worker());"
        "print(done[-1], before, 'airflow.models.taskinstancehistory' in sys.modules)"
    )
    assert printed == "Celery pool warm-up False True"
