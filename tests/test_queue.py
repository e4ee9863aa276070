"""Tests of the URL queue (blogqa.queue) against the embedded PostgreSQL."""

from __future__ import annotations

import itertools
import random
import threading

import psycopg
import pytest

import blogqa.db
from blogqa import queue, queue_stats, retry
from blogqa.errors import PageError
from blogqa.urls import MAX_URL_LENGTH, InvalidURLError, normalize_url
from tests.conftest import queue_row

# ---------------------------------------------------------------- helpers


_row = queue_row


def _count(conn) -> int:
    return conn.execute("SELECT count(*) FROM blogqa.url_queue").fetchone()[0]


def _claim(conn, limit: int = 10, owner: str = "test-worker", lease_seconds: int = 60):
    return queue.claim(conn, limit, owner=owner, lease_seconds=lease_seconds)


def _expire(conn, row_id: int) -> None:
    conn.execute(
        "UPDATE blogqa.url_queue SET lease_until = now() - interval '1 second' WHERE id = %s",
        (row_id,),
    )


def _transient(message: str = "HTTP 503", retry_after: float | None = None) -> PageError:
    return PageError(message, stage="crawl", permanent=False, retry_after=retry_after)


# ---------------------------------------------------------------- normalize_url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://Example.COM/Path", "http://example.com/Path"),
        ("https://BLOG.example.org/a/B?x=1", "https://blog.example.org/a/B?x=1"),
        ("http://example.com:80/a", "http://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("http://example.com:443/a", "http://example.com:443/a"),
        ("https://example.com:80/a", "https://example.com:80/a"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),
        ("http://example.com/a#section-2", "http://example.com/a"),
        ("http://example.com/a?x=1#top", "http://example.com/a?x=1"),
        (
            "http://example.com/p?utm_source=news&b=2&fbclid=abc&a=1&gclid=x&utm_medium=mail",
            "http://example.com/p?b=2&a=1",
        ),
        ("http://example.com/p?UTM_Campaign=x&z=9&y=8", "http://example.com/p?z=9&y=8"),
        ("http://example.com/p?utm_source=only", "http://example.com/p"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com?q=1", "http://example.com/?q=1"),
        ("http://Bücher.example/seite", "http://xn--bcher-kva.example/seite"),
        ("https://münchen.de:443/", "https://xn--mnchen-3ya.de/"),
        ("  http://example.com/trimmed  ", "http://example.com/trimmed"),
        ("http://example.com./a", "http://example.com/a"),
        ("http://[::1]:8080/a", "http://[::1]:8080/a"),
    ],
)
def test_normalize_url(raw: str, expected: str) -> None:
    assert normalize_url(raw) == expected


def test_normalize_url_is_idempotent() -> None:
    once = normalize_url("HTTPS://Bücher.Example:443/a?utm_id=1&k=v#frag")
    assert normalize_url(once) == once == "https://xn--bcher-kva.example/a?k=v"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("ftp://example.com/file", "scheme 'ftp' is not supported"),
        ("mailto:someone@example.com", "scheme 'mailto' is not supported"),
        ("notaurl", "scheme 'none' is not supported"),
        ("not a url", "whitespace"),
        ("", "empty URL"),
        ("   ", "empty URL"),
        ("http://example.com/a b", "whitespace"),
        ("http://example.com/a\tb", "whitespace"),
        ("http://user:secret@example.com/", "credentials"),
        ("http://user@example.com/", "credentials"),
        ("http://example.com/" + "a" * 2100, "longer than 2048"),
        ("http:///no-host", "no host"),
        ("http://example.com:99999/", "malformed URL"),
    ],
)
def test_normalize_url_rejects(raw: str, reason: str) -> None:
    with pytest.raises(InvalidURLError, match=reason):
        normalize_url(raw)


def test_normalize_url_length_limit_is_inclusive() -> None:
    prefix = "http://example.com/"
    at_limit = prefix + "a" * (MAX_URL_LENGTH - len(prefix))
    assert normalize_url(at_limit) == at_limit
    with pytest.raises(InvalidURLError):
        normalize_url(at_limit + "a")


