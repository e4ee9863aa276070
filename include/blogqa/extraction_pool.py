"""Article extraction in worker processes of our own, for the length of one crawl stage.

Why processes: extraction (lxml parse + trafilatura) is the crawl stage's CPU cost and holds
the GIL, so in a thread it serialises on one core, and it cannot be stopped there: when a page
kept lxml busy in C code with the GIL held, neither Airflow's execution_timeout nor SIGTERM
could act (Python runs signal handlers in the main thread, between bytecodes) and the task
hung. A process can be killed.

Why not a multiprocessing pool (concurrent.futures, loky, pebble): under spawn/forkserver
their workers re-import the parent's `__main__` - in a task that is the `airflow` console
script, in an environment where the task supervisor has locked the metadata database away, so
every worker died and every URL got a per-URL error - and under fork they copy a threaded
process. Each worker here is `python -m blogqa.extraction_worker` (its own program), started
with asyncio's subprocess support in the task's environment minus the AIRFLOW* variables,
and talks length-prefixed pickles over its stdin/stdout (see extraction_worker).

Lifetime: one crawl stage (`async with ExtractionPool(...)` in `pipeline._crawl_all`); no
module state, so nothing is inherited by the forked tasks of `blogqa run`. The workers start
in the background while the first pages are fetched.

Failures:
- a page runs past BLOGQA_EXTRACT_TIMEOUT_SECONDS: the worker's stacks go to the log, it is
  SIGKILLed and replaced, and only that URL gets a transient PageError.
- a worker dies on a page (crash, OOM kill): it is replaced and the page retried once on the
  fresh worker; if the page kills that one too, that URL gets a transient PageError.
- a worker cannot start (exits or fails before its READY line, or is not ready within
  START_TIMEOUT_SECONDS), or more than MAX_DEATHS_IN_A_ROW workers die with no page
  answered in between: ExtractionPoolError, which fails the task - broken infrastructure is
  never turned into per-URL retries.

Threads and lxml (lxml 6.1, trafilatura 2.3, htmldate 1.11): trafilatura and htmldate keep
module-level compiled `lxml.etree.XPath` and HTMLParser objects that all extracting threads
share. lxml guards each with a lock and runs libxml2's XPath evaluation with the GIL released
(xpath.pxi); its FAQ allows sharing XPath evaluators between threads, at the cost of
serialising them. `examine_meta` uses none of those objects: its XPath is `tree.xpath(...)` in
`extract_opengraph`, a new evaluator per call on the thread's own tree, beside `tree.iterfind`
(ElementPath, run with the GIL held). So the shared objects are not shown to be the cause, and
a thread holding the GIL was not inside libxml2's evaluation but in lxml's Python-side code,
where an endless walk fits a tree with broken links; thread-unsafe use could do that (threaded
trafilatura crashes are reported upstream, not root-caused), but that is not proven. Proven,
and why extraction must be killable: C code holding the GIL keeps the main thread's signal
handlers from ever running, so only SIGKILL ends it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import signal
import site
import sys
import time
from pathlib import Path
from typing import Any, Self

import blogqa
from blogqa.config import Settings
from blogqa.errors import ExtractionPoolError, PageError
from blogqa.extract import Article, Fetched
from blogqa.extraction_worker import HEADER, READY

log = logging.getLogger(__name__)

WORKER_MODULE = "blogqa.extraction_worker"
# A start is the worker's imports; this only has to tell a busy machine from "never".
START_TIMEOUT_SECONDS = 60.0
# One poison page kills two workers (first try and retry). Dying with no page answered in
# between means extraction does not work here at all (memory limit, broken lxml build), and
# more workers would only die the same way; a few poison pages in a chunk still pass.
MAX_DEATHS_IN_A_ROW = 4
STACK_DUMP_SECONDS = 0.2  # time a stuck worker gets to write its stacks before SIGKILL
STOP_SECONDS = 2.0  # time a worker gets to exit (end of input, broken pipe) before SIGKILL
STDERR_TAIL_LINES = 20


class _WorkerDied(Exception):
    """The worker's pipe closed in the middle of a request."""


