"""Real HTTP servers on 127.0.0.1 for the tests: a page server and an OpenAI-compatible API.

The OpenAI-compatible server answers like a chat model would (a summary and question/answer
pairs taken from the article in the prompt) and counts every call, so tests can assert how
many model calls the pipeline made. `script` makes the next chat calls misbehave on purpose,
`embedding_script` the next embedding requests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from tests.fake_batches import BatchAPIMixin, init_batch_state

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

ARTICLE_FILES = sorted(p.name for p in ARTICLES.glob("*.html"))
METADATA_URL = "http://169.254.169.254/latest/meta-data/"
ROBOTS = "User-agent: *\nDisallow: /private/\n"
CP1252_WORDS = "Crème brûlée, café au lait and piñata: “smart quotes” cost 5 € — naïvely."


def cp1252_page() -> bytes:
    """An article in windows-1252 with no charset declared in the header or the markup."""
    paragraphs = "".join(
        f"<p>{CP1252_WORDS} Paragraph {i} explains why the kitchen scale matters more than the "
        "recipe card, and how a patient baker checks the dough by feel every single time.</p>"
        for i in range(8)
    )
    html = (
        "<html><head><title>Crème brûlée at home</title></head><body><article>"
        f"<h1>Crème brûlée at home</h1>{paragraphs}</article></body></html>"
    )
    return html.encode("cp1252")


LAST_MODIFIED = "Mon, 02 Nov 2026 10:00:00 GMT"


class PageHandler(_Handler):
    """Serves the demo articles plus pages that fail in known ways."""

    def do_GET(self):
        server = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with server.lock:
            server.hits[path] = server.hits.get(path, 0) + 1
            server.starts.append((path, time.monotonic()))
            server.inflight += 1
            server.max_inflight = max(server.max_inflight, server.inflight)
        try:
            return self._get(server, path)
        finally:
            with server.lock:
                server.inflight -= 1

    def _get(self, server, path: str):
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
        if path == "/robots.txt":
            if server.robots_status != 200:
                return self.send(server.robots_status, b"no robots here", "text/plain")
            return self.send(200, server.robots.encode(), "text/plain")
        if path.startswith("/private/"):  # forbidden by robots.txt: must never be fetched
            return self.send(200, ARTICLES.joinpath(ARTICLE_FILES[0]).read_bytes(), "text/html")
        if path.startswith("/flaky/"):  # 503 twice, then the article
            if server.hits[path] <= 2:
                return self.send(503, b"try later", "text/html", {"Retry-After": "0"})
            return self.send(200, ARTICLES.joinpath(ARTICLE_FILES[1]).read_bytes(), "text/html")
        if path.startswith("/slow"):
            time.sleep(server.slow_seconds)
            return self.send(200, ARTICLES.joinpath(ARTICLE_FILES[2]).read_bytes(), "text/html")
        if path == "/huge-stream":
            return self._stream_forever()
        if path == "/to-private":  # a public-looking page redirecting to cloud metadata
            return self.send(302, b"", "text/html", {"Location": METADATA_URL})
        if path == "/cp1252":  # no charset anywhere: the crawler has to detect it
            return self.send(200, cp1252_page(), "text/html")
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
        if path.startswith(("/syndicated/", "/copies/")):
            return self._copy(server, path)
        if path in server.feeds:  # feeds and sitemaps (tests/test_sources.py)
            body, content_type = server.feeds[path]
            etag = '"' + hashlib.sha1(body.encode()).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                return self.send(304, b"", content_type, {"ETag": etag})
            return self.send(200, body.encode(), content_type, {"ETag": etag})
        return self.send(404, b"not found", "text/plain")

    def _copy(self, server, path: str):
        """A demo article at a second URL: /syndicated/ declares the /articles/ copy as its
        canonical URL; /copies/ declares none and adds a republication note (a near
        duplicate for the text check)."""
        name = path.split("/", 2)[2]
        file = ARTICLES / name
        if not file.is_file():
            return self.send(404, b"not found", "text/plain")
        html = file.read_text("utf-8")
        html = re.sub(r'<link rel="canonical"[^>]*>|<meta property="og:url"[^>]*>', "", html)
        if path.startswith("/syndicated/"):
            link = f'<link rel="canonical" href="{server.base_url}/articles/{name}">'
            html = html.replace("</head>", link + "</head>", 1)
        else:
            note = (
                "<p>This post first appeared on the author's own blog and is republished "
                "here with permission; some links may point to the original site.</p>"
            )
            html = re.sub(r"(<h1>.*?</h1>)", lambda m: m.group(1) + note, html, count=1)
        return self.send(200, html.encode(), "text/html; charset=utf-8")

    def _stream_forever(self):
        """A page far over any cap, with no Content-Length: only streaming can stop it."""
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block = b"<p>" + b"x" * (1024 * 1024 - 7) + b"</p>"
        try:
            for _ in range(60):  # 60 MB
                self.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError):
            pass


def start_page_server(robots: str = ROBOTS, slow_seconds: float = 3.0):
    server = _Server(PageHandler)
    server.hits = {}
    server.not_modified = 0
    server.robots = robots
    server.robots_status = 200
    server.slow_seconds = slow_seconds
    server.lock = threading.Lock()
    server.starts = []
    server.inflight = server.max_inflight = 0
    server.feeds = {}  # path -> (body, content type): feeds and sitemaps served with an ETag
    return server.start()


# ---------------------------------------------------------------- OpenAI-compatible API


def _sentences(text: str) -> list[str]:
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]
    return found or [text.strip()]


def fake_embedding(text: str, dim: int) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).round(6).tolist()


def _base64_floats(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


class OpenAIHandler(_Handler):
    def do_GET(self):
        server = self.server.owner  # type: ignore[attr-defined]
        if self.headers.get("Authorization") != f"Bearer {server.api_key}":
            return self._error(401, "invalid api key")
        if self.path.split("?", 1)[0] == "/v1/models":  # `blogqa init` checks the endpoint
            data = [
                {"id": model, "object": "model", "created": 0, "owned_by": "test"}
                for model in server.models
            ]
            payload = {"object": "list", "data": data}
            return self.send(200, json.dumps(payload).encode(), "application/json")
        return self._error(404, "no such route")

    def send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        extra = getattr(self, "scripted_headers", None) or {}
        return super().send(status, body, content_type, {**(headers or {}), **extra})

    def do_POST(self):
        server = self.server.owner  # type: ignore[attr-defined]
        self.scripted_headers = {}
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.headers.get("Authorization") != f"Bearer {server.api_key}":
            return self._error(401, "invalid api key")
        if self.path.endswith("/chat/completions"):
            with server.lock:
                server.chat_calls += 1
                behaviour = server.script.pop(0) if server.script else server.draw_fault()
                server.requests.append(body)
                if behaviour != "ok":
                    server.faults[behaviour] = server.faults.get(behaviour, 0) + 1
                # arrival times, calls in flight and headers to answer with (tests of the
                # limits shared across processes)
                arrived = time.monotonic()
                server.chat_inflight += 1
                server.chat_max_inflight = max(server.chat_max_inflight, server.chat_inflight)
                self.scripted_headers = server.header_script.pop(0) if server.header_script else {}
            try:
                with _in_flight(server):
                    time.sleep(server.latency)
                return self._chat(body, behaviour)
            finally:
                with server.lock:
                    server.chat_inflight -= 1
                    server.chat_log.append((arrived, time.monotonic(), behaviour))
        if self.path.endswith("/embeddings"):
            with server.lock:
                server.embedding_calls += 1
                server.embedding_inputs += len(body["input"])
                server.embedding_requests.append((body["model"], body.get("dimensions", 1536)))
                behaviour = server.embedding_script.pop(0) if server.embedding_script else "ok"
            with _in_flight(server):
                time.sleep(server.embedding_latency)
            if behaviour == "garbage":
                return self._garbage()
            dim = body.get("dimensions", 1536)
            wants_base64 = body.get("encoding_format") == "base64" and not server.floats_only
            encode = _base64_floats if wants_base64 else list
            data = [
                {"object": "embedding", "index": i, "embedding": encode(fake_embedding(text, dim))}
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

    def _garbage(self):
        """A 200 whose body is not JSON (a misconfigured proxy): an error the pipeline does
        not classify, so it fails the task instead of one URL."""
        return self.send(200, b"<html>502 Bad Gateway</html>", "application/json")

    def _chat(self, body: dict, behaviour: str):
        if behaviour == "garbage":
            return self._garbage()
        if behaviour == "400":
            return self._error(400, "context length exceeded")
        if behaviour == "500":
            return self._error(500, "upstream failure")
        if behaviour == "429":
            return self._error(429, "slow down", {"Retry-After": self.server.owner.retry_after})
        if behaviour == "slow":  # answers after the client has given up
            time.sleep(self.server.owner.slow_seconds)
            behaviour = "ok"
        user = body["messages"][1]["content"]
        article = user.split("Article:\n", 1)[-1]
        sentences = _sentences(article)
        # each page's questions of its own, as a model's are (a benchmark's vector indexes
        # then hold distinct question vectors, not copies of four)
        title = user.split("\n", 1)[0].removeprefix("Title: ")
        qa = [
            {"question": f"What does {title!r} state in passage {i + 1}?", "answer": s}
            for i, s in enumerate(sentences[1:5] or sentences[:1] * 3)
        ][:5]
        while len(qa) < 3:
            qa.append(dict(qa[-1]))
        summary = " ".join(sentences[:2])
        summary, qa = _bad_content(self.server.owner.page_faults, user, summary, qa)
        content = json.dumps({"summary": summary, "qa": qa})
        if behaviour in ("invalid", "truncated"):  # JSON cut short
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


# Bad content for chosen pages (`server.page_faults`: a text of the page's title line in the
# prompt -> one of these), valid JSON every time: what the quality gate must catch when the
# endpoint does not enforce the schema or the model misbehaves.
OFF_PAGE_ANSWERS = [
    "The Treaty of Westphalia ended the Thirty Years War in 1648.",
    "Jupiter has a Great Red Spot, a storm larger than Earth.",
    "Mitochondria produce adenosine triphosphate for eukaryotic cells.",
    "Byzantine mosaics used tesserae of coloured glass and gold leaf.",
]
REFUSAL = "As an AI language model, I cannot summarize this article."


def _bad_content(faults: dict, prompt: str, summary: str, qa: list) -> tuple[str, list]:
    title = prompt.split("\n", 1)[0]
    behaviour = next((b for marker, b in faults.items() if marker in title), None)
    if behaviour == "off_page_answers":  # answers not supported by the page
        qa = [{"question": p["question"], "answer": a} for p, a in zip(qa, OFF_PAGE_ANSWERS)]
    elif behaviour == "repeated_questions":
        qa = [{"question": qa[0]["question"], "answer": p["answer"]} for p in qa]
    elif behaviour == "refusal_text":
        summary = REFUSAL
    elif behaviour == "empty_summary":
        summary = ""
    elif behaviour == "two_questions":
        qa = qa[:2]
    return summary, qa


@contextlib.contextmanager
def _in_flight(server):
    """Count one model request (chat or embeddings) in flight while its answer is delayed."""
    with server.lock:
        server.model_inflight += 1
        server.model_max_inflight = max(server.model_max_inflight, server.model_inflight)
    try:
        yield
    finally:
        with server.lock:
            server.model_inflight -= 1


class _FaultRates:
    """Draws a chat call's behaviour from set rates ({"429": 0.1, ...}) with a seeded RNG."""

    def __init__(self) -> None:
        self.rates: dict[str, float] = {}
        self.rng = random.Random(0)

    def __call__(self) -> str:
        roll = self.rng.random()
        for behaviour, rate in self.rates.items():
            if roll < rate:
                return behaviour
            roll -= rate
        return "ok"