def test_normalize_url_keeps_non_utf8_query_values_distinct() -> None:
    assert normalize_url("http://example.com/?q=%E9") != normalize_url("http://example.com/?q=%E8")


@pytest.mark.parametrize(
    ("spellings", "expected"),
    [
        (
            ["http://example.com/a/../b", "http://example.com/a/./../b", "http://example.com/b"],
            "http://example.com/b",
        ),
        (["http://example.com/../../b/./c/"], "http://example.com/b/c/"),
        (["http://example.com/%7Euser/", "http://example.com/~user/"], "http://example.com/~user/"),
        (
            ["http://example.com/%7euser/", "http://Example.com/a/../%7Euser/"],
            "http://example.com/~user/",
        ),
    ],
)
def test_normalize_url_resolves_dot_segments_and_unreserved_escapes(
    spellings: list[str], expected: str
) -> None:
    """One page, one queue key: `/a/../b` is `/b` and `%7E` is `~` (RFC 3986 6.2.2)."""
    for raw in spellings:
        assert normalize_url(raw) == expected, raw
    assert normalize_url(expected) == expected


def test_normalize_url_leaves_the_query_order_and_bytes_alone() -> None:
    """Only the path is canonicalized: the query keeps its order and escapes (tracking
    parameters aside), and reserved escapes in the path stay escaped."""
    url = "http://example.com/a%2Fb/?z=%7E&a=1&utm_source=x&m=%e9"
    assert normalize_url(url) == "http://example.com/a%2Fb/?z=%7E&a=1&m=%e9"


# ---------------------------------------------------------------- enqueue


def test_enqueue_deduplicates_within_a_batch_and_against_the_table(conn) -> None:
    result = queue.enqueue(
        conn,
        [
            "http://example.com/a",
            "HTTP://EXAMPLE.com:80/a#frag",
            "http://example.com/a?utm_source=x",
            "http://example.com/b",
        ],
    )
    assert sorted(result.new) == ["http://example.com/a", "http://example.com/b"]
    assert _count(conn) == 2

    again = queue.enqueue(conn, ["http://example.com/a", "http://example.com/c"])
    assert again.new == ["http://example.com/c"]
    assert again.already_queued == ["http://example.com/a"]
    assert again.as_dict()["already_queued"] == 1
    assert _count(conn) == 3


def test_enqueue_sets_priority_and_max_attempts(conn) -> None:
    queue.enqueue(conn, ["http://example.com/p"], priority=7, max_attempts=3)
    row = _row(conn, "http://example.com/p")
    assert (row["status"], row["priority"], row["max_attempts"], row["attempts"]) == (
        "queued",
        7,
        3,
        0,
    )


def test_enqueue_done_row_needs_force(conn) -> None:
    url = "http://example.com/done"
    queue.enqueue(conn, [url])
    [lease] = _claim(conn)
    assert queue.complete(conn, lease) is True
    assert _row(conn, url)["status"] == "done"

    result = queue.enqueue(conn, [url])
    assert result.already_done == [url]
    assert result.new == result.requeued == []
    assert result.as_dict()["already_done"] == 1
    assert _row(conn, url)["status"] == "done"

    forced = queue.enqueue(conn, [url], force=True, priority=3)
    assert forced.requeued == [url]
    assert forced.already_done == []
    row = _row(conn, url)
    assert (row["status"], row["attempts"], row["priority"]) == ("queued", 0, 3)
    assert row["lease_token"] is None and row["finished_at"] is None
    assert _count(conn) == 1


def test_enqueue_force_leaves_active_rows_alone(conn) -> None:
    queue.enqueue(conn, ["http://example.com/q", "http://example.com/r"])
    [first] = _claim(conn, 1)
    result = queue.enqueue(conn, ["http://example.com/q", "http://example.com/r"], force=True)
    assert result.requeued == []
    assert sorted(result.already_queued) == ["http://example.com/q", "http://example.com/r"]
    row = _row(conn, first.url)
    assert row["status"] == "processing" and str(row["lease_token"]) == first.token


