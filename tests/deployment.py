"""Real Airflow deployments for the tests: the commands `blogqa airflow` and the compose file
run (api-server, scheduler, dag-processor, Celery workers), on the test PostgreSQL, with the
test page server and the OpenAI-compatible test server."""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from blogqa import local_airflow
from blogqa.config import load_settings
from tests.fake_batches import reset_batch_state
from tests.fakes import ARTICLE_FILES

# One metadata database for every deployment test: migrated once, reused (runs are keyed
# by run id, so a later test never mistakes an earlier test's runs for its own).
METADATA_DATABASE = "airflow_deployment"
CHAT_MODEL = "test-chat-model"


def pipeline_env(openai_server, **extra: str) -> dict[str, str]:
    """What tasks and the plugin need: the model endpoint, loopback crawling (the test
    servers), a short retry delay, no schedule."""
    return {
        "OPENAI_BASE_URL": f"{openai_server.base_url}/v1",
        "OPENAI_API_KEY": openai_server.api_key,
        "BLOGQA_LLM_PROVIDER": "openai",
        "BLOGQA_CHAT_MODEL": CHAT_MODEL,
        "BLOGQA_EMBED_MODEL": "text-embedding-3-small",
        "BLOGQA_CRAWL_ALLOW_PRIVATE": "true",
        "BLOGQA_TASK_RETRY_DELAY_SECONDS": "1",
        "BLOGQA_SCHEDULE": "none",
        # a killed worker's task instances are noticed in seconds, not the default 5 minutes
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        **extra,
    }


@contextlib.contextmanager
def deployment(
    openai_server,
    *,
    executor: str = "LocalExecutor",
    components: tuple[str, ...] = ("api-server", "dag-processor"),
    extra_env: dict[str, str] | None = None,
) -> Iterator[local_airflow.LocalAirflow]:
    """A prepared deployment running `components`; the test modules add a scheduler with
    the executor they test (and Celery workers). Every process is stopped on the way out;
    their logs are printed when a test fails, through pytest's captured output."""
    settings = load_settings()
    home = Path(tempfile.mkdtemp(prefix="blogqa-airflow-"))
    port = local_airflow.free_port()
    env = local_airflow.airflow_env(
        settings, home, port=port, executor=executor, metadata_database=METADATA_DATABASE
    )
    env.update(pipeline_env(openai_server, **(extra_env or {})))
    airflow = local_airflow.LocalAirflow(home, env, port)
    try:
        airflow.prepare()
        airflow.start_components(components)
        airflow.wait_ready(components=("dag_processor",))
        yield airflow
    except BaseException:
        print_logs(airflow)
        raise
    finally:
        airflow.stop()
        shutil.rmtree(home, ignore_errors=True)


def print_logs(airflow: local_airflow.LocalAirflow) -> None:
    """The tail of every component's log, for a failing test's report."""
    for path in sorted((airflow.home / "logs").glob("*.log")):
        print(f"----- {path}\n{path.read_text(errors='replace')[-6000:]}")


def revive(airflow: local_airflow.LocalAirflow) -> None:
    """Start again the shared components that exited since the last module: an Airflow
    component exits when its metadata database goes away, as in test_faults' restart."""
    exited = [name for name, process in airflow.processes.items() if process.poll() is not None]
    for name in exited:
        airflow.processes.pop(name)
        airflow.start(name)
    if exited:
        airflow.wait_ready(components=("dag_processor",))


@contextlib.contextmanager
def scheduler(
    airflow: local_airflow.LocalAirflow,
    name: str = "scheduler",
    env: dict | None = None,
    *,
    triggerer: bool = False,
) -> Iterator[None]:
    """A scheduler (its executor from `env`) for the duration of a test module; with
    `triggerer`, Airflow's triggerer too (deferred tasks: batch mode's wait), started with
    the scheduler rather than after it (neither waits for the other, and each takes seconds
    of imports to come up)."""
    revive(airflow)
    launched = time.time()
    airflow.start(name, "scheduler", env=env)
    if triggerer:
        airflow.start("triggerer")
    try:
        airflow.wait_scheduler(launched)
        if triggerer:
            airflow.wait_ready(components=("triggerer",))
        yield
    except BaseException:
        print_logs(airflow)
        raise
    finally:
        for component in ("triggerer", name) if triggerer else (name,):
            if component in airflow.processes:
                airflow.kill(component, signal.SIGTERM)


