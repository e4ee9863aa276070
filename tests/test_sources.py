"""Discovery (issue 14, item 4): `blogqa sources add|list`, and a poll that reads feeds and
sitemaps through the crawler (robots-aware, conditional GET), enqueues new or changed URLs
and at most `max_per_poll` of them per source.

The feeds and sitemaps are served by the test page server on 127.0.0.1 (`server.feeds`);
nothing reaches the internet.
"""

from __future__ import annotations

import json

import pytest

from blogqa import cli, sources
from blogqa.config import load_settings
from tests.fakes import ARTICLE_FILES
from tests.test_reprocess import run_stages


def rss(base: str, items: list[tuple[str, str]]) -> str:
    entries = "".join(
        f"<item><title>{path}</title><link>{base}{path}</link><pubDate>{date}</pubDate></item>"
        for path, date in items
    )
    return f'<?xml version="1.0"?><rss version="2.0"><channel>{entries}</channel></rss>'


def urlset(base: str, items: list[tuple[str, str]]) -> str:
    entries = "".join(f"<url><loc>{base}{p}</loc><lastmod>{d}</lastmod></url>" for p, d in items)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{entries}</urlset>'
    )


@pytest.fixture
def site(conn, page_server):
    conn.execute("TRUNCATE blogqa.sources RESTART IDENTITY CASCADE")
    page_server.feeds.clear()
    page_server.hits.clear()
    yield page_server
    page_server.feeds.clear()


def queued(conn) -> dict[str, str]:
    return dict(conn.execute("SELECT url, status FROM blogqa.url_queue"))


def test_parsers_read_rss_atom_and_sitemap_index() -> None:
    atom = (
        '<feed xmlns="http://www.w3.org/2005/Atom"><entry><link rel="alternate" href="/a"/>'
        '<link rel="edit" href="/edit"/><updated>2026-01-02T00:00:00Z</updated></entry></feed>'
    )
    assert sources.parse_feed(atom.encode(), "https://b.example/") == [
        ("https://b.example/a", "2026-01-02T00:00:00Z")
    ]
    index = (
        '<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><sitemap>'
        "<loc>https://b.example/s1.xml</loc><lastmod>2026-01-01</lastmod></sitemap></sitemapindex>"
    )
    assert sources.parse_sitemap(index.encode(), "https://b.example/") == (
        [],
        [("https://b.example/s1.xml", "2026-01-01")],
    )
    evil = (
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<rss><channel><item><link>https://b.example/&x;</link></item></channel></rss>"
    )
    [(url, _)] = sources.parse_feed(evil.encode(), "https://b.example/")
    assert "root:" not in url  # external entities are not resolved


def test_feed_poll_enqueues_new_then_only_changed(conn, site) -> None:
    base = site.base_url
    items = [
        (f"/articles/{name}", f"Mon, 0{i + 1} Nov 2026 10:00:00 GMT")
        for i, name in enumerate(ARTICLE_FILES[:3])
    ]
    site.feeds["/feed.xml"] = (rss(base, items), "application/rss+xml")
    settings = load_settings()
    sources.add(conn, f"{base}/feed.xml", kind="feed", max_per_poll=2)

    [first] = sources.poll_all(settings)
    assert (first.status, first.found, first.enqueued) == ("ok", 3, 2)
    # newest first: the 3rd and 2nd items
    assert set(queued(conn)) == {f"{base}{p}" for p, _ in items[1:]}

    # unchanged feed: a conditional GET (304); the item the limit held back comes now
    [second] = sources.poll_all(settings)
    assert (second.status, second.enqueued) == ("not modified", 1)
    assert set(queued(conn)) == {f"{base}{p}" for p, _ in items}

    # nothing new: nothing enqueued
    assert sources.poll_all(settings)[0].enqueued == 0

    # one entry updated: only it is enqueued again (requeued once done)
    conn.execute("UPDATE blogqa.url_queue SET status = 'done'")
    items[0] = (items[0][0], "Tue, 10 Nov 2026 10:00:00 GMT")
    site.feeds["/feed.xml"] = (rss(base, items), "application/rss+xml")
    [fourth] = sources.poll_all(settings)
    assert fourth.enqueued == 1
    assert queued(conn)[f"{base}{items[0][0]}"] == "queued"
    assert sorted(queued(conn).values()) == ["done", "done", "queued"]


def test_sitemap_poll_is_robots_aware(conn, site) -> None:
    base = site.base_url
    items = [
        (f"/articles/{ARTICLE_FILES[0]}", "2026-11-01"),
        ("/private/secret.html", "2026-11-02"),
    ]
    site.feeds["/sitemap.xml"] = (urlset(base, items), "application/xml")
    sources.add(conn, f"{base}/sitemap.xml", kind="sitemap")
    [result] = sources.poll_all(load_settings())
    assert (result.found, result.enqueued) == (2, 1)
    assert list(queued(conn)) == [f"{base}/articles/{ARTICLE_FILES[0]}"]  # /private/ disallowed
    assert "/private/secret.html" not in site.hits


def test_site_finds_its_feed_and_a_broken_source_does_not_stop_others(conn, site) -> None:
    base = site.base_url
    home = (
        '<html><head><link rel="alternate" type="application/rss+xml" href="/blog.rss">'
        "</head><body>home</body></html>"
    )
    site.feeds["/home"] = (home, "text/html")
    site.feeds["/blog.rss"] = (rss(base, [(f"/articles/{ARTICLE_FILES[1]}", "")]), "text/xml")
    sources.add(conn, f"{base}/gone-feed.xml", kind="feed")
    sources.add(conn, f"{base}/home", kind="site")
    results = {r.url: r for r in sources.poll_all(load_settings())}
    assert results[f"{base}/gone-feed.xml"].status == "error"
    assert "404" in results[f"{base}/gone-feed.xml"].error
    assert results[f"{base}/home"].enqueued == 1
    assert list(queued(conn)) == [f"{base}/articles/{ARTICLE_FILES[1]}"]
    listed = {row["url"]: row for row in sources.list_sources(conn)}
    assert listed[f"{base}/gone-feed.xml"]["last_status"] == "error"


def test_cli_sources(conn, site, capsys) -> None:
    base = site.base_url
    assert cli.main(["sources", "add", f"{base}/feed.xml", "--kind", "feed", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert (added["kind"], added["max_per_poll"]) == ("feed", 100)
    assert cli.main(["sources", "add", "ftp://nope", "--kind", "feed"]) == 2
    assert "not supported" in capsys.readouterr().err
    assert cli.main(["sources", "list", "--json"]) == 0
    assert [row["url"] for row in json.loads(capsys.readouterr().out)] == [f"{base}/feed.xml"]
    assert cli.main(["sources", "remove", str(added["id"])]) == 0
    assert sources.list_sources(conn) == []


def test_end_to_end_discovered_post_is_processed(conn, site, openai_env) -> None:
    """Discovery then the stages: the feed's post ends done as a document."""
    base = site.base_url
    post = f"/articles/{ARTICLE_FILES[2]}"
    site.feeds["/feed.xml"] = (
        rss(base, [(post, "Mon, 02 Nov 2026 10:00:00 GMT")]),
        "application/rss+xml",
    )
    settings = load_settings()
    sources.add(conn, f"{base}/feed.xml", kind="feed")
    assert sources.poll_all(settings)[0].enqueued == 1
    assert run_stages(settings) != []
    assert queued(conn) == {f"{base}{post}": "done"}
    document = conn.execute("SELECT url FROM blogqa.documents").fetchall()
    assert document == [(f"{base}{post}",)]
