"""Duplicates paid once (issue 14, item 5): a page that declares a stored document's URL as
its canonical URL, or whose text is a near-duplicate of a stored document, is linked to the
original, ends `skipped` with the reason, and costs no model call.

The test page server serves each demo article also at /syndicated/<file> (declaring the
/articles/ copy canonical) and /copies/<file> (no canonical URL, a republication note added).
"""

from __future__ import annotations

import pytest

from blogqa import dedupe, pipeline, runner
from blogqa.config import load_settings
from tests.conftest import queue_row
from tests.fakes import ARTICLE_FILES
from tests.test_reprocess import run_stages

A, B = ARTICLE_FILES[0], ARTICLE_FILES[3]


def test_minhash_similarity_separates_copies_from_other_posts() -> None:
    from blogqa.extract import extract_article
    from tests.fakes import ARTICLES

    texts = [
        extract_article((ARTICLES / name).read_text("utf-8"), "http://x/").text
        for name in ARTICLE_FILES
    ]
    prints = [dedupe.fingerprint(text) for text in texts]
    assert all(p is not None for p in prints)
    different = max(
        prints[i].similarity(prints[j].minhash)
        for i in range(len(prints))
        for j in range(i + 1, len(prints))
    )
    assert different < 0.3  # distinct posts, some of one blog, share few 3-shingles
    copy = "Republished with permission from the author's blog. " + texts[0] + " Thanks!"
    assert dedupe.fingerprint(copy).similarity(prints[0].minhash) >= dedupe.DEFAULT_THRESHOLD
    assert dedupe.fingerprint("too short to compare") is None


@pytest.fixture
def original(conn, openai_env, page_server):
    """Article A processed once; returns (settings, its URL)."""
    settings = load_settings()
    url = f"{page_server.base_url}/articles/{A}"
    pipeline.enqueue_urls([url], settings)
    assert len(run_stages(settings)) == 1
    return settings, url


def duplicate_row(conn, url: str) -> tuple | None:
    return conn.execute(
        "SELECT original_url, reason, similarity FROM blogqa.duplicates WHERE url = %s", (url,)
    ).fetchone()


def test_canonical_and_near_duplicates_cost_no_model_call(
    original, conn, openai_server, page_server
) -> None:
    settings, url = original
    base = page_server.base_url
    syndicated, copy, other = f"{base}/syndicated/{A}", f"{base}/copies/{A}", f"{base}/articles/{B}"
    pipeline.enqueue_urls([syndicated, copy, other], settings)
    chat = openai_server.chat_calls
    loaded = run_stages(settings)

    assert openai_server.chat_calls - chat == 1  # only the other article
    assert len(loaded) == 1
    for dup, reason in ((syndicated, "canonical"), (copy, "near_duplicate")):
        row = queue_row(conn, dup)
        assert (row["status"], row["last_stage"]) == ("skipped", "dedupe")
        assert row["last_error"].startswith(f"duplicate of {url}")
        found = duplicate_row(conn, dup)
        assert found[:2] == (url, reason)
        if reason == "near_duplicate":
            assert found[2] >= dedupe.DEFAULT_THRESHOLD
    assert duplicate_row(conn, other) is None
    documents = [r[0] for r in conn.execute("SELECT url FROM blogqa.documents ORDER BY id")]
    assert documents == [url, other]


def test_copies_within_one_chunk_keep_the_first(conn, openai_env, page_server) -> None:
    settings = load_settings()
    base = page_server.base_url
    first, copy = f"{base}/articles/{B}", f"{base}/copies/{B}"
    pipeline.enqueue_urls([first, copy], settings)
    chat = openai_env.chat_calls
    assert len(run_stages(settings)) == 1
    assert openai_env.chat_calls - chat == 1
    assert queue_row(conn, copy)["status"] == "skipped"
    assert duplicate_row(conn, copy)[:2] == (first, "near_duplicate")