def worker_environment() -> dict[str, str]:
    """The task's environment without AIRFLOW* variables (the supervisor's settings are for the
    task, not for us), with this blogqa first on the path so the worker runs the same code."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    if path := os.pathsep.join(filter(None, (_package_root(), env.get("PYTHONPATH")))):
        env["PYTHONPATH"] = path
    return env


def _package_root() -> str | None:
    """The directory blogqa was imported from, unless it is a site directory (an installed
    blogqa is found there anyway, and putting site-packages ahead of the standard library
    would let a package shadow a standard module)."""
    root = Path(blogqa.__file__).resolve().parents[1]
    sites = [*site.getsitepackages(), site.getusersitepackages()]
    return None if any(root == Path(d).resolve() for d in sites) else str(root)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class _Worker:
    """One worker process: its pipe, and its stderr forwarded to our log."""

    def __init__(self, process: asyncio.subprocess.Process, module: str) -> None:
        self.process = process
        self.module = module
        self.pid = process.pid
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr = asyncio.create_task(self._forward_stderr())

    @classmethod
    async def start(cls, module: str, timeout: float) -> _Worker:
        """A worker that has said READY; ExtractionPoolError if it cannot get there."""
        command = (sys.executable, "-P", "-m", module, str(os.getpid()))
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=worker_environment(),
            )
        except OSError as exc:
            raise ExtractionPoolError(f"cannot run extraction worker {command}: {exc}") from exc
        worker = cls(process, module)
        try:
            await worker._handshake(timeout)
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def _handshake(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                line = await self.process.stdout.readline()
        except TimeoutError:
            raise ExtractionPoolError(
                f"extraction worker {self.pid} ({sys.executable} -m {self.module}) was not "
                f"ready after {timeout:g}s; check the machine's load and that its imports "
                "(lxml, trafilatura) do not hang"
            ) from None
        if line != READY:
            raise ExtractionPoolError(await self._start_failure(line))

    async def _start_failure(self, line: bytes) -> str:
        code = await self.reap()
        said = " | ".join(self.tail) or line.decode(errors="replace").strip() or "nothing"
        return (
            f"extraction worker {self.pid} {_describe_exit(code)} before it was ready; it "
            f"said: {said}. Check that {sys.executable} can run "
            f"`python -m {self.module}` (blogqa, lxml and trafilatura importable) in the "
            "task's environment"
        )

    async def _forward_stderr(self) -> None:
        """Log what the worker writes to stderr (warnings, tracebacks, stack dumps), keeping the
        last lines for error messages. Reading it also keeps the worker from blocking on it."""
        while True:
            try:
                raw = await self.process.stderr.readline()
            except ValueError:  # a line over the stream's limit, dropped
                continue
            if not raw:
                return
            if line := raw.decode(errors="replace").rstrip():
                self.tail.append(line)
                log.warning("stage=crawl extraction worker %d: %s", self.pid, line)

    async def ask(self, fetched: Fetched, timeout: float) -> tuple[bool, Any]:
        """The worker's (ok, value) reply; _WorkerDied if its pipe closes, TimeoutError."""
        payload = pickle.dumps(fetched, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            async with asyncio.timeout(timeout):
                self.process.stdin.write(HEADER.pack(len(payload)) + payload)
                await self.process.stdin.drain()
                (size,) = HEADER.unpack(await self.process.stdout.readexactly(HEADER.size))
                return pickle.loads(await self.process.stdout.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _WorkerDied from exc

    def kill_now(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def kill(self, *, dump_stacks: bool = False) -> int:
        """SIGKILL (after a stack dump to stderr, if asked) and reap; the exit status."""
        if dump_stacks and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGUSR1)
            await asyncio.sleep(STACK_DUMP_SECONDS)
        self.kill_now()
        return await self.reap()

    async def reap(self) -> int:
        """Wait for the process to end (killing it if it lingers) and for its last stderr."""
        try:
            async with asyncio.timeout(STOP_SECONDS):
                code = await self.process.wait()
        except TimeoutError:
            self.kill_now()
            code = await self.process.wait()
        await asyncio.wait({self._stderr}, timeout=STOP_SECONDS)
        self._stderr.cancel()
        return code

    async def stop(self) -> None:
        """End of input: the worker exits by itself (killed if it does not)."""
        with contextlib.suppress(ConnectionError):
            self.process.stdin.close()
        await self.reap()


def _timeout_error(timeout: float) -> PageError:
    return PageError(
        f"extraction took longer than {timeout:g}s (BLOGQA_EXTRACT_TIMEOUT_SECONDS)",
        stage="crawl",
        permanent=False,
    )


class ExtractionPool:
    """`size` extraction workers (default BLOGQA_EXTRACT_WORKERS) for one crawl stage; an async
    context manager. `module` is the worker program (tests run misbehaving ones)."""

    def __init__(
        self,
        settings: Settings,
        *,
        size: int | None = None,
        module: str | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        self.timeout = settings.extract_timeout
        self.size = max(1, settings.extract_workers if size is None else size)
        self.module = module or WORKER_MODULE
        self.start_timeout = start_timeout
        self._workers: set[_Worker] = set()  # every live worker, to stop at the end
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()  # None: the pool broke
        self._broken: ExtractionPoolError | None = None
        self._starting: asyncio.Task | None = None
        self._deaths_in_a_row = 0

    async def __aenter__(self) -> Self:
        self._starting = asyncio.create_task(self._start_all())
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        starting = self._starting
        starting.cancel()  # no-op once started; else nothing needed the workers
        await asyncio.gather(starting, return_exceptions=True)
        await asyncio.gather(*(worker.stop() for worker in self._workers))
        self._workers.clear()
        if exc_type is None and not starting.cancelled() and starting.exception() is not None:
            raise starting.exception()  # a worker that cannot start fails the task regardless

    async def _start_all(self) -> None:
        """Start the workers concurrently; the first that fails stops the others' start."""
        began = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                starts = [group.create_task(self._spawn()) for _ in range(self.size)]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        for start in starts:
            self._idle.put_nowait(start.result())
        log.info(
            "stage=crawl %d extraction workers ready in %.2fs",
            self.size,
            time.monotonic() - began,
        )

    async def _spawn(self) -> _Worker:
        worker = await _Worker.start(self.module, self.start_timeout)
        self._workers.add(worker)
        return worker

    def _break(self, error: ExtractionPoolError) -> ExtractionPoolError:
        """Remember that the pool cannot go on; everyone waiting for a worker gets `error`."""
        self._broken = error
        self._idle.put_nowait(None)
        return error

    async def _checkout(self) -> _Worker:
        await asyncio.shield(self._starting)  # raises the start failure, to every caller
        worker = None if self._broken else await self._idle.get()
        if worker is None:
            self._idle.put_nowait(None)  # pass it on to the next waiter
            raise self._broken
        return worker

    async def _replacement(self) -> _Worker:
        try:
            return await self._spawn()
        except ExtractionPoolError as exc:
            raise self._break(exc) from None

    async def extract(self, fetched: Fetched) -> Article:
        """`extract.extract_page(fetched)` in a worker. PageError for the page (its own, a
        timeout, or killing two workers); ExtractionPoolError when the workers cannot run at
        all."""
        worker = await self._checkout()
        for attempt in (1, 2):
            try:
                ok, value = await worker.ask(fetched, self.timeout)
            except _WorkerDied:
                worker = await self._replace_dead(worker, fetched.url, last=attempt == 2)
                continue
            except TimeoutError:
                await self._replace_stuck(worker, fetched.url)
                raise _timeout_error(self.timeout) from None
            except BaseException:  # cancelled mid-request: a late reply would answer nobody
                worker.kill_now()  # reaped when the pool closes
                raise
            self._deaths_in_a_row = 0
            self._idle.put_nowait(worker)
            if ok:
                return value
            raise value
        raise AssertionError("unreachable")

    async def _replace_dead(self, worker: _Worker, url: str, *, last: bool) -> _Worker:
        """A fresh worker for the retry; on the second death the page's PageError instead."""
        why = _describe_exit(await worker.reap())
        self._workers.discard(worker)
        self._deaths_in_a_row += 1
        if self._deaths_in_a_row > MAX_DEATHS_IN_A_ROW:
            raise self._break(
                ExtractionPoolError(
                    f"{self._deaths_in_a_row} extraction workers died in a row without answering "
                    f"a page (the last {why}, on {url}); extraction does not work in this "
                    "environment: check the worker's memory limit (OOM killer) and the lxml "
                    "installation"
                )
            )
        fresh = await self._replacement()
        if not last:
            log.warning(
                "url=%s stage=crawl extraction worker %d %s; retrying on a fresh worker",
                url,
                worker.pid,
                why,
            )
            return fresh
        self._idle.put_nowait(fresh)
        raise PageError(
            f"extraction of {url} killed two workers (the last {why})",
            stage="crawl",
            permanent=False,
        )

    async def _replace_stuck(self, worker: _Worker, url: str) -> None:
        log.warning(
            "url=%s stage=crawl extraction took longer than %gs; killing worker %d (its "
            "stacks follow) and starting another",
            url,
            self.timeout,
            worker.pid,
        )
        await worker.kill(dump_stacks=True)
        self._workers.discard(worker)
        self._idle.put_nowait(await self._replacement())
