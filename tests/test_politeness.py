"""Crawl safety and politeness through the real crawl stage: robots.txt, per-host pacing,
address checks on redirects, the streamed size cap and charset detection."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools

import pytest

from blogqa import pipeline, queue, store
from blogqa.config import load_settings
from blogqa.errors import ConfigError
from tests.fakes import ARTICLE_FILES, start_page_server


@pytest.fixture
def site():
    """A page server of its own, so request counts belong to one test."""
    server = start_page_server(slow_seconds=0.5)
    yield server
    server.stop()


def crawl(conn, settings, urls: list[str]) -> dict[str, tuple[str, str | None]]:
    """Enqueue, claim and run the crawl stage; return url -> (status, last_error)."""
    queue.enqueue(conn, urls)
    leases = queue.claim(conn, 100, owner="test", lease_seconds=60)
    pipeline.crawl_chunk([lease.ref() for lease in leases], settings)
    rows = conn.execute("SELECT url, status, last_error FROM blogqa.url_queue").fetchall()
    return {url: (status, error) for url, status, error in rows}


def test_robots_disallowed_page_is_skipped_and_never_fetched(conn, settings, site):
    private = site.base_url + "/private/notes.html"
    public = site.base_url + "/articles/" + ARTICLE_FILES[0]
    states = crawl(conn, settings, [private, public])
    assert states[private][0] == "skipped"
    assert "robots.txt" in states[private][1]
    assert states[public][0] == "processing"  # on to the next stage
    assert "/private/notes.html" not in site.hits
    assert site.hits["/robots.txt"] == 1


def test_robots_is_fetched_once_per_host_and_cached_across_tasks(conn, settings, site):
    first = [site.base_url + "/articles/" + name for name in ARTICLE_FILES[:3]]
    crawl(conn, settings, first)
    crawl(conn, settings, [site.base_url + "/articles/" + ARTICLE_FILES[3]])
    assert site.hits["/robots.txt"] == 1
    origin = site.base_url.lower()
    row = conn.execute(
        "SELECT status, body FROM blogqa.robots_txt WHERE origin = %s", (origin,)
    ).fetchone()
    assert row == (200, site.robots)
    expired = dataclasses.replace(settings, robots_ttl_seconds=0)
    crawl(conn, expired, [site.base_url + "/articles/" + ARTICLE_FILES[4]])
    assert site.hits["/robots.txt"] == 2


def test_missing_robots_allows_everything(conn, settings, site):
    site.robots_status = 404
    private = site.base_url + "/private/notes.html"
    assert crawl(conn, settings, [private])[private][0] == "processing"


def test_robots_server_error_is_retried_later_not_ignored(conn, settings, site):
    site.robots_status = 503
    url = site.base_url + "/articles/" + ARTICLE_FILES[0]
    status, error = crawl(conn, settings, [url])[url]
    assert status == "queued"
    assert "robots.txt" in error and "503" in error
    assert url.removeprefix(site.base_url) not in site.hits


def test_robots_can_be_switched_off(conn, settings, site):
    ignoring = dataclasses.replace(settings, respect_robots=False)
    private = site.base_url + "/private/notes.html"
    assert crawl(conn, ignoring, [private])[private][0] == "processing"
    assert "/robots.txt" not in site.hits


def test_at_most_per_host_concurrency_requests_at_a_time(conn, settings, site):
    urls = [f"{site.base_url}/slow-{i}" for i in range(6)]
    crawl(conn, dataclasses.replace(settings, per_host_concurrency=2), urls)
    assert site.max_inflight == 2
    assert sum(site.hits.get(f"/slow-{i}", 0) for i in range(6)) == 6


@pytest.mark.timing  # gaps measured at the server
def test_crawl_delay_spaces_request_starts(conn, settings, site):
    site.robots = "User-agent: *\nCrawl-delay: 0.4\n"
    urls = [site.base_url + "/articles/" + name for name in ARTICLE_FILES[:4]]
    crawl(conn, settings, urls)
    starts = sorted(t for path, t in site.starts if path.startswith("/articles/"))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 4
    assert min(gaps) >= 0.35, gaps


def test_crawl_delay_is_capped(conn, settings, site):
    site.robots = "User-agent: *\nCrawl-delay: 3600\n"
    urls = [site.base_url + "/articles/" + name for name in ARTICLE_FILES[:2]]
    capped = dataclasses.replace(settings, max_crawl_delay=0.2)
    states = crawl(conn, capped, urls)
    assert {state for state, _ in states.values()} == {"processing"}


def test_redirect_to_cloud_metadata_is_refused(conn, settings, site):
    strict = dataclasses.replace(
        settings,
        crawl_allow_private=False,
        crawl_allow_networks=(ipaddress.ip_network("127.0.0.1/32"),),
    )
    bad = site.base_url + "/to-private"
    good = site.base_url + "/articles/" + ARTICLE_FILES[0]
    states = crawl(conn, strict, [bad, good])
    assert states[bad][0] == "dead"
    assert "169.254.169.254" in states[bad][1] and "non-public" in states[bad][1]
    assert states[good][0] == "processing"


def test_loopback_is_refused_without_an_allowed_network(conn, settings, site):
    strict = dataclasses.replace(settings, crawl_allow_private=False)
    url = site.base_url + "/articles/" + ARTICLE_FILES[0]
    status, error = crawl(conn, strict, [url])[url]
    assert status == "dead" and "non-public address 127.0.0.1" in error


def test_body_cap_is_enforced_while_streaming(conn, settings, site):
    url = site.base_url + "/huge-stream"
    status, error = crawl(conn, dataclasses.replace(settings, max_page_bytes=2_000_000), [url])[url]
    assert status == "dead"
    assert "exceeds the 2000000-byte cap" in error


def test_page_without_declared_charset_is_detected(conn, settings, site):
    url = site.base_url + "/cp1252"
    assert crawl(conn, settings, [url])[url][0] == "processing"
    leases = queue.renew(
        conn,
        [
            {"id": i, "token": str(t)}
            for i, t in conn.execute("SELECT id, lease_token FROM blogqa.url_queue")
        ],
        60,
    )
    (item,) = store.work_items(conn, leases, settings.embed_dim)
    assert "Crème brûlée" in item.page["text"]
    assert "5 €" in item.page["text"]
    assert "Ã" not in item.page["text"]  # no mojibake


def test_allowed_networks_must_be_cidrs(monkeypatch):
    monkeypatch.setenv("BLOGQA_CRAWL_ALLOW_NETWORKS", "10.0.0.0/8, intranet")
    with pytest.raises(ConfigError, match="'intranet' is not an IP network"):
        load_settings()
    monkeypatch.setenv("BLOGQA_CRAWL_ALLOW_NETWORKS", "10.0.0.0/8,127.0.0.1")
    assert len(load_settings().crawl_allow_networks) == 2
