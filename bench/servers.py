"""Loopback servers for the throughput benchmarks: a synthetic blog and a slow OpenAI API.

The blog serves N distinct, deterministic articles shaped like the demo pages (header, nav,
byline, headings, paragraphs, a list, comments, sidebar, footer), so trafilatura does the same
work as on real posts, with ETags so a second crawl gets 304s. The OpenAI-compatible server
answers with tests/fakes.py's chat replies (it subclasses that handler) after a set latency per
chat call and per embedding request, and counts what a throughput figure needs: chat calls,
embedding requests and inputs, the most calls in flight at once.

Both run as ThreadingHTTPServers in daemon threads of the benchmark process: one thread per
connection, so a sleeping request never delays another, and a deep accept backlog, so a burst
of new connections is never dropped into a SYN retry (a one-second stall that would look like
pipeline time).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import random
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/ is a package of the repository, not an installed one
    sys.path.insert(0, str(ROOT))

from tests.fakes import (
    LAST_MODIFIED,
    OpenAIHandler,
    _Handler,
    _QuietHTTPServer,
    _Server,
    fake_embedding,
)

# ---------------------------------------------------------------- servers


class _BenchHTTPServer(_QuietHTTPServer):
    request_queue_size = 1024  # socketserver's default of 5 drops bursts of connects
    daemon_threads = True


class BenchServer(_Server):
    """tests.fakes._Server with a deep accept backlog."""

    def __init__(self, handler: type[_Handler]) -> None:
        self.httpd = _BenchHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


# ---------------------------------------------------------------- synthetic articles


@dataclass(frozen=True)
class Topic:
    site: str
    host: str
    section: str
    subjects: tuple[str, ...]
    things: tuple[str, ...]
    actions: tuple[str, ...]
    qualities: tuple[str, ...]
    places: tuple[str, ...]
    units: tuple[str, ...]


# Word banks, kept compact (one row per slot) rather than one word per line.
# fmt: off
TOPICS = (
    Topic(
        "The Crumb Ledger",
        "crumbledger.example",
        "bread",
        ("my sourdough starter", "the rye levain", "a high-hydration dough", "the country loaf",
         "the overnight focaccia", "a spelt batard", "the enriched brioche", "a seeded tin loaf"),
        ("bulk fermentation", "the final proof", "the autolyse", "oven spring", "crumb structure",
         "the crust colour", "dough temperature", "the shaping step", "the bench rest"),
        ("doubled", "slowed down", "relaxed", "tightened", "improved", "collapsed", "held"),
        ("open", "tight", "glossy", "sour", "mild", "blistered", "even", "dense", "airy"),
        ("the home oven", "a cast-iron pot", "the fridge", "a warm corner of the kitchen",
         "the proving basket", "a baking steel"),
        ("grams of flour", "degrees Celsius", "minutes", "hours", "percent hydration"),
    ),
    Topic(
        "Packet Garden",
        "packetgarden.example",
        "networking",
        ("the home router", "a managed switch", "the guest VLAN", "my mini PC server",
         "the Wi-Fi access point", "a backup NAS", "the DNS resolver", "a reverse proxy"),
        ("latency", "throughput", "the firewall rules", "power draw", "boot time",
         "the upgrade path", "packet loss", "the update schedule", "disk health"),
        ("dropped", "stabilised", "doubled", "recovered", "failed over", "stalled", "improved"),
        ("reliable", "noisy", "quiet", "fragile", "fast", "predictable", "cheap", "flaky"),
        ("the server cupboard", "the attic", "the home office", "a rack shelf", "the garage",
         "the living room"),
        ("milliseconds", "megabits per second", "watts", "gigabytes", "percent", "days"),
    ),
    Topic(
        "Long Road Running",
        "longroadrunning.example",
        "training",
        ("the long run", "an easy recovery jog", "the tempo session", "my half marathon plan",
         "a hill repeat workout", "the taper week", "the parkrun", "a zone 2 base block"),
        ("heart rate", "cadence", "weekly mileage", "the pace target", "sleep quality",
         "fuelling", "the cool-down", "leg fatigue", "the warm-up"),
        ("improved", "dropped", "climbed", "levelled off", "recovered", "held", "faded"),
        ("steady", "comfortable", "hard", "easy", "consistent", "sluggish", "smooth"),
        ("the canal path", "the track", "a muddy trail", "the park loop", "the treadmill",
         "the river road"),
        ("kilometres", "beats per minute", "minutes per kilometre", "steps per minute", "weeks"),
    ),
    Topic(
        "Raised Bed Notes",
        "raisedbednotes.example",
        "garden",
        ("the tomato trial", "a raised bed", "the compost heap", "my seed trays",
         "the runner beans", "a no-dig border", "the greenhouse", "the squash patch"),
        ("soil structure", "germination", "the watering routine", "blight pressure", "the yield",
         "slug damage", "the mulch layer", "root growth", "fruit set"),
        ("thrived", "struggled", "recovered", "outgrew", "held up", "ripened", "stalled"),
        ("crumbly", "waterlogged", "vigorous", "sweet", "bitter", "healthy", "patchy", "lush"),
        ("the allotment", "the back garden", "a sunny windowsill", "the polytunnel",
         "the north fence", "the vegetable bed"),
        ("litres of water", "centimetres", "kilograms", "plants", "days", "degrees Celsius"),
    ),
    Topic(
        "Plain Money",
        "plainmoney.example",
        "finance",
        ("the emergency fund", "a low-cost index fund", "the credit card balance",
         "my monthly budget", "the pension contribution", "a fixed-rate savings account",
         "the mortgage overpayment", "a sinking fund"),
        ("the interest rate", "monthly spending", "the savings rate", "fees", "the tax bill",
         "cash flow", "the repayment schedule", "net worth", "the buffer"),
        ("grew", "shrank", "stabilised", "doubled", "recovered", "lagged", "paid off"),
        ("boring", "flexible", "risky", "safe", "expensive", "cheap", "predictable", "lumpy"),
        ("the current account", "a spreadsheet", "the banking app", "the pension portal",
         "a notebook on the fridge", "the broker account"),
        ("pounds", "percent", "months", "years", "basis points", "euros"),
    ),
)
FIRST_NAMES = ("Maren", "Tobias", "Delia", "Ravi", "Agnieszka", "Olu", "Hannah", "Jonas",
               "Priya", "Callum", "Ines", "Mateo", "Sofia", "Kwame", "Lena", "Farid")
LAST_NAMES = ("Holloway", "Fairweather", "Duval", "Okafor", "Lindqvist", "Marsh", "Brennan",
              "Kowalski", "Sato", "Achterberg", "Quinn", "Novak", "Ferreira", "Iyer")
YEAR = 2024
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
TITLES = (
    "What {n} {unit} Taught Me About {thing}",
    "Why {subject} {action} After {n} {unit}",
    "A Field Report on {thing}: {n} {unit} Later",
    "The Honest Guide to {thing} and {subject}",
    "{n} Lessons From {subject} and {thing}",
    "How I Fixed {thing} With {subject}",
)
HEADINGS = (
    "What went wrong first", "The numbers", "What I changed", "How I measured it",
    "What surprised me", "The routine that stuck", "Mistakes worth avoiding", "Where it ended up",
    "What I would do differently", "A note on {thing}", "Why {thing} matters",
)
SENTENCES = (
    "When I first looked at {thing}, {subject} had {action} in a way I did not expect.",
    "After {n} {unit}, {thing} was noticeably more {quality} than the week before.",
    "{Subject} sat in {place} for most of the trial, which mattered more than I thought.",
    "I wrote every reading down, and {thing} {action} on {n} of the days I checked.",
    "My neighbour {name} suggested changing one thing at a time, starting with {thing}.",
    "The difference between a {quality} result and a {quality2} one was mostly {thing}.",
    "It is tempting to blame {subject}, but the real cause was {thing} in {place}.",
    "By the end of the month {thing} had {action}, and {subject} felt {quality} again.",
    "Most guides skip this step, yet {thing} decides whether {subject} ends up {quality}.",
    "I repeated the test {n} times to make sure the change in {thing} was not luck.",
    "On the worst day {thing} {action}, so I moved {subject} to {place} and waited.",
    "The cheapest fix was also the most effective: keep {thing} {quality} and check it daily.",
    "{Name} measured {n} {unit} on the same setup, which matched my own notes closely.",
    "There is no single trick here; {subject} simply needs {thing} to stay {quality}.",
    "Looking back, the first {n} {unit} were wasted because I ignored {thing}.",
    "If you only change one thing, change {thing} and leave {subject} alone for a week.",
    "That small adjustment meant {subject} {action} within {n} {unit}.",
    "I still do not fully understand why {thing} {action}, but the pattern held every time.",
    "A reader asked whether {place} makes a difference; in my case it clearly did.",
    "The logbook shows {thing} at {n} {unit} before the change and far less after it.",
)
LIST_ITEMS = (
    "Check {thing} at the same time every day.",
    "Keep {subject} in {place} unless there is a reason to move it.",
    "Write down {n} {unit} as a baseline before changing anything.",
    "Expect {thing} to look {quality} for the first few days.",
    "Ask someone like {name} to double-check your numbers.",
)
COMMENTS = (
    "This matches what I saw with {thing}. Thanks for writing the numbers down.",
    "Did you try {place} instead? It made a big difference for me.",
    "Great post, I am going to try this with {subject} this weekend.",
)
# fmt: on


def _fill(template: str, rng: random.Random, topic: Topic) -> str:
    """One template with its slots drawn from the topic; the capitalised slot names give a
    sentence-initial capital letter."""
    quality, quality2 = rng.sample(topic.qualities, 2)
    values = {
        "subject": rng.choice(topic.subjects),
        "thing": rng.choice(topic.things),
        "action": rng.choice(topic.actions),
        "quality": quality,
        "quality2": quality2,
        "place": rng.choice(topic.places),
        "unit": rng.choice(topic.units),
        "n": str(rng.randint(2, 480)),
        "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
    }
    values["Subject"] = values["subject"][0].upper() + values["subject"][1:]
    values["Name"] = values["name"]
    return template.format(**values)


def _title_case(text: str) -> str:
    return " ".join(w if w[0].isupper() or w[0].isdigit() else w.capitalize() for w in text.split())


def article_html(index: int, seed: int = 0) -> str:
    """A blog article page, the same for the same (index, seed), with about 400-900 words of
    article text.

    The index is in the title and the date varies, and paragraphs are random draws from a
    large template space, so every page has its own content hash.
    """
    rng = random.Random(seed * 1_000_003 + index)
    topic = TOPICS[index % len(TOPICS)]
    author = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    day, month = rng.randint(1, 28), rng.randint(1, 12)
    # Past dates only: htmldate rejects a date after today and then falls back to dateparser
    # over every locale, ~5 s of CPU the first time in each process.
    date = f"{YEAR}-{month:02d}-{day:02d}"
    title = _title_case(_fill(rng.choice(TITLES), rng, topic)) + f" (Notes {index + 1})"
    slug = f"{topic.section}/post-{index + 1}"
    target_words = rng.randint(360, 800)  # body words; title, list and headings add ~10 %
    body: list[str] = []
    words = 0
    paragraphs = 0
    while words < target_words:
        if paragraphs and paragraphs % 3 == 0:
            heading = _fill(rng.choice(HEADINGS), rng, topic)
            body.append(f"<h2>{html.escape(heading[0].upper() + heading[1:])}</h2>")
        if paragraphs == 4:
            items = [_fill(t, rng, topic) for t in rng.sample(LIST_ITEMS, 4)]
            body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
            words += sum(len(i.split()) for i in items)
        text = " ".join(_fill(rng.choice(SENTENCES), rng, topic) for _ in range(rng.randint(3, 7)))
        body.append(f"<p>{html.escape(text)}</p>")
        words += len(text.split())
        paragraphs += 1
    comments = "".join(
        f'<li class="comment"><p class="comment-meta"><strong>{rng.choice(FIRST_NAMES)}</strong>'
        f" · {day} {MONTHS[month - 1]} {YEAR}</p><p>{html.escape(_fill(c, rng, topic))}</p></li>"
        for c in rng.sample(COMMENTS, 2)
    )
    esc_title, esc_site = html.escape(title), html.escape(topic.site)
    canonical = f"https://{topic.host}/{slug}/"
    return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{esc_title} | {esc_site}</title>
  <meta name="author" content="{html.escape(author)}">
  <meta property="og:type" content="article">
  <meta property="og:title" content="{esc_title}">
  <meta property="og:site_name" content="{esc_site}">
  <meta property="og:url" content="{canonical}">
  <meta property="article:published_time" content="{date}T08:00:00+00:00">
  <link rel="canonical" href="{canonical}">
</head>
<body class="post-template">
  <header class="site-header">
    <a class="site-title" href="https://{topic.host}/">{esc_site}</a>
    <nav class="main-nav" aria-label="Main"><ul>
      <li><a href="/">Home</a></li><li><a href="/{topic.section}/">{topic.section.title()}</a></li>
      <li><a href="/about/">About</a></li><li><a href="/newsletter/">Newsletter</a></li>
    </ul></nav>
  </header>
  <main id="content">
    <article class="post">
      <h1>{esc_title}</h1>
      <p class="byline">By <a rel="author" href="/authors/{index % 97}/">{html.escape(author)}</a>
        · <time datetime="{date}">{day} {MONTHS[month - 1]} {YEAR}</time></p>
      <div class="post-body">
        {chr(10).join(body)}
      </div>
    </article>
    <section class="comments" id="comments">
      <h2>2 comments</h2>
      <ol class="comment-list">{comments}</ol>
    </section>
  </main>
  <aside class="sidebar"><section class="widget popular-posts"><h3>Popular posts</h3><ul>
    <li><a href="/{topic.section}/post-1/">Start here</a></li>
    <li><a href="/{topic.section}/archive/">The archive</a></li>
  </ul></section></aside>
  <div class="cookie-banner" role="dialog" aria-label="Cookie consent">
    <p>This site uses cookies to count visits. <a href="/cookies/">Cookie policy</a>.</p>
    <button type="button">Accept</button>
  </div>
  <footer class="site-footer"><p>© {YEAR} {esc_site}</p>
    <nav aria-label="Footer"><a href="/privacy/">Privacy</a> · <a href="/contact/">Contact</a></nav>
  </footer>
</body>
</html>
"""


