"""The publisher widget in headless Chromium, on a sample article served on 127.0.0.1.

The blog and the API are two origins (two ports). The article carries the one tag a publisher
adds; the pipeline processed the article as published (tag included). The widget must show the
page's questions collapsed, open them by keyboard, answer a typed question from that page's
chunks only, expose ARIA state, and make no request to anything but 127.0.0.1.
"""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from blogqa import db
from blogqa.api import create_app
from blogqa.config import load_settings
from blogqa.urls import normalize_url
from tests.browser import chromium, free_port, process, serve_app, start_site
from tests.fakes import ARTICLES

ARTICLE = "01-sourdough-starter.html"
OTHER = "11-postgres-index.html"  # stored too: the widget must never answer from it


@pytest.fixture(scope="module")
def blog():
    """Two articles on a blog origin; the widget tag points at the API origin (fixed port)."""
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    tag = f'<script src="{api}/widget.js" async></script>'
    html = (ARTICLES / ARTICLE).read_text("utf-8")
    assert "</article>" in html
    page = html.replace("</article>", f"</article>\n{tag}", 1).encode()
    site = start_site(
        {
            f"/blog/{ARTICLE}": (page, "text/html; charset=utf-8"),
            f"/blog/{OTHER}": ((ARTICLES / OTHER).read_bytes(), "text/html; charset=utf-8"),
            "/robots.txt": (b"User-agent: *\nAllow: /\n", "text/plain"),
        }
    )
    yield {"site": site, "api": api, "api_port": api_port}
    site.stop()


@pytest.fixture(scope="module")
def data(blog):
    settings = load_settings()
    base = blog["site"].base_url
    urls = [f"{base}/blog/{ARTICLE}", f"{base}/blog/{OTHER}"]
    process(settings, urls)
    with db.connect(settings) as conn:
        found = dict(conn.execute("SELECT d.url, d.id FROM blogqa.documents d").fetchall())
    # by URL: the two pages are two chunks, loaded in whichever order their tasks ran
    assert set(found) == {normalize_url(u) for u in urls}
    stored = [(normalize_url(u), found[normalize_url(u)]) for u in urls]
    widget_settings = dataclasses.replace(
        settings, api_cors_origins=(base,), api_rate_limit_per_minute=600, api_rate_burst=60
    )
    return {"settings": widget_settings, "url": urls[0], "doc": stored[0][1], "other": stored[1][1]}


@pytest.fixture(scope="module")
def reader(data):
    with db.connect(data["settings"]) as conn:
        yield conn