class OpenAIBatchHandler(BatchAPIMixin, OpenAIHandler):
    """The chat and embeddings routes plus Files and Batches (tests/fake_batches.py)."""


def start_openai_server(api_key: str = "test-key"):
    server = _Server(OpenAIBatchHandler)
    init_batch_state(server)
    server.api_key = api_key
    server.lock = threading.Lock()
    server.script = []
    server.embedding_script = []
    server.page_faults = {}  # text in a page's title -> a behaviour of _bad_content
    server.requests = []
    server.draw_fault = _FaultRates()
    server.faults = {}
    server.retry_after = "7"
    server.slow_seconds = 3.0
    server.latency = 0.0
    server.floats_only = False  # like servers that ignore encoding_format
    server.models = ["test-chat-model", "text-embedding-3-small"]  # GET /v1/models
    server.chat_calls = server.embedding_calls = server.embedding_inputs = 0
    server.embedding_requests = []  # (model, dimensions) of each embeddings request
    server.chat_log = []  # (arrival, completion, behaviour) of each chat call, monotonic
    server.chat_inflight = server.chat_max_inflight = 0
    server.embedding_latency = 0.0
    server.model_inflight = server.model_max_inflight = 0  # chat and embeddings together
    server.header_script = []  # extra response headers of the next chat calls, one dict each
    return server.start()
