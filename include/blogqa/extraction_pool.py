"""Article extraction on every core, off the event loop.

Extraction (lxml parse + trafilatura) is the crawl stage's CPU cost, ~20 ms a page, and holds
the GIL: in a thread it serialises on one core and stalls the fetches sharing the loop. A
process pool (BLOGQA_EXTRACT_WORKERS, default one per core) runs it in parallel. The pool lives
as long as the process, so a run's tasks pay its start-up once. A page that runs past
BLOGQA_EXTRACT_TIMEOUT_SECONDS cannot be interrupted inside a worker, so the pool is replaced
rather than left with a slot stuck forever.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from blogqa.config import Settings
from blogqa.crawl import Fetched, extract
from blogqa.errors import PageError
from blogqa.extract import Article

log = logging.getLogger(__name__)

_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_inherited_pool() -> None:
    """A forked child must not use its parent's pool (its queues and manager thread belong
    to the parent); it starts its own on first use. Nor its parent's fork server: CPython
    checks on that server with waitpid(), which fails outside the process that started it."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()
    server = multiprocessing.forkserver._forkserver
    if server._forkserver_pid is not None:
        os.close(server._forkserver_alive_fd)
        server.__init__()


os.register_at_fork(after_in_child=_forget_inherited_pool)


def _get_pool(workers: int) -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # forkserver: workers start from a clean, single-threaded server process that has
            # already imported the extraction code, never from a copy of a threaded task.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["blogqa.crawl"])
            _pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        return _pool


def _take_pool() -> ProcessPoolExecutor | None:
    """The current pool, detached: the next call starts a new one."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    return pool


def discard_pool() -> None:
    """Kill the workers (a stuck one included) and start afresh on the next call."""
    pool = _take_pool()
    if pool is None:
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def close_pool() -> None:
    """Let the workers finish and exit. A process that leaves without the interpreter's
    exit hooks (a forked `blogqa run` task) must call this, or it waits on them forever."""
    pool = _take_pool()
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _timeout_error(settings: Settings) -> PageError:
    return PageError(
        f"extraction took longer than {settings.extract_timeout:g}s "
        "(BLOGQA_EXTRACT_TIMEOUT_SECONDS)",
        stage="crawl",
        permanent=False,
    )


async def extract_async(fetched: Fetched, settings: Settings) -> Article:
    """`crawl.extract` in the pool (in a thread when BLOGQA_EXTRACT_WORKERS=1)."""
    if settings.extract_workers <= 1:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(extract, fetched), settings.extract_timeout
            )
        except TimeoutError:
            raise _timeout_error(settings) from None
    loop = asyncio.get_running_loop()
    for attempt in (1, 2):
        try:
            future = loop.run_in_executor(_get_pool(settings.extract_workers), extract, fetched)
            return await asyncio.wait_for(future, settings.extract_timeout)
        except TimeoutError:
            log.warning("url=%s stage=crawl extraction timed out; restarting workers", fetched.url)
            discard_pool()
            raise _timeout_error(settings) from None
        except BrokenProcessPool:  # another page's timeout (or a crash) replaced the pool
            discard_pool()
            if attempt == 2:
                raise PageError(
                    "extraction worker died twice", stage="crawl", permanent=False
                ) from None
    raise AssertionError("unreachable")
