"""In-process latency of the read routes (`python bench/api_latency.py [--requests N]`).

Runs against the database of BLOGQA_HOME as it is (run `make demo` first to fill it) through
FastAPI's TestClient, so it measures the app and its queries, not a network or a server.
Writes bench/results/api_latency.json. The full benchmark (100k vectors, 16 concurrent clients
against `blogqa serve`, HNSW recall@10) is bench/api_bench.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient

from blogqa import db
from blogqa.api import create_app
from blogqa.config import load_settings

RESULTS = Path(__file__).resolve().parent / "results" / "api_latency.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    settings = load_settings()
    with db.connect(settings) as conn:
        row = conn.execute(
            "SELECT url, (SELECT count(*) FROM blogqa.documents) FROM blogqa.documents LIMIT 1"
        ).fetchone()
    if row is None:
        print("no documents: run `make demo` first", file=sys.stderr)
        return 1
    url, documents = row
    routes = [
        ("get", "/api/v1/questions/by-url", {"params": {"url": url}}),
        ("post", "/api/v1/search/similar", {"json": {"text": "tomato varieties", "k": 10}}),
        ("post", "/api/v1/qa/ask", {"json": {"question": "How do I revive a starter?"}}),
        ("get", "/api/v1/jobs/stats", {}),
    ]
    results = {"documents": documents, "requests_per_route": args.requests, "routes": {}}
    with TestClient(create_app(settings, api_token="")) as client:
        for method, path, kwargs in routes:
            timings = []
            for _ in range(args.requests):
                started = time.perf_counter()
                response = getattr(client, method)(path, **kwargs)
                timings.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
            timings.sort()
            stats = {
                "p50_ms": round(statistics.median(timings), 2),
                "p95_ms": round(timings[int(len(timings) * 0.95) - 1], 2),
            }
            results["routes"][f"{method.upper()} {path}"] = stats
            print(
                f"{method.upper():5} {path:28} p50 {stats['p50_ms']:6.2f} ms  p95 {stats['p95_ms']:6.2f} ms"
            )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