def test_enqueue_rejects_bad_urls_and_keeps_the_rest(conn) -> None:
    result = queue.enqueue(
        conn,
        ["http://example.com/ok", "ftp://example.com/x", "", "http://u:p@example.com/"],
    )
    assert result.new == ["http://example.com/ok"]
    reasons = dict(result.rejected)
    assert set(reasons) == {"ftp://example.com/x", "", "http://u:p@example.com/"}
    assert "ftp" in reasons["ftp://example.com/x"]
    assert "empty" in reasons[""]
    assert "credentials" in reasons["http://u:p@example.com/"]
    assert [r["url"] for r in result.as_dict()["rejected"]] == [
        "ftp://example.com/x",
        "",
        "http://u:p@example.com/",
    ]
    assert _count(conn) == 1


def test_enqueue_only_rejected_urls_writes_nothing(conn) -> None:
    result = queue.enqueue(conn, ["mailto:a@example.com"])
    assert result.new == [] and len(result.rejected) == 1
    assert _count(conn) == 0


# ---------------------------------------------------------------- claim


def test_claim_takes_higher_priority_first_then_oldest(conn) -> None:
    queue.enqueue(conn, ["http://example.com/low"], priority=0)
    queue.enqueue(conn, ["http://example.com/new", "http://example.com/old"], priority=5)
    queue.enqueue(conn, ["http://example.com/top"], priority=9)
    # "old" was enqueued after "new" (higher id) but has been due for longer.
    conn.execute(
        "UPDATE blogqa.url_queue SET run_after = now() - interval '1 hour' WHERE url = %s",
        ("http://example.com/old",),
    )
    conn.execute(
        "UPDATE blogqa.url_queue SET run_after = now() - interval '1 minute' WHERE url = %s",
        ("http://example.com/new",),
    )
    order = []
    while leases := _claim(conn, 1):
        order.append(leases[0].url.rsplit("/", 1)[1])
    assert order == ["top", "old", "new", "low"]


def test_claim_limit_takes_the_best_rows(conn) -> None:
    queue.enqueue(conn, ["http://example.com/a", "http://example.com/b"], priority=1)
    queue.enqueue(conn, ["http://example.com/c"], priority=2)
    leases = _claim(conn, 2)
    assert [lease.url for lease in leases] == ["http://example.com/c", "http://example.com/a"]
    assert all(lease.attempts == 1 for lease in leases)
    assert len({lease.token for lease in leases}) == 2


def test_claim_skips_rows_not_yet_due(conn) -> None:
    queue.enqueue(conn, ["http://example.com/later", "http://example.com/now"])
    conn.execute(
        "UPDATE blogqa.url_queue SET run_after = now() + interval '1 hour' WHERE url = %s",
        ("http://example.com/later",),
    )
    leases = _claim(conn, 10)
    assert [lease.url for lease in leases] == ["http://example.com/now"]
    assert _claim(conn, 10) == []
    assert _row(conn, "http://example.com/later")["status"] == "queued"


def test_claim_sets_lease_fields(conn) -> None:
    queue.enqueue(conn, ["http://example.com/x"])
    [lease] = _claim(conn, owner="worker-7", lease_seconds=120)
    row = conn.execute(
        "SELECT status, lease_owner, lease_token,"
        " lease_until - now() BETWEEN interval '119 seconds' AND interval '121 seconds'"
        " FROM blogqa.url_queue WHERE id = %s",
        (lease.id,),
    ).fetchone()
    assert row[0] == "processing"
    assert row[1] == "worker-7"
    assert str(row[2]) == lease.token
    assert row[3] is True
    assert lease.ref() == {"id": lease.id, "token": lease.token}


