"""Paid work kept (issue 11, item 3): model results are saved as they arrive, so a task that
fails half-way keeps them and its retry pays only for the rest; an embedding request that
served several documents charges each its share, and the shares add up to the request.

The stages run with the real `openai` client against the test server of tests/fakes.py,
whose `script` / `embedding_script` make chosen calls misbehave and which counts calls.
"""

from __future__ import annotations

import dataclasses
import json
import math
from decimal import ROUND_HALF_UP, Decimal

import pytest

from blogqa import db, pipeline, queue, queue_admin, store
from blogqa.config import load_settings
from blogqa.errors import StageStalledError
from blogqa.llm import ModelCall
from tests.fakes import ARTICLE_FILES
from tests.test_backpressure import claim_and_crawl


@pytest.fixture
def one_at_a_time(openai_env):
    """One model call at a time (the order of results is the order of the pages), no client
    retries (a call on the server is a call the stage made)."""
    return dataclasses.replace(load_settings(), llm_concurrency=1, llm_max_retries=0)


def _urls(page_server, n: int) -> list[str]:
    return [f"{page_server.base_url}/articles/{name}" for name in ARTICLE_FILES[:n]]


def _summarized(conn) -> list[int]:
    rows = conn.execute(
        "SELECT queue_id FROM blogqa.work_items WHERE llm_result IS NOT NULL ORDER BY queue_id"
    )
    return [row[0] for row in rows]


def _embedded(conn) -> list[int]:
    rows = conn.execute(
        "SELECT queue_id FROM blogqa.work_items WHERE vectors IS NOT NULL ORDER BY queue_id"
    )
    return [row[0] for row in rows]


def _charged(conn, stage: str) -> list[int]:
    rows = conn.execute(
        "SELECT queue_id FROM blogqa.llm_usage WHERE stage = %s ORDER BY queue_id", (stage,)
    )
    return [row[0] for row in rows]


def _crawled_and_summarized(
    conn, settings, page_server
) -> tuple[list[dict], list[tuple[int, list[str]]]]:
    """Three pages crawled and summarised: their refs, and each one's embedding inputs."""
    refs = pipeline.summarize_chunk(
        claim_and_crawl(conn, settings, _urls(page_server, 3)), settings
    )
    return refs, _embedding_inputs(conn, settings, refs)


def _embedding_inputs(conn, settings, refs) -> list[tuple[int, list[str]]]:
    """(queue id, texts to embed) per document, in the order the embed stage sends them."""
    leases = queue.renew(conn, refs, settings.lease_seconds)
    items = store.work_items(conn, leases, settings.embed_dim)
    return [(item.lease.id, pipeline.embedding_inputs(item, settings)[0]) for item in items]


def _words(texts: list[str]) -> int:
    """Prompt tokens as the test server counts them."""
    return sum(len(text.split()) for text in texts)


def _micro_usd(tokens: int, price_per_mtok: str = "0.02") -> Decimal:
    """The ledger's cost of `tokens` of text-embedding-3-small (numeric(12, 6))."""
    cost = Decimal(tokens) * Decimal(price_per_mtok) / Decimal(1_000_000)
    return cost.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


# ---------------------------------------------------------------- summarize


@pytest.mark.parametrize(
    ("fault", "raised"),
    [
        ("slow", StageStalledError),  # the call hangs past the stage's stall time
        ("garbage", json.JSONDecodeError),  # a 200 that is not JSON: not classified
    ],
)
def test_summarize_failing_half_way_keeps_results_and_its_retry_calls_only_for_the_rest(
    conn, page_server, openai_env, one_at_a_time, fault, raised
):
    # a short stall time for summarize only: the crawl before it (worker start-up included)
    # may take longer than that on a loaded machine
    settings = dataclasses.replace(one_at_a_time, stage_stall_seconds=2.0)
    openai_env.slow_seconds = 6.0
    refs = claim_and_crawl(conn, one_at_a_time, _urls(page_server, 5))
    assert len(refs) == 5
    ids = [ref["id"] for ref in refs]
    openai_env.script.extend(["ok", "ok", "ok", fault])
    before = openai_env.chat_calls

    with pytest.raises(raised):
        pipeline.summarize_chunk(refs, settings)

    # the fourth call failed the stage; the fifth, if it started meanwhile, was cancelled
    assert openai_env.chat_calls - before >= 4
    assert _summarized(conn) == ids[:3]  # the three results that arrived are kept
    assert _charged(conn, "summarize") == ids[:3]  # with their usage, once each
    statuses = conn.execute("SELECT DISTINCT status FROM blogqa.url_queue").fetchall()
    assert statuses == [("processing",)]  # the failed task recorded no URL failure

    # Airflow retries the task with the same refs: only the two pages without a result
    # cost a call.
    before = openai_env.chat_calls
    assert pipeline.summarize_chunk(refs, settings) == refs
    assert openai_env.chat_calls - before == 2
    assert _summarized(conn) == ids
    assert _charged(conn, "summarize") == ids