def test_widget_in_chromium(blog, data, reader, tmp_path):
    questions = reader.execute(
        "SELECT question, answer FROM blogqa.questions WHERE document_id = %s ORDER BY position",
        (data["doc"],),
    ).fetchall()
    assert 3 <= len(questions) <= 5
    chunks = {
        r[0]
        for r in reader.execute(
            "SELECT text FROM blogqa.chunks WHERE document_id = %s", (data["doc"],)
        )
    }
    asks_before = reader.execute(
        "SELECT count(*) FROM blogqa.llm_usage WHERE stage = 'ask'"
    ).fetchone()[0]
    # the API with a bearer token: the widget's routes stay public, the rest does not
    app = create_app(data["settings"], api_token="not-in-the-page")
    with serve_app(app, port=blog["api_port"]) as api, chromium() as browser:
        assert api == blog["api"]
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(data["url"])
        section = page.locator("section.blogqa")
        section.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "widget.png"), full_page=True)

        buttons = section.locator("button.blogqa-q")
        assert buttons.all_inner_texts() == [q for q, _ in questions]
        for i, (_, answer) in enumerate(questions):
            button = buttons.nth(i)
            assert button.get_attribute("aria-expanded") == "false"
            panel = page.locator(f"#{button.get_attribute('aria-controls')}")
            assert panel.get_attribute("role") == "region"
            assert panel.get_attribute("aria-labelledby") == button.get_attribute("id")
            assert panel.is_hidden()
            assert panel.inner_text(timeout=1000) == "" or not panel.is_visible()
        assert section.get_attribute("aria-labelledby")

        # keyboard only: focus the first question, open it with Enter, close it with Space
        first = buttons.nth(0)
        first.focus()
        page.keyboard.press("Enter")
        assert first.get_attribute("aria-expanded") == "true"
        panel = page.locator(f"#{first.get_attribute('aria-controls')}")
        assert panel.is_visible() and panel.inner_text() == questions[0][1]
        page.keyboard.press("Space")
        assert first.get_attribute("aria-expanded") == "false" and panel.is_hidden()
        # Tab moves to the next question, then on to the ask box
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == buttons.nth(1).get_attribute("id")
        for _ in range(len(questions) - 1):
            page.keyboard.press("Tab")
        box = section.locator("form[role=search] input")
        assert page.evaluate("document.activeElement.id") == box.get_attribute("id")
        assert section.locator(f"label[for='{box.get_attribute('id')}']").count() == 1

        # a question about the other stored article: answered from this page's chunks only
        page.keyboard.type("How do I feed a sourdough starter?")
        page.keyboard.press("Enter")
        out = section.locator("[role=status]")
        assert out.get_attribute("aria-live") == "polite"
        answer = section.locator(".blogqa-answer")
        answer.wait_for(timeout=30_000)
        text = answer.inner_text()
        assert any(text in chunk for chunk in chunks), text
        box.fill("Which index types does PostgreSQL offer for text search?")
        with page.expect_response(lambda r: r.url == f"{api}/widget/v1/ask") as asked:
            section.locator("form button[type=submit]").click()
        passages = asked.value.json()["passages"]
        assert passages and all(p["text"] in chunks for p in passages)
        page.wait_for_function(
            "() => !document.querySelector('section.blogqa [role=status]')"
            ".hasAttribute('aria-busy')",
            timeout=30_000,
        )
        other = answer.inner_text()
        assert other == "The stored articles do not answer this question." or any(
            other in chunk for chunk in chunks
        ), other

        # every request went to 127.0.0.1: the blog page, the script, the two routes
        assert requested and all(u.startswith("http://127.0.0.1:") for u in requested)
        assert any(u == f"{api}/widget.js" for u in requested)
        assert any(u.startswith(f"{api}/widget/v1/page?url=") for u in requested)
    asks_after = reader.execute(
        "SELECT count(*) FROM blogqa.llm_usage WHERE stage = 'ask'"
    ).fetchone()[0]
    assert asks_after - asks_before == 4  # two answers, each an embedding and a chat call


def test_widget_routes_are_public_read_only_and_one_page(data):
    app = create_app(data["settings"], api_token="secret")
    with TestClient(app) as client:
        assert client.get("/api/v1/documents").status_code == 401  # the token still guards
        js = client.get("/widget.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        page = client.get("/widget/v1/page", params={"url": data["url"] + "#comments"}).json()
        assert page["url"] == normalize_url(data["url"])
        assert set(page) == {"url", "title", "questions"}
        assert all(set(q) == {"question", "answer"} for q in page["questions"])
        unknown = client.get("/widget/v1/page", params={"url": "https://example.com/x"})
        assert unknown.status_code == 404
        body = {"url": data["url"], "question": "How warm should the kitchen be?"}
        answer = client.post("/widget/v1/ask", json=body)
        assert answer.status_code == 200, answer.text
        passages = answer.json()["passages"]
        positions = [p["position"] for p in passages]
        own = dict(_chunks(data["settings"], data["doc"]))
        assert positions and all(own[p] == t["text"] for p, t in zip(positions, passages))
        assert client.post("/widget/v1/ask", json={**body, "extra": 1}).status_code == 422
        assert client.delete("/widget/v1/ask").status_code == 405


def _chunks(settings, document_id: int) -> list[tuple[int, str]]:
    with db.connect(settings) as conn:
        return conn.execute(
            "SELECT position, text FROM blogqa.chunks WHERE document_id = %s", (document_id,)
        ).fetchall()


def test_cors_allows_the_blog_origin_only(blog, data):
    blog_origin = blog["site"].base_url
    with TestClient(create_app(data["settings"], api_token="")) as client:
        preflight = client.options(
            "/widget/v1/ask",
            headers={
                "Origin": blog_origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == blog_origin
        stranger = client.options(
            "/widget/v1/ask",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in stranger.headers
        got = client.get(
            "/widget/v1/page", params={"url": data["url"]}, headers={"Origin": blog_origin}
        )
        assert got.headers["access-control-allow-origin"] == blog_origin