def article_pages(n: int, seed: int = 0) -> dict[str, bytes]:
    """Path -> page body for articles 0..n-1."""
    return {f"/post/{i + 1}.html": article_html(i, seed).encode("utf-8") for i in range(n)}


class ArticleHandler(_Handler):
    """Serves the generated pages from memory, answering If-None-Match with 304."""

    def do_GET(self) -> None:
        site = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/robots.txt":
            site.count("robots")
            return self.send(200, b"User-agent: *\nAllow: /\n", "text/plain")
        page = site.pages.get(path)
        if page is None:
            return self.send(404, b"not found", "text/plain")
        body, etag = page
        if self.headers.get("If-None-Match") == etag:
            site.count("not_modified")
            return self.send(304, b"", "text/html", {"ETag": etag})
        site.count("ok")
        headers = {"ETag": etag, "Last-Modified": LAST_MODIFIED}
        return self.send(200, body, "text/html; charset=utf-8", headers)


class ArticleSite(BenchServer):
    """The synthetic blog: `urls` lists every article."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(ArticleHandler)
        self.lock = threading.Lock()
        self.counters = {"ok": 0, "not_modified": 0, "robots": 0}
        self.pages = {
            path: (body, '"' + hashlib.sha1(body).hexdigest()[:16] + '"')
            for path, body in article_pages(n, seed).items()
        }

    def count(self, name: str) -> None:
        with self.lock:
            self.counters[name] += 1

    @property
    def urls(self) -> list[str]:
        return [self.base_url + path for path in self.pages]

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counters)


def start_article_site(n: int, seed: int = 0) -> ArticleSite:
    site = ArticleSite(n, seed)
    site.start()
    return site


# ---------------------------------------------------------------- OpenAI-compatible API

BASE_VECTORS = 16


@lru_cache(maxsize=64)
def _base_vectors(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE_VECTORS unit vectors from tests.fakes.fake_embedding, and their coordinates
    formatted as JSON numbers (what a float reply is made of)."""
    matrix = np.asarray(
        [fake_embedding(f"bench-base-{i}", dim) for i in range(BASE_VECTORS)], dtype=np.float32
    )
    return matrix, np.vectorize(lambda x: repr(float(x)), otypes=[object])(matrix)