@contextlib.contextmanager
def scheduled(
    airflow: local_airflow.LocalAirflow, client: httpx.Client, cron: str
) -> Iterator[None]:
    """The DAG with BLOGQA_SCHEDULE=`cron` (read where the DAG file is parsed): the shared
    dag-processor is restarted with it, and restarted without it on the way out, each time
    waiting until the stored DAG shows the change (so later tests see no schedule)."""

    def restart_dag_processor(env: dict | None, summary: str | None) -> None:
        airflow.kill("dag-processor", signal.SIGTERM)
        airflow.start("dag-processor", env=env)
        airflow.poll(
            lambda: (
                client.get(f"/api/v2/dags/{local_airflow.DAG_ID}/details").json()[
                    "timetable_summary"
                ]
                == summary
            ),
            timeout=120,
            what=f"the DAG's timetable is not {summary}",
            interval=0.2,
        )

    restart_dag_processor({"BLOGQA_SCHEDULE": cron}, cron)
    try:
        yield
    finally:
        restart_dag_processor(None, None)


def article_urls(page_server, names: list[str] | None = None, query: str = "") -> list[str]:
    """The test articles' URLs; a `query` makes them new URLs for the queue (the page
    server ignores it)."""
    suffix = f"?{query}" if query else ""
    return [f"{page_server.base_url}/articles/{name}{suffix}" for name in names or ARTICLE_FILES]


def run_to_end(
    airflow: local_airflow.LocalAirflow, client: httpx.Client, conf: dict, timeout: float = 240
) -> tuple[str, str]:
    """Trigger a run through the REST API and wait for it: (run id, final state)."""
    run_id = local_airflow.trigger(client, conf)
    state = local_airflow.wait_run(client, run_id, timeout=timeout, check=airflow.check_alive)
    return run_id, state


def states_by_task(client: httpx.Client, run_id: str) -> dict[str, list[str]]:
    """task id -> the states of its instances (one per chunk for mapped tasks)."""
    states: dict[str, list[str]] = {}
    for ti in local_airflow.task_states(client, run_id):
        states.setdefault(ti["task_id"], []).append(ti["state"])
    return states


def run_in_batch_mode(
    airflow: local_airflow.LocalAirflow,
    client: httpx.Client,
    conn,
    page_server,
    openai_env,
    query: str,
) -> None:
    """A run with `llm_mode` batch, under the scheduler the calling module started with a
    triggerer: the enrich tasks submit their pages to the Batch API, wait deferred (no
    worker, no pool slot) while the triggerer polls, and are resumed by the executor to load
    when the batch has ended: one chat call per page, charged at the batch price."""
    reset_batch_state(openai_env)
    openai_env.batch_min_seconds = 3  # long enough for the REST polls below to see the wait
    urls = article_urls(page_server, ARTICLE_FILES[:3], query=query)
    chat = openai_env.chat_calls

    run_id = local_airflow.trigger(client, {"urls": urls, "llm_mode": "batch"})
    seen: set[str] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "deferred" not in seen:
        seen.update(states_by_task(client, run_id).get("process.enrich", []))
        airflow.check_alive()
        time.sleep(0.5)
    assert "deferred" in seen, seen
    state = local_airflow.wait_run(client, run_id, timeout=240, check=airflow.check_alive)

    assert state == "success", states_by_task(client, run_id)
    assert openai_env.chat_calls - chat == len(urls)  # each page asked once, in a batch
    rows = conn.execute(
        "SELECT q.status, u.provider FROM blogqa.url_queue q"
        " JOIN blogqa.llm_usage u ON u.queue_id = q.id AND u.stage = 'summarize'"
        " WHERE q.url = ANY(%s)",
        (urls,),
    ).fetchall()
    assert sorted(rows) == [("done", "openai-batch")] * len(urls)
