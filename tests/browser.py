"""Helpers of the browser tests: Debian's Chromium driven by Playwright for Python, the API
served by uvicorn in a thread, a static site on 127.0.0.1, and one pipeline run over chosen
URLs.

Playwright never downloads a browser here: it launches /usr/bin/chromium (`make chromium`
installs Debian's package), headless, with every background service of the browser off, so
the only requests it makes are the page's own.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blogqa import db, queue, runner
from blogqa.config import Settings
from tests.conftest import OUTPUT_TABLES
from tests.fakes import _Handler, _Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium() -> Iterator:
    """A Playwright Browser on Debian's Chromium (skips, saying how to install it, when the
    package is missing: `make test` installs it first)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: run `make chromium` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, *, port: int | None = None, timeout: float = 60.0) -> Iterator[str]:
    """The ASGI app served by uvicorn on 127.0.0.1 (on `port`, default a free one) in a daemon
    thread; yields its base URL."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive(), "uvicorn exited while starting"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class _SiteHandler(_Handler):
    def do_GET(self):
        site = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with site.lock:
            site.requests.append(path)
        page = site.pages.get(path)
        if page is None:
            return self.send(404, b"not found", "text/plain")
        body, content_type = page
        return self.send(200, body, content_type)


class StaticSite(_Server):
    """A blog on 127.0.0.1: fixed pages by path, and the paths it was asked for."""

    def __init__(self, pages: dict[str, tuple[bytes, str]]) -> None:
        super().__init__(_SiteHandler)
        self.pages = pages
        self.lock = threading.Lock()
        self.requests: list[str] = []


def start_site(pages: dict[str, tuple[bytes, str]]) -> StaticSite:
    site = StaticSite(pages)
    site.start()
    return site


def process(settings: Settings, urls: list[str]) -> None:
    """Empty blogqa's tables, enqueue `urls` and run the DAG over them once."""
    with db.connect(settings) as conn:
        tables = ", ".join(f"blogqa.{t}" for t in (*OUTPUT_TABLES, "url_queue"))
        conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        queue.enqueue(conn, urls)
    tally = runner.run_pipeline(settings, chunk_size=5)
    assert tally.failed_runs == []
