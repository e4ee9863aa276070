"""`blogqa demo`: the whole pipeline on the project's own sample articles, offline.

Serves include/blogqa/demo/articles on 127.0.0.1, enqueues every page, runs the DAG through
Airflow and shows what landed in the tables.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ARTICLES_DIR = Path(__file__).resolve().parent / "demo" / "articles"
DEFAULT_PORT = 8765
DEMO_QUERY = "how to keep a sourdough starter alive and bubbly"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@contextmanager
def serve_articles(port: int | None = None) -> Iterator[str]:
    """Serve the sample articles on loopback; yields the base URL.

    A fixed default port keeps the demo's URLs stable, so a second demo run refreshes the
    same queue rows instead of adding new ones; a busy port falls back to a free one.
    """
    handler = functools.partial(_QuietHandler, directory=str(ARTICLES_DIR))
    wanted = port if port is not None else int(os.environ.get("BLOGQA_DEMO_PORT", DEFAULT_PORT))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", wanted), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def article_urls(base_url: str) -> list[str]:
    return [f"{base_url}/{path.name}" for path in sorted(ARTICLES_DIR.glob("*.html"))]