def embedding_json(text: str, dim: int, encoding_format: str) -> str:
    """A unit vector of its own for `text`, as the JSON of a float list or of a base64 string.

    A seeded permutation of one of the base vectors: still a random-looking unit vector,
    distinct for every text (so no HNSW index sees duplicates), and about 0.1-0.25 ms to
    produce instead of the fake's ~0.7 ms (a fresh Gaussian plus json.dumps of 1536 floats).
    """
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    matrix, formatted = _base_vectors(dim)
    slot, order = seed % BASE_VECTORS, rng.permutation(dim)
    if encoding_format == "base64":
        raw = matrix[slot, order].astype("<f4").tobytes()
        return '"' + base64.b64encode(raw).decode() + '"'
    return "[" + ", ".join(formatted[slot, order]) + "]"


class LatencyOpenAIHandler(OpenAIHandler):
    """tests.fakes.OpenAIHandler's replies after a set latency, with in-flight accounting.

    Chat replies come from the fake's `_chat` (summary and pairs taken from the article);
    reading, auth, counting and the sleep are done here, so the fake's own knobs (scripted
    faults, fault rates) stay out of the benchmark. Embedding vectors come from
    `embedding_json`, cheap to make: this server shares the machine with the pipeline it
    measures, while a real endpoint computes elsewhere. The client still receives and parses
    a full-size response, as float lists or base64, whichever it asked for.

    A request counts as in flight from its arrival until its response headers are sent: the
    client frees its slot when the headers arrive, and an embedding response's body (megabytes)
    may still be on its way while the next request comes in.
    """

    _in_flight: str | None = None

    def do_POST(self) -> None:
        api = self.server.owner  # type: ignore[attr-defined]
        kind = "chat" if self.path.endswith("/chat/completions") else "embed"
        if kind == "embed" and not self.path.endswith("/embeddings"):
            return self._error(404, "no such route")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.headers.get("Authorization") != f"Bearer {api.api_key}":
            return self._error(401, "invalid api key")
        api.enter(kind)
        self._in_flight = kind
        try:
            if kind == "chat":
                time.sleep(api.chat_latency)
                with api.lock:
                    api.chat_calls += 1
                return self._chat(body, "ok")
            time.sleep(api.embed_latency)
            return self._embeddings(api, body)
        finally:
            self._leave()

    def end_headers(self) -> None:
        super().end_headers()
        self._leave()

    def _leave(self) -> None:
        if self._in_flight is not None:
            self.server.owner.leave(self._in_flight)  # type: ignore[attr-defined]
            self._in_flight = None

    def _embeddings(self, api: LatencyOpenAI, body: dict) -> None:
        texts = body["input"]
        with api.lock:
            api.embedding_calls += 1
            api.embedding_inputs += len(texts)
            api.largest_embedding_request = max(api.largest_embedding_request, len(texts))
        dim = int(body.get("dimensions", 1536))
        encoding_format = body.get("encoding_format") or "float"
        items = [
            f'{{"object": "embedding", "index": {i}, '
            f'"embedding": {embedding_json(text, dim, encoding_format)}}}'
            for i, text in enumerate(texts)
        ]
        tokens = sum(len(t.split()) for t in texts)
        payload = (
            f'{{"object": "list", "data": [{", ".join(items)}], "model": {json.dumps(body["model"])},'
            f' "usage": {{"prompt_tokens": {tokens}, "total_tokens": {tokens}}}}}'
        )
        return self.send(200, payload.encode(), "application/json")