def test_one_batch_mixes_every_outcome(original, conn) -> None:
    """The stored side is looked up for the whole batch at once: each page must get its own
    answer, whatever its position among pages with and without canonical URLs or
    fingerprints."""
    from blogqa.extract import extract_article
    from blogqa.queue import Lease
    from tests.fakes import ARTICLES

    _, stored = original
    text_a, text_b, text_c = (
        extract_article((ARTICLES / name).read_text("utf-8"), "http://x/").text
        for name in (A, B, ARTICLE_FILES[1])
    )
    queued = "http://elsewhere.test/queued-original"
    conn.execute("INSERT INTO blogqa.url_queue (url, status) VALUES (%s, 'queued')", (queued,))
    pages = {  # queue id -> (url, page); ids give the batch's order
        11: ("http://x.test/short", {"text": "too short to compare"}),
        12: ("http://x.test/b", {"text": text_b, "canonical_url": "http://x.test/b"}),
        13: ("http://x.test/near-a", {"text": "Republished. " + text_a}),
        14: ("http://x.test/syndicated", {"text": text_c, "canonical_url": stored}),
        15: ("http://x.test/b-again", {"text": text_b + " Thanks for reading."}),
        16: ("http://x.test/points-at-b", {"text": "short", "canonical_url": "http://x.test/b"}),
        17: ("http://x.test/points-at-queued", {"text": "short", "canonical_url": queued}),
        18: ("http://x.test/c", {"text": text_c}),
    }
    batch = [(Lease(i, url, "t", 1), page) for i, (url, page) in reversed(pages.items())]
    found = dedupe.find_duplicates(conn, batch)
    assert {i: (d.original_url, d.reason) for i, d in found.items()} == {
        13: (stored, "near_duplicate"),
        14: (stored, "canonical"),
        15: ("http://x.test/b", "near_duplicate"),
        16: ("http://x.test/b", "canonical"),
        17: (queued, "canonical"),
    }
    assert dedupe.PAGE_KEY in pages[12][1] and dedupe.PAGE_KEY not in pages[11][1]


def test_forced_duplicate_stays_linked_until_stored_as_itself(
    original, conn, page_server, monkeypatch
) -> None:
    settings, _ = original
    copy = f"{page_server.base_url}/copies/{A}"
    pipeline.enqueue_urls([copy], settings)
    run_stages(settings)
    assert duplicate_row(conn, copy) is not None
    # switched off, the same page is processed as a document of its own and unlinked
    monkeypatch.setenv("BLOGQA_DEDUPE", "false")
    pipeline.enqueue_urls([copy], settings, force=True)
    assert len(run_stages(settings)) == 1
    assert duplicate_row(conn, copy) is None
    assert queue_row(conn, copy)["status"] == "done"


def test_the_load_stores_the_signature_the_crawl_computed(
    conn, openai_env, page_server, monkeypatch
) -> None:
    computed = []
    real = dedupe.fingerprint
    monkeypatch.setattr(dedupe, "fingerprint", lambda text: computed.append(text) or real(text))
    settings = load_settings()
    url = f"{page_server.base_url}/articles/{ARTICLE_FILES[5]}"
    pipeline.enqueue_urls([url], settings)
    assert len(run_stages(settings)) == 1
    assert len(computed) == 1  # by the crawl's check; the load took it from the page
    text, minhash, bands = conn.execute(
        "SELECT d.text, f.minhash, f.bands FROM blogqa.documents d "
        "JOIN blogqa.document_fingerprints f ON f.document_id = d.id WHERE d.url = %s",
        (url,),
    ).fetchone()
    expected = real(text)  # what the stored text gives: the kept signature is its own
    assert bytes(minhash) == expected.minhash.astype("<u4").tobytes()
    assert list(bands) == expected.bands


def test_fingerprints_of_older_documents_are_backfilled(original, conn) -> None:
    conn.execute("DELETE FROM blogqa.document_fingerprints")
    conn.execute("DELETE FROM blogqa.settings WHERE key = %s", (dedupe.BACKFILL_DONE_KEY,))
    assert dedupe.backfill(conn) == 1
    assert dedupe.backfill(conn) == 0  # remembered as complete: no scan any more
    assert conn.execute("SELECT count(*) FROM blogqa.document_fingerprints").fetchone()[0] == 1


def test_end_to_end_duplicate_is_skipped(conn, openai_env, page_server) -> None:
    """One `blogqa run` (the DAG under dag.test) with an article and its syndicated copy."""
    settings = load_settings()
    base = page_server.base_url
    urls = [f"{base}/articles/{B}", f"{base}/syndicated/{B}"]
    chat = openai_env.chat_calls
    tally = runner.run_pipeline(settings, urls=urls, chunk_size=2)
    assert tally.failed_runs == []
    assert openai_env.chat_calls - chat == 1
    assert queue_row(conn, urls[0])["status"] == "done"
    row = queue_row(conn, urls[1])
    assert (row["status"], row["last_stage"]) == ("skipped", "dedupe")
    assert duplicate_row(conn, urls[1])[:2] == (urls[0], "canonical")
