"""Real HTTP servers on 127.0.0.1 for the tests: a page server and an OpenAI-compatible API.

The OpenAI-compatible server answers like a chat model would (a summary and question/answer
pairs taken from the article in the prompt) and counts every call, so tests can assert how
many model calls the pipeline made. `script` makes the next calls misbehave on purpose.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ARTICLES = Path(__file__).resolve().parents[1] / "include" / "blogqa" / "demo" / "articles"


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up is normal
            super().handle_error(request, client_address)


class _Server:
    """A ThreadingHTTPServer on a free loopback port, run in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = _QuietHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading (e.g. at its size cap)


# ---------------------------------------------------------------- pages

LAST_MODIFIED = "Mon, 02 Nov 2026 10:00:00 GMT"


class PageHandler(_Handler):
    """Serves the demo articles plus pages that fail in known ways."""

    def do_GET(self):
        server = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        server.hits[path] = server.hits.get(path, 0) + 1
        if path.startswith("/articles/"):
            file = ARTICLES / path.removeprefix("/articles/")
            if not file.is_file():
                return self.send(404, b"not found", "text/plain")
            etag = '"' + hashlib.sha1(file.read_bytes()).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                server.not_modified += 1
                return self.send(304, b"", "text/html", {"ETag": etag})
            headers = {"ETag": etag, "Last-Modified": LAST_MODIFIED}
            return self.send(200, file.read_bytes(), "text/html; charset=utf-8", headers)
        if path == "/gone":
            return self.send(404, b"<h1>Not found</h1>", "text/html")
        if path == "/unavailable":
            return self.send(503, b"busy", "text/html", {"Retry-After": "120"})
        if path == "/report.pdf":
            return self.send(200, b"%PDF-1.4 fake", "application/pdf")
        if path == "/login":
            html = b"<html><body><form><input name=u><input type=password></form></body></html>"
            return self.send(200, html, "text/html")
        if path == "/loop":
            return self.send(302, b"", "text/html", {"Location": "/loop"})
        if path == "/hop":
            return self.send(
                301, b"", "text/html", {"Location": "/articles/06-easy-runs-zone-2.html"}
            )
        if path == "/huge":
            return self.send(
                200, b"<html><body>" + b"x" * 3_000_000 + b"</body></html>", "text/html"
            )
        if path == "/latin1":
            body = ARTICLES.joinpath("01-sourdough-starter.html").read_text("utf-8")
            body = body.replace("°C", "°C, crème fraîche").replace('charset="utf-8"', "")
            return self.send(
                200, body.encode("latin-1", "replace"), "text/html; charset=iso-8859-1"
            )
        return self.send(404, b"not found", "text/plain")


def start_page_server():
    server = _Server(PageHandler)
    server.hits = {}
    server.not_modified = 0
    return server.start()


# ---------------------------------------------------------------- OpenAI-compatible API


def _sentences(text: str) -> list[str]:
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]
    return found or [text.strip()]


def fake_embedding(text: str, dim: int) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).round(6).tolist()


class OpenAIHandler(_Handler):
    def do_POST(self):
        server = self.server.owner  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.headers.get("Authorization") != f"Bearer {server.api_key}":
            return self._error(401, "invalid api key")
        if self.path.endswith("/chat/completions"):
            with server.lock:
                server.chat_calls += 1
                behaviour = server.script.pop(0) if server.script else "ok"
                server.requests.append(body)
            return self._chat(body, behaviour)
        if self.path.endswith("/embeddings"):
            with server.lock:
                server.embedding_calls += 1
                server.embedding_inputs += len(body["input"])
            dim = body.get("dimensions", 1536)
            data = [
                {"object": "embedding", "index": i, "embedding": fake_embedding(text, dim)}
                for i, text in enumerate(body["input"])
            ]
            tokens = sum(len(t.split()) for t in body["input"])
            payload = {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return self.send(200, json.dumps(payload).encode(), "application/json")
        return self._error(404, "no such route")

    def _error(self, status: int, message: str, headers: dict | None = None):
        payload = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        return self.send(status, json.dumps(payload).encode(), "application/json", headers)

    def _chat(self, body: dict, behaviour: str):
        if behaviour == "400":
            return self._error(400, "context length exceeded")
        if behaviour == "500":
            return self._error(500, "upstream failure")
        if behaviour == "429":
            return self._error(429, "slow down", {"Retry-After": "7"})
        user = body["messages"][1]["content"]
        article = user.split("Article:\n", 1)[-1]
        sentences = _sentences(article)
        qa = [
            {"question": f"What does the article state in passage {i + 1}?", "answer": s}
            for i, s in enumerate(sentences[1:5] or sentences[:1] * 3)
        ][:5]
        while len(qa) < 3:
            qa.append(dict(qa[-1]))
        content = json.dumps({"summary": " ".join(sentences[:2]), "qa": qa})
        if behaviour == "invalid":
            content = content[: len(content) // 2]
        message = {"role": "assistant", "content": content, "refusal": None}
        if behaviour == "refusal":
            message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        payload = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(content.split()),
                "total_tokens": prompt_tokens + len(content.split()),
            },
        }
        return self.send(200, json.dumps(payload).encode(), "application/json")


def start_openai_server(api_key: str = "test-key"):
    server = _Server(OpenAIHandler)
    server.api_key = api_key
    server.lock = threading.Lock()
    server.script = []
    server.requests = []
    server.chat_calls = server.embedding_calls = server.embedding_inputs = 0
    return server.start()
