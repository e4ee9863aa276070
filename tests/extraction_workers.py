"""Extraction workers that misbehave on purpose, for tests/test_extraction_pool.py.

The pool runs this as `python -m tests.extraction_workers` (`ExtractionPool(module=...)`): the
real worker loop around an extract function that misbehaves on marker URLs:

- a URL ending in /spin: a regular expression that backtracks for ever, in C with the GIL
  held, as lxml did in the incident; no signal handler can run, only SIGKILL stops it.
- /crash: the worker dies of SIGSEGV.
- /crash-once: dies the first time (a file in BLOGQA_TEST_CRASH_DIR remembers it), extracts
  normally when retried.

BLOGQA_TEST_WORKER=silent makes the worker never say READY (a start that hangs).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import time
from pathlib import Path

from blogqa import extraction_worker
from blogqa.extract import Fetched, extract_page


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _crash_once(url: str) -> None:
    marker = Path(os.environ["BLOGQA_TEST_CRASH_DIR"]) / hashlib.sha256(url.encode()).hexdigest()
    if not marker.exists():
        marker.touch()
        _crash()


def extract(fetched: Fetched):
    if fetched.url.endswith("/spin"):
        re.match(r"(a+)+b", "a" * 64)  # exponential backtracking, never returns
    elif fetched.url.endswith("/crash"):
        _crash()
    elif fetched.url.endswith("/crash-once"):
        _crash_once(fetched.url)
    return extract_page(fetched)


if __name__ == "__main__":
    if os.environ.get("BLOGQA_TEST_WORKER") == "silent":
        time.sleep(3600)
    sys.exit(extraction_worker.main(extract=extract))