def test_a_result_whose_lease_is_gone_is_not_saved_but_its_call_is_charged(conn, settings):
    queue.enqueue(conn, ["https://example.com/kept", "https://example.com/cancelled"])
    kept, cancelled = queue.claim(conn, 10, owner="test", lease_seconds=60)
    store.save_pages(conn, [(lease, {"text": "t"}, False) for lease in (kept, cancelled)])
    queue_admin.cancel(conn, str(cancelled.id))  # clears the lease (and the work row)
    conn.execute(  # a work row left behind under the old token must not be written either
        "INSERT INTO blogqa.work_items (queue_id, lease_token, page) VALUES (%s, %s, '{}')",
        (cancelled.id, cancelled.token),
    )
    call = ModelCall("summarize", "openai", "gpt-4o-mini", 1000, 200, 800)
    result = {"summary": "s", "qa": []}
    progress = store.Progress(
        llm_results=[(kept, result), (cancelled, result)],
        usage=[store.whole_charge(kept, call), store.whole_charge(cancelled, call)],
    )

    assert store.save_progress(conn, progress) == [cancelled]

    assert _summarized(conn) == [kept.id]
    assert _charged(conn, "summarize") == [kept.id, cancelled.id]  # both calls were paid
    costs = conn.execute("SELECT cost_usd FROM blogqa.llm_usage").fetchall()
    assert costs == [(Decimal("0.000270"),)] * 2  # 1000 x 0.15 + 200 x 0.60 per million


# ---------------------------------------------------------------- embed


def test_an_embedding_request_charges_each_document_its_share(
    conn, page_server, openai_env, one_at_a_time
):
    settings = dataclasses.replace(one_at_a_time, embed_batch_size=2048)
    refs, documents = _crawled_and_summarized(conn, settings, page_server)
    before = openai_env.embedding_calls

    assert pipeline.embed_chunk(refs, settings) == refs

    assert openai_env.embedding_calls - before == 1  # all three documents in one request
    rows = conn.execute(
        "SELECT queue_id, url, prompt_tokens, completion_tokens, inputs, cost_usd, request_id"
        " FROM blogqa.llm_usage WHERE stage = 'embed' ORDER BY queue_id"
    ).fetchall()
    assert [row[0] for row in rows] == [queue_id for queue_id, _ in documents]
    assert [row[1] for row in rows] == _urls(page_server, 3)
    assert len({row[6] for row in rows}) == 1  # shares of one request
    assert [row[4] for row in rows] == [len(texts) for _, texts in documents]
    total = _words([text for _, texts in documents for text in texts])
    assert sum(row[2] for row in rows) == total  # the request's usage, exactly
    assert all(row[3] == 0 for row in rows)
    assert sum(row[5] for row in rows) == _micro_usd(total)
    for (_, texts), row in zip(documents, rows, strict=True):
        # shares follow the documents' tokens (estimated with the model's tokenizer, so
        # close to, not exactly, the server's word count)
        assert row[2] == pytest.approx(_words(texts), rel=0.25)
        assert row[5] > 0


def test_documents_spread_over_requests_are_charged_per_request(
    conn, page_server, openai_env, one_at_a_time
):
    settings = dataclasses.replace(one_at_a_time, embed_batch_size=7)
    refs, documents = _crawled_and_summarized(conn, settings, page_server)
    texts = [text for _, doc_texts in documents for text in doc_texts]
    before = openai_env.embedding_calls

    assert pipeline.embed_chunk(refs, settings) == refs

    requests = [texts[i : i + 7] for i in range(0, len(texts), 7)]
    assert openai_env.embedding_calls - before == len(requests)
    per_request = conn.execute(
        "SELECT sum(inputs), sum(prompt_tokens), count(*) FROM blogqa.llm_usage"
        " WHERE stage = 'embed' GROUP BY request_id"
    ).fetchall()
    expected = [(len(batch), _words(batch)) for batch in requests]
    assert sorted((int(n), int(t)) for n, t, _ in per_request) == sorted(expected)
    assert any(rows > 1 for _, _, rows in per_request)  # some requests served two documents
    per_document = dict(
        conn.execute(
            "SELECT queue_id, sum(inputs) FROM blogqa.llm_usage WHERE stage = 'embed'"
            " GROUP BY queue_id"
        ).fetchall()
    )
    assert per_document == {queue_id: len(doc_texts) for queue_id, doc_texts in documents}


def test_embed_failing_half_way_keeps_finished_documents_and_its_retry_embeds_the_rest(
    conn, page_server, openai_env, one_at_a_time
):
    refs, documents = _crawled_and_summarized(conn, one_at_a_time, page_server)
    first = len(documents[0][1])
    # The first request carries exactly the first document; the second one fails the stage.
    settings = dataclasses.replace(one_at_a_time, embed_batch_size=first)
    openai_env.embedding_script.extend(["ok", "garbage"])
    before = openai_env.embedding_calls

    with pytest.raises(json.JSONDecodeError):
        pipeline.embed_chunk(refs, settings)

    # the second request failed the stage; a third, if it started meanwhile, was cancelled
    assert openai_env.embedding_calls - before >= 2
    assert _embedded(conn) == [documents[0][0]]
    assert _charged(conn, "embed") == [documents[0][0]]

    before = openai_env.embedding_calls
    assert pipeline.embed_chunk(refs, settings) == refs
    rest = sum(len(texts) for _, texts in documents[1:])
    assert openai_env.embedding_calls - before == math.ceil(rest / first)
    assert _embedded(conn) == [queue_id for queue_id, _ in documents]
    leases = queue.renew(conn, refs, settings.lease_seconds)
    for item, (_, texts) in zip(store.work_items(conn, leases, settings.embed_dim), documents):
        store.check_complete(item)
        assert item.vectors.shape[0] == len(texts)
    assert pipeline.load_chunk(refs, settings) == [ref["id"] for ref in refs]


