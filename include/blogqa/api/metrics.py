"""`GET /metrics`: blogqa's own counters in the Prometheus text format (prometheus_client).

The figures are read from the database on each scrape, not counted in the API process: the
pipeline runs in Airflow's workers, which a scraper of this process could never see, and the
tables are the one place every worker writes. A scrape costs a few aggregate queries (the
ledger and the queue's error histories in full); scrape every 30-60 s, not every second.

Airflow's own metrics (scheduler, executor, task durations) come from Airflow itself, over
StatsD or OpenTelemetry (README: Metrics).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from blogqa.api.operations import Counters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TERMINAL = ("done", "dead", "skipped", "cancelled", "quarantined")


class _Snapshot(Collector):
    """A collector of figures already read (prometheus_client collects synchronously; the
    database is read asynchronously before)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def families(counters: Counters) -> list[Metric]:
    """The metric families of one scrape."""
    queue = GaugeMetricFamily(
        "blogqa_queue_urls", "URLs in blogqa.url_queue by status", labels=["status"]
    )
    oldest = GaugeMetricFamily(
        "blogqa_queue_oldest_age_seconds",
        "age of the oldest URL in each waiting status (queued, processing)",
        labels=["status"],
    )
    pages = CounterMetricFamily(
        "blogqa_pages",
        "URLs that reached an outcome (done, dead, skipped, cancelled, quarantined), as"
        " recorded in the queue",
        labels=["outcome"],
    )
    for entry in counters.queue:
        queue.add_metric([entry.status], entry.count)
        if entry.status in ("queued", "processing") and entry.oldest_seconds is not None:
            oldest.add_metric([entry.status], entry.oldest_seconds)
        if entry.status in TERMINAL:
            pages.add_metric([entry.status], entry.count)
    depth = GaugeMetricFamily("blogqa_queue_depth", "URLs queued or processing")
    depth.add_metric(
        [], sum(e.count for e in counters.queue if e.status in ("queued", "processing"))
    )

    labels = ["stage", "provider", "model"]
    calls = CounterMetricFamily(
        "blogqa_model_requests", "model requests (llm_usage)", labels=labels
    )
    tokens = CounterMetricFamily(
        "blogqa_model_tokens", "model tokens (llm_usage)", labels=[*labels, "kind"]
    )
    cost = CounterMetricFamily(
        "blogqa_model_cost_usd", "model cost in USD (priced models only)", labels=labels
    )
    for row in counters.models:
        key = [row["stage"], row["provider"], row["model"]]
        calls.add_metric(key, row["requests"])
        tokens.add_metric([*key, "prompt"], row["prompt_tokens"])
        tokens.add_metric([*key, "completion"], row["completion_tokens"])
        cost.add_metric(key, row["cost_usd"])

    failures = CounterMetricFamily(
        "blogqa_failures",
        "failed attempts recorded on queue rows, by stage and error class",
        labels=["stage", "class"],
    )
    for row in counters.failures:
        failures.add_metric([row["stage"], row["class"]], row["n"])

    outputs = GaugeMetricFamily("blogqa_output_rows", "rows of the output tables", labels=["table"])
    for table in ("documents", "questions", "chunks"):
        outputs.add_metric([table], counters.outputs[table])
    return [queue, depth, oldest, pages, calls, tokens, cost, failures, outputs]


def render(counters: Counters) -> bytes:
    """The Prometheus text exposition of the counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(counters)))
    return generate_latest(registry)