def test_concurrent_claimers_never_share_a_row(conn, settings) -> None:
    urls = [f"http://example.com/page/{i}" for i in range(2000)]
    result = queue.enqueue(conn, urls)
    assert len(result.new) == 2000
    all_ids = {r[0] for r in conn.execute("SELECT id FROM blogqa.url_queue")}

    dsn = blogqa.db.database_dsn(settings)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(name: str) -> None:
        got: list[int] = []
        claimed[name] = got
        try:
            with psycopg.connect(dsn, autocommit=True) as own:
                start.wait()
                while leases := queue.claim(own, 25, owner=name, lease_seconds=60):
                    got.extend(lease.id for lease in leases)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)

    every = [row_id for ids in claimed.values() for row_id in ids]
    assert len(every) == len(set(every)), "a row was claimed twice"
    assert set(every) == all_ids
    assert sum(1 for ids in claimed.values() if ids) >= 2, "the claimers did not overlap"
    owners = dict(conn.execute("SELECT lease_owner, count(*) FROM blogqa.url_queue GROUP BY 1"))
    assert owners == {name: len(ids) for name, ids in claimed.items() if ids}
    assert queue_stats.stats(conn)["counts"]["processing"] == 2000


# ---------------------------------------------------------------- leases


def test_expired_lease_is_reclaimed_and_fenced(conn) -> None:
    url = "http://example.com/crashy"
    queue.enqueue(conn, [url])
    [old] = _claim(conn, owner="crashed-worker")
    assert old.attempts == 1
    assert queue.renew(conn, [old.ref()], 60) == [old]  # a stage started work on it
    _expire(conn, old.id)

    [new] = _claim(conn, owner="rescuer")
    assert (new.id, new.url, new.attempts) == (old.id, url, 2)
    assert new.token != old.token
    row = _row(conn, url)
    assert row["status"] == "processing"
    [entry] = row["error_history"]
    assert entry["stage"] == "lease"
    assert entry["class"] == "transient"
    assert entry["attempt"] == 1
    assert "crashed-worker" in entry["message"]
    assert row["last_stage"] == "lease"

    assert queue.complete(conn, old) is False
    assert _row(conn, url)["status"] == "processing"
    assert queue.fail(conn, old, _transient(), max_attempts=5, base=1) is None
    assert queue.renew(conn, [old.ref()], 60) == []
    assert queue.complete(conn, new) is True
    assert _row(conn, url)["status"] == "done"
    assert queue.complete(conn, new) is False


def test_unexpired_lease_is_not_reclaimed(conn) -> None:
    queue.enqueue(conn, ["http://example.com/busy"])
    assert queue_stats.has_claimable(conn) is True  # a due queued row
    [lease] = _claim(conn)
    assert _claim(conn) == []
    assert queue_stats.has_claimable(conn) is False
    _expire(conn, lease.id)
    assert queue_stats.has_claimable(conn) is True


def test_expired_lease_with_attempts_spent_goes_dead(conn) -> None:
    url = "http://example.com/doomed"
    queue.enqueue(conn, [url], max_attempts=2)
    [first] = _claim(conn)
    queue.renew(conn, [first.ref()], 60)  # work started: the lapse costs the attempt
    _expire(conn, first.id)
    [second] = _claim(conn)
    assert second.attempts == 2
    queue.renew(conn, [second.ref()], 60)
    _expire(conn, second.id)

    assert _claim(conn) == []
    row = _row(conn, url)
    assert row["status"] == "dead"
    assert row["finished_at"] is not None
    assert row["lease_token"] is None
    assert [e["stage"] for e in row["error_history"]] == ["lease", "lease"]
    assert queue.complete(conn, second) is False


def test_renew_extends_held_leases_and_drops_lost_ones(conn) -> None:
    queue.enqueue(conn, ["http://example.com/r1", "http://example.com/r2"])
    a, b = _claim(conn, 2, lease_seconds=30)
    _expire(conn, b.id)
    _claim(conn, 0)  # recovers b's expired lease (nothing claimed with limit 0)
    held = queue.renew(conn, [b.ref(), a.ref()], 600)
    assert held == [a]
    later = conn.execute(
        "SELECT lease_until > now() + interval '500 seconds' FROM blogqa.url_queue WHERE id = %s",
        (a.id,),
    ).fetchone()[0]
    assert later is True


