"""One extraction worker: `python -m blogqa.extraction_worker PARENT_PID`, run by the pool.

It is a program of its own, not a multiprocessing child: it never imports its parent's
`__main__` (the `airflow` console script, whose import fails in a worker the task supervisor
has locked out of the metadata database) and it starts from an environment the pool chose.

Protocol, over a private pipe (the stdin and stdout the pool gave it; stray prints of the
libraries go to stderr instead): once the extraction code is imported the worker writes the
line READY, then answers each request in order. A request is a pickled `extract.Fetched`, a
reply a pickled (ok, value) pair: (True, Article) or (False, the exception extraction raised).
Every message is preceded by its length (HEADER). End of input means: exit.

The worker dies with its parent (PR_SET_PDEATHSIG) and leaves SIGINT to it; SIGUSR1 writes
every thread's stack to stderr (faulthandler), which the pool asks for before killing a worker
stuck on a page, so the log shows where it was stuck.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import signal
import struct
import sys
import traceback
from collections.abc import Callable
from typing import IO, Any

from blogqa.errors import PageError
from blogqa.lifecycle import die_with_parent

READY = b"blogqa-extraction-worker ready\n"
HEADER = struct.Struct(">Q")  # byte length of the pickle that follows

log = logging.getLogger("blogqa.extraction_worker")


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this worker when the process that started it ends, however it ends;
    if that already happened before the request took effect, leave now."""
    die_with_parent()
    if parent_pid is not None and os.getppid() != parent_pid:
        sys.exit(0)


def _private_pipe() -> tuple[IO[bytes], IO[bytes]]:
    """The pool's pipe as private files; fd 0 becomes /dev/null and fd 1 a copy of stderr, so
    nothing a library prints can corrupt the protocol."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return requests, replies


def _read(requests: IO[bytes]) -> Any | None:
    """The next request, or None at end of input (the pool is done with this worker)."""
    header = requests.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return pickle.loads(requests.read(size))


def _write(replies: IO[bytes], reply: tuple[bool, Any]) -> None:
    payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    replies.write(HEADER.pack(len(payload)) + payload)
    replies.flush()


def _answer(extract: Callable[[Any], Any], fetched: Any) -> tuple[bool, Any]:
    """(True, article) or (False, the exception): a PageError is the page's verdict; any other
    exception is also passed back (the pool re-raises it) with its traceback logged here."""
    try:
        return True, extract(fetched)
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the pool
        if not isinstance(exc, PageError):
            log.error("url=%s stage=crawl extraction raised:\n%s", fetched.url, _trace(exc))
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that cannot travel is described
            return False, RuntimeError(f"{type(exc).__name__}: {exc}")
        return False, exc


def _trace(exc: Exception) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def main(argv: list[str] | None = None, extract: Callable[[Any], Any] | None = None) -> int:
    """Serve extraction requests until end of input. `extract` defaults to
    `extract.extract_page` (a different function serves the tests' misbehaving workers)."""
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent(int(argv[0]) if argv else None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    requests, replies = _private_pipe()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if extract is None:
        from blogqa.extract import extract_page as extract  # lxml, trafilatura: before READY
    replies.write(READY)
    replies.flush()
    while (fetched := _read(requests)) is not None:
        _write(replies, _answer(extract, fetched))
    return 0


if __name__ == "__main__":
    sys.exit(main())
