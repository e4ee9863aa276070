"""The executor `blogqa run` hands task instances to: a pipeline of forked, warm workers.

Airflow's `dag.test()` runs one task instance at a time, so chunk k's load never overlaps chunk
k+1's model calls and the run takes the sum of its stages. LocalExecutor runs them in parallel
but starts every task in a fresh process that parses the DAG again and talks to a separate API
server: seconds per task. This executor forks each task instance from the `blogqa run`
process, which has already imported everything and parsed the DAG, and runs it there through
Airflow's in-process execution API, exactly as `dag.test()` does. States, XCom and retries go
through the metadata database as with any executor.

Lanes: instances of the same task run one at a time, different tasks in parallel (up to
`parallelism`). Chunk k+1 is summarised while chunk k embeds and loads and chunk k+2 crawls,
while each task's own limits (model concurrency, extraction workers, load connections) stay
the run's limits, as if one worker ran each stage.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from airflow.executors.base_executor import BaseExecutor

from blogqa.lifecycle import die_with_parent

log = logging.getLogger(__name__)

# Most a heartbeat waits for a running task to end. dag.test()'s loop sleeps a second
# whenever nothing new became ready, and a task that ends during that sleep waits for it; the
# loop spends its time here instead, where an ending task is seen at once. Waiting longer
# only delays noticing a retry's delay running out while other tasks are still running.
SYNC_WAIT_SECONDS = 5.0

_dags: dict[str, Any] = {}  # dag_id -> the parsed DAG the workers run tasks of
_parallelism = 4


def configure(dag, *, parallelism: int) -> None:
    """Make a parsed DAG's tasks runnable by forked workers, at most `parallelism` at once
    (call before `dag.test`; Airflow builds the executor itself)."""
    global _parallelism
    _dags[dag.dag_id] = dag
    _parallelism = max(parallelism, 1)


def prepare_workers() -> None:
    """Build Airflow's in-process execution API here, once, so every forked task inherits
    it ready instead of spending seconds on it (its versioned routes are generated on the
    first request). The request runs on a throw-away event loop, so no thread is left
    behind to be lost by the forks."""
    import asyncio

    import httpx
    from airflow.sdk.execution_time.supervisor import in_process_api_server

    app = in_process_api_server().app

    async def first_request() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            await client.get("/health")

    asyncio.run(first_request())


def _run_workload(workload) -> None:
    """Worker body: run one task instance in this (forked) process."""
    die_with_parent()  # a worker dies with `blogqa run`
    from airflow.sdk.api.datamodels._generated import TaskInstance as TaskInstanceSDK
    from airflow.sdk.execution_time.supervisor import run_task_in_process

    ti = workload.ti
    task = _dags[ti.dag_id].task_dict[ti.task_id]
    result = run_task_in_process(
        ti=TaskInstanceSDK(
            id=ti.id,
            task_id=ti.task_id,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            try_number=ti.try_number,
            map_index=ti.map_index,
            dag_version_id=ti.dag_version_id,
        ),
        task=task,
    )
    log.info("task %s[%s] ended %s", ti.task_id, ti.map_index, result.ti.state)


class PipelineExecutor(BaseExecutor):
    """Forks a warm worker per task instance; one running instance per task (a lane)."""

    is_local = True
    serve_logs = False

    def __init__(self, parallelism: int | None = None, team_name: str | None = None):
        super().__init__(parallelism=parallelism or _parallelism, team_name=team_name)
        self._context = multiprocessing.get_context("fork")
        self._workers: dict[Any, BaseProcess] = {}  # task instance key -> its process

    def _busy_lanes(self) -> set[str]:
        return {key.task_id for key in self._workers}

    def _get_workloads_to_schedule(self, open_slots: int) -> list[tuple[Any, Any]]:
        """The lowest map index of each idle task, so chunks flow through in order."""
        busy = self._busy_lanes()
        chosen: list[tuple[Any, Any]] = []
        ordered = sorted(
            self.queued_tasks.items(),
            key=lambda item: (item[1].ti.map_index, -item[1].ti.priority_weight),
        )
        for key, workload in ordered:
            if len(chosen) >= open_slots:
                break
            if key.task_id not in busy:
                busy.add(key.task_id)
                chosen.append((key, workload))
        return chosen

    def _process_workloads(self, workloads: Sequence[Any]) -> None:
        for workload in workloads:
            key = workload.ti.key
            self.queued_tasks.pop(key, None)
            process = self._context.Process(
                target=_run_workload,
                args=(workload,),
                name=f"blogqa-task-{key.task_id}-{key.map_index}",
                daemon=False,
            )
            process.start()
            self._workers[key] = process
            self.running.add(key)

    def _reap(self) -> int:
        ended = [(key, p) for key, p in self._workers.items() if p.exitcode is not None]
        for key, process in ended:
            del self._workers[key]
            code = process.exitcode
            process.close()
            if code == 0:
                self.success(key)
            else:
                log.error("task %s worker exited with %s", key, code)
                self.fail(key)
        return len(ended)

    def sync(self) -> None:
        """Collect ended workers and start waiting tasks in the lanes they freed; when none
        has ended, wait a little for one so the loop does not spin."""
        if not self._reap() and self._workers:
            wait([p.sentinel for p in self._workers.values()], timeout=SYNC_WAIT_SECONDS)
            self._reap()
        self.trigger_tasks(self.parallelism - len(self.running))

    def end(self) -> None:
        while self._workers:
            wait([p.sentinel for p in self._workers.values()])
            self._reap()

    def terminate(self) -> None:
        for process in self._workers.values():
            process.kill()
        self.end()