# ---------------------------------------------------------------- fail


def test_fail_transient_requeues_later(conn) -> None:
    url = "http://example.com/flaky"
    queue.enqueue(conn, [url])
    [lease] = _claim(conn)
    status = queue.fail(conn, lease, _transient("HTTP 503 busy"), max_attempts=5, base=30)
    assert status == "queued"
    row = _row(conn, url)
    assert row["status"] == "queued"
    assert row["later"] is True
    assert row["last_error"] == "HTTP 503 busy"
    assert row["last_stage"] == "crawl"
    assert row["lease_token"] is None and row["finished_at"] is None
    assert row["error_history"][-1]["class"] == "transient"
    assert row["error_history"][-1]["message"] == "HTTP 503 busy"
    assert _claim(conn) == []  # not due yet


def test_fail_transient_honours_retry_after(conn) -> None:
    url = "http://example.com/ratelimited"
    queue.enqueue(conn, [url])
    [lease] = _claim(conn)
    queue.fail(conn, lease, _transient("429", retry_after=3600), max_attempts=5, base=0)
    wait = conn.execute(
        "SELECT extract(epoch FROM run_after - now()) FROM blogqa.url_queue WHERE url = %s",
        (url,),
    ).fetchone()[0]
    assert 3500 < wait <= 3600


@pytest.mark.parametrize(("terminal", "expected"), [("dead", "dead"), ("skipped", "skipped")])
def test_fail_permanent_is_terminal(conn, terminal: str, expected: str) -> None:
    url = "http://example.com/gone"
    queue.enqueue(conn, [url])
    [lease] = _claim(conn)
    error = PageError("HTTP 404", stage="crawl", permanent=True, terminal_status=terminal)
    assert queue.fail(conn, lease, error, max_attempts=5, base=30) == expected
    row = _row(conn, url)
    assert row["status"] == expected
    assert row["finished_at"] is not None
    assert row["error_history"][-1]["class"] == "permanent"
    assert _claim(conn) == []


def test_fail_transient_with_attempts_exhausted_goes_dead(conn) -> None:
    url = "http://example.com/tired"
    queue.enqueue(conn, [url], max_attempts=2)
    [lease] = _claim(conn)
    assert queue.fail(conn, lease, _transient(), max_attempts=5, base=0) == "queued"
    [lease] = _claim(conn)
    assert lease.attempts == 2
    assert queue.fail(conn, lease, _transient(), max_attempts=5, base=0) == "dead"
    assert _row(conn, url)["status"] == "dead"


def test_fail_uses_the_smaller_max_attempts(conn) -> None:
    url = "http://example.com/strict"
    queue.enqueue(conn, [url], max_attempts=10)
    [lease] = _claim(conn)
    assert queue.fail(conn, lease, _transient(), max_attempts=1, base=0) == "dead"


def test_error_history_is_bounded(conn) -> None:
    url = "http://example.com/hopeless"
    queue.enqueue(conn, [url], max_attempts=100)
    rounds = queue.ERROR_HISTORY_LIMIT + 7
    for attempt in range(1, rounds + 1):
        [lease] = _claim(conn)
        assert lease.attempts == attempt
        error = _transient(f"failure {attempt}")
        assert queue.fail(conn, lease, error, max_attempts=100, base=0) == "queued"
    history = _row(conn, url)["error_history"]
    assert len(history) == queue.ERROR_HISTORY_LIMIT
    first_kept = rounds - queue.ERROR_HISTORY_LIMIT + 1
    assert [e["attempt"] for e in history] == list(range(first_kept, rounds + 1))
    assert history[-1]["message"] == f"failure {rounds}"
    assert all("at" in e for e in history)


# ---------------------------------------------------------------- backoff