class LatencyOpenAI(BenchServer):
    """The fake endpoint with latencies, counters and the peak of concurrent chat calls."""

    def __init__(self, chat_latency: float, embed_latency: float, api_key: str) -> None:
        super().__init__(LatencyOpenAIHandler)
        self.chat_latency = chat_latency
        self.embed_latency = embed_latency
        self.api_key = api_key
        self.models: list[str] = []  # what GET /v1/models lists (`blogqa init` checks it)
        self.page_faults: dict[str, str] = {}  # tests.fakes' bad-content faults: none here
        self.lock = threading.Lock()
        self.chat_calls = self.embedding_calls = self.embedding_inputs = 0
        self.largest_embedding_request = 0
        self.in_flight = {"chat": 0, "embed": 0}
        self.max_in_flight = {"chat": 0, "embed": 0, "any": 0}

    def enter(self, kind: str) -> None:
        with self.lock:
            self.in_flight[kind] += 1
            self.max_in_flight[kind] = max(self.max_in_flight[kind], self.in_flight[kind])
            total = sum(self.in_flight.values())
            self.max_in_flight["any"] = max(self.max_in_flight["any"], total)

    def leave(self, kind: str) -> None:
        with self.lock:
            self.in_flight[kind] -= 1

    def reset_peaks(self) -> None:
        with self.lock:
            self.max_in_flight = dict.fromkeys(self.max_in_flight, 0)
            self.largest_embedding_request = 0

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "chat_calls": self.chat_calls,
                "embedding_calls": self.embedding_calls,
                "embedding_inputs": self.embedding_inputs,
                "largest_embedding_request": self.largest_embedding_request,
                "max_concurrent_chat": self.max_in_flight["chat"],
                "max_concurrent_embed": self.max_in_flight["embed"],
                "max_concurrent_model_calls": self.max_in_flight["any"],
            }


def start_latency_openai(
    chat_latency: float = 0.8, embed_latency: float = 0.15, api_key: str = "bench-key"
) -> LatencyOpenAI:
    server = LatencyOpenAI(chat_latency, embed_latency, api_key)
    server.start()
    return server
