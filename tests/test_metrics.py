"""GET /metrics: blogqa's counters in the Prometheus text format, equal to the database."""

from __future__ import annotations

import json
import uuid

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from blogqa.api import create_app


def seed(conn) -> None:
    history = [
        {"stage": "crawl", "class": "transient", "message": "HTTP 503"},
        {"stage": "crawl", "class": "permanent", "message": "HTTP 404"},
    ]
    conn.execute(
        "INSERT INTO blogqa.url_queue (url, status, error_history, enqueued_at) VALUES"
        " ('https://m.example/1', 'done', '[]', now()),"
        " ('https://m.example/2', 'done', '[]', now()),"
        " ('https://m.example/3', 'dead', %s, now()),"
        " ('https://m.example/4', 'queued', %s, now() - interval '2 hours'),"
        " ('https://m.example/5', 'processing', '[]', now() - interval '5 minutes')",
        (json.dumps(history), json.dumps(history[:1])),
    )
    shared = uuid.uuid4()
    for stage, model, prompt, completion, cost, request_id in [
        ("embed", "text-embedding-3-small", 60, 0, "0.0000012", shared),
        ("embed", "text-embedding-3-small", 40, 0, "0.0000008", shared),
        ("summarize", "gpt-4o-mini", 1000, 200, "0.00027", uuid.uuid4()),
        ("summarize", "gpt-4o-mini", 500, 100, "0.000135", uuid.uuid4()),
    ]:
        conn.execute(
            "INSERT INTO blogqa.llm_usage (stage, provider, model, prompt_tokens,"
            " completion_tokens, latency_ms, cost_usd, request_id)"
            " VALUES (%s, 'openai', %s, %s, %s, 5, %s, %s)",
            (stage, model, prompt, completion, cost, request_id),
        )


def scrape(client) -> dict:
    """{(sample name, sorted labels): value} of one scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_match_the_database(conn, settings):
    seed(conn)
    with TestClient(create_app(settings, api_token="")) as client:
        m = scrape(client)
    assert m[("blogqa_queue_urls", (("status", "done"),))] == 2
    assert m[("blogqa_queue_urls", (("status", "cancelled"),))] == 0
    assert m[("blogqa_queue_depth", ())] == 2
    assert 7100 < m[("blogqa_queue_oldest_age_seconds", (("status", "queued"),))] < 7300
    assert m[("blogqa_pages_total", (("outcome", "done"),))] == 2
    assert m[("blogqa_pages_total", (("outcome", "dead"),))] == 1
    embed = (("model", "text-embedding-3-small"), ("provider", "openai"), ("stage", "embed"))
    chat = (("model", "gpt-4o-mini"), ("provider", "openai"), ("stage", "summarize"))
    assert m[("blogqa_model_requests_total", embed)] == 1  # one request, two ledger rows
    assert m[("blogqa_model_requests_total", chat)] == 2
    assert m[("blogqa_model_tokens_total", (("kind", "prompt"), *chat))] == 1500
    assert m[("blogqa_model_tokens_total", (("kind", "completion"), *chat))] == 300
    assert abs(m[("blogqa_model_cost_usd_total", chat)] - 0.000405) < 1e-12
    assert m[("blogqa_failures_total", (("class", "transient"), ("stage", "crawl")))] == 2
    assert m[("blogqa_failures_total", (("class", "permanent"), ("stage", "crawl")))] == 1
    assert m[("blogqa_output_rows", (("table", "documents"),))] == 0

    # counters move with the database, not with this process
    conn.execute("UPDATE blogqa.url_queue SET status = 'done' WHERE url = 'https://m.example/5'")
    with TestClient(create_app(settings, api_token="")) as client:
        assert scrape(client)[("blogqa_pages_total", (("outcome", "done"),))] == 3


def test_metrics_need_the_token_and_skip_the_rate_limit(conn, settings):
    import dataclasses

    limited = dataclasses.replace(settings, api_rate_limit_per_minute=60, api_rate_burst=2)
    with TestClient(create_app(limited, api_token="tok")) as client:
        assert client.get("/metrics").status_code == 401
        auth = {"Authorization": "Bearer tok"}
        for _ in range(5):  # more than the burst: /metrics is exempt from the rate limit
            assert client.get("/metrics", headers=auth).status_code == 200