def test_backoff_grows_exponentially() -> None:
    delays = [retry.backoff_seconds(n, 10, rng=random.Random(7)) for n in range(1, 8)]
    for earlier, later in itertools.pairwise(delays):
        assert later == pytest.approx(2 * earlier)
    assert 5 <= delays[0] < 15


def test_backoff_jitter_stays_in_range() -> None:
    rng = random.Random(1234)
    samples = [retry.backoff_seconds(3, 10, rng=rng) for _ in range(500)]
    assert all(20 <= s < 60 for s in samples)
    assert len(set(samples)) > 400
    attempt_zero = retry.backoff_seconds(0, 10, rng=random.Random(7))
    assert attempt_zero == retry.backoff_seconds(1, 10, rng=random.Random(7))


def test_backoff_never_below_retry_after() -> None:
    assert retry.backoff_seconds(1, 1, retry_after=500, rng=random.Random(3)) == 500
    assert retry.backoff_seconds(1, 0, retry_after=7) == 7
    big = retry.backoff_seconds(6, 100, retry_after=1, rng=random.Random(3))
    assert big > 1000


def test_backoff_is_capped() -> None:
    for seed in range(20):
        assert retry.backoff_seconds(40, 30, rng=random.Random(seed)) == (retry.MAX_BACKOFF_SECONDS)
    assert retry.backoff_seconds(2, 30, rng=random.Random(0)) < retry.MAX_BACKOFF_SECONDS


# ---------------------------------------------------------------- stats


def test_stats_on_empty_queue(conn) -> None:
    result = queue_stats.stats(conn)
    assert result["counts"] == dict.fromkeys(queue.STATUSES, 0)
    assert result["total"] == 0
    assert result["oldest_queued_age_seconds"] is None
    assert result["claimable"] == 0


def test_stats_counts_and_oldest_age(conn) -> None:
    queue.enqueue(conn, [f"http://example.com/s{i}" for i in range(6)])
    conn.execute(
        "UPDATE blogqa.url_queue SET enqueued_at = now() - interval '1 hour' WHERE url = %s",
        ("http://example.com/s5",),
    )
    done, dead, busy = _claim(conn, 3)
    queue.complete(conn, done)
    queue.fail(conn, dead, PageError("x", stage="crawl", permanent=True), max_attempts=5, base=0)
    conn.execute(
        "UPDATE blogqa.url_queue SET run_after = now() + interval '1 hour' WHERE url = %s",
        ("http://example.com/s4",),
    )
    result = queue_stats.stats(conn)
    assert result["counts"] == {
        "queued": 3,
        "processing": 1,
        "done": 1,
        "dead": 1,
        "skipped": 0,
        "cancelled": 0,
        "quarantined": 0,
    }
    assert result["total"] == 6
    assert result["claimable"] == 2
    assert 3600 <= result["oldest_queued_age_seconds"] < 3600 + 600
    assert _row(conn, busy.url)["status"] == "processing"


def test_requeue_stale_refreshes_the_oldest_done_rows_only(conn):
    import datetime as dt

    urls = [f"https://example.com/{name}" for name in ("old", "older", "fresh", "waiting")]
    queue.enqueue(conn, urls)
    ages = {"old": "40 days", "older": "90 days", "fresh": "1 day"}
    for name, age in ages.items():
        conn.execute(
            "UPDATE blogqa.url_queue SET status = 'done', attempts = 2,"
            " finished_at = now() - %s::interval WHERE url = %s",
            (age, f"https://example.com/{name}"),
        )
    month = dt.timedelta(days=30)

    assert queue.requeue_stale(conn, older_than=month, limit=1) == 1
    assert queue.requeue_stale(conn, older_than=month, limit=10) == 1
    assert queue.requeue_stale(conn, older_than=month, limit=10) == 0

    rows = {
        u: (s, a) for u, s, a in conn.execute("SELECT url, status, attempts FROM blogqa.url_queue")
    }
    assert rows == {
        "https://example.com/old": ("queued", 0),
        "https://example.com/older": ("queued", 0),
        "https://example.com/fresh": ("done", 2),
        "https://example.com/waiting": ("queued", 0),
    }