def test_a_load_batch_past_the_timeout_keeps_what_loaded_before_it_and_the_paid_results(
    conn, page_server, openai_env, one_at_a_time
):
    refs, documents = _crawled_and_summarized(conn, one_at_a_time, page_server)
    refs = pipeline.embed_chunk(refs, one_at_a_time)
    ids = [queue_id for queue_id, _ in documents]
    # one document per transaction on one connection; the second one's work item is locked by
    # another transaction, so its batch waits (deleting it) past the load's statement timeout
    settings = dataclasses.replace(
        one_at_a_time, load_batch=1, load_parallelism=1, load_timeout=1.0
    )
    with db.connect(settings) as holder, holder.transaction():
        holder.execute("SELECT 1 FROM blogqa.work_items WHERE queue_id = %s FOR UPDATE", (ids[1],))
        result = pipeline.load_chunk_counted(refs, settings)

    assert result["loaded"] == ids[:1]
    assert result["tables"]["documents"]["rows"] == 1
    rows = dict(
        conn.execute(
            "SELECT id, (status, last_stage, last_error) FROM blogqa.url_queue WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
    )
    assert rows[ids[0]][0] == "done"
    assert rows[ids[1]][:2] == ("queued", "load")
    assert rows[ids[1]][2].startswith("load timed out")
    assert rows[ids[2]] == (
        "queued",
        "load",
        "load not attempted: an earlier batch of this chunk's load timed out",
    )
    loaded = conn.execute("SELECT url FROM blogqa.documents ORDER BY url").fetchall()
    assert len(loaded) == 1
    # the two pages back in the queue keep their summaries and vectors for the retry
    assert _summarized(conn) == ids[1:]
    assert _embedded(conn) == ids[1:]


# ---------------------------------------------------------------- the arithmetic of shares


@pytest.mark.parametrize(
    ("total", "weights", "parts"),
    [
        (10, [1, 1, 1], [4, 3, 3]),  # the unit left over goes to the earliest on a tie
        (100, [1, 2, 3], [17, 33, 50]),
        (7, [0, 0], [4, 3]),  # no weight: equal parts
        (0, [5, 1], [0, 0]),
        (3, [1000, 1, 1], [3, 0, 0]),
        (5, [], []),
    ],
)
def test_apportion_parts_add_up(total, weights, parts):
    assert store.apportion(total, weights) == parts
    assert sum(parts) == total or not weights


def test_apportion_always_adds_up():
    import random

    rng = random.Random(11)
    for _ in range(2000):
        weights = [rng.randrange(0, 500) for _ in range(rng.randrange(1, 9))]
        total = rng.randrange(0, 100_000)
        parts = store.apportion(total, weights)
        assert sum(parts) == total
        exact = [total * w / (sum(weights) or 1) for w in weights]
        if sum(weights):
            assert all(abs(p - e) < 1 for p, e in zip(parts, exact, strict=True))


def test_split_charges_add_up_to_the_request_in_integers_and_micro_dollars():
    leases = [
        queue.Lease(i, f"https://example.com/{i}", f"00000000-0000-0000-0000-00000000000{i}", 1)
        for i in range(1, 4)
    ]
    call = ModelCall("embed", "openai", "text-embedding-3-small", 1001, 0, 120, inputs=9)
    charges = store.split_charges(
        call, [(leases[0], 3, 10), (leases[1], 3, 10), (leases[2], 3, 10)]
    )

    assert [c.prompt_tokens for c in charges] == [334, 334, 333]
    assert [c.inputs for c in charges] == [3, 3, 3]
    # 1001 tokens x $0.02 per million: 20.02 micro-dollars, 20 at the ledger's precision
    assert [c.cost_usd for c in charges] == [Decimal("0.000007")] * 2 + [Decimal("0.000006")]
    assert sum(c.cost_usd for c in charges) == Decimal("0.000020")
    assert len({c.request_id for c in charges}) == 1
    assert {c.call.latency_ms for c in charges} == {120}  # the request's, on every share

    [whole] = store.split_charges(call, [(leases[0], 9, 1)])
    assert (whole.prompt_tokens, whole.inputs, whole.cost_usd) == (1001, 9, Decimal("0.000020"))
    unknown = dataclasses.replace(call, model="some-local-model")
    shares = store.split_charges(unknown, [(leases[0], 4, 1), (leases[1], 5, 1)])
    assert [c.cost_usd for c in shares] == [None, None]  # no price known: no cost
