"""Operator actions on the queue: cancel, redrive of dead rows, the error report (issue 4),
through blogqa.queue_admin and the `blogqa` command, against the embedded PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from blogqa import crawl, embed, llm, pipeline, queue, queue_admin, store
from blogqa.errors import PageError
from blogqa.urls import InvalidURLError
from tests.conftest import queue_row, table_counts
from tests.test_cli import run_cli

# ---------------------------------------------------------------- helpers


_row = queue_row


def _claim(conn, limit: int = 10):
    return queue.claim(conn, limit, owner="test-worker", lease_seconds=60)


def _kill(conn, url: str, stage: str = "crawl", message: str = "HTTP 404") -> None:
    """Enqueue `url`, claim it alone and fail it permanently at `stage`: a dead row."""
    queue.enqueue(conn, [url])
    conn.execute(
        "UPDATE blogqa.url_queue SET run_after = now() + interval '1 day'"
        " WHERE status = 'queued' AND url <> %s",
        (url,),
    )
    [lease] = _claim(conn, 1)
    assert lease.url == url
    error = PageError(message, stage=stage, permanent=True)
    assert queue.fail(conn, lease, error, max_attempts=5, base=0) == "dead"
    conn.execute(
        "UPDATE blogqa.url_queue SET run_after = now() WHERE status = 'queued' AND url <> %s",
        (url,),
    )


def _age_finished(conn, url: str, hours: int) -> None:
    conn.execute(
        "UPDATE blogqa.url_queue SET finished_at = now() - make_interval(hours => %s)"
        " WHERE url = %s",
        (hours, url),
    )


# ---------------------------------------------------------------- cancel


def test_cancel_queued_row_by_unnormalized_url_is_never_claimed(conn) -> None:
    queue.enqueue(conn, ["https://example.com/post?utm_source=x", "https://example.com/other"])
    result = queue_admin.cancel(conn, "  HTTPS://Example.COM:443/post#comments  ")

    assert result.cancelled is True
    assert (result.url, result.previous_status) == ("https://example.com/post", "queued")
    assert result.discarded_work is False
    row = _row(conn, "https://example.com/post")
    assert row["status"] == "cancelled"
    assert row["finished_at"] is not None
    assert (row["last_error"], row["last_stage"]) == ("cancelled by operator", "cancel")
    [entry] = row["error_history"]
    assert (entry["stage"], entry["class"], entry["attempt"]) == ("cancel", "operator", 0)
    assert entry["message"] == "cancelled by operator (was queued)"
    assert "at" in entry

    assert [lease.url for lease in _claim(conn)] == ["https://example.com/other"]
    assert _claim(conn) == []
    assert _row(conn, "https://example.com/post")["status"] == "cancelled"


def test_cancel_by_id(conn) -> None:
    queue.enqueue(conn, ["https://example.com/a", "https://example.com/b"])
    target = _row(conn, "https://example.com/b")["id"]
    result = queue_admin.cancel(conn, f" {target} ")
    assert (result.id, result.url, result.cancelled) == (target, "https://example.com/b", True)
    statuses = dict(conn.execute("SELECT url, status FROM blogqa.url_queue").fetchall())
    assert statuses == {"https://example.com/a": "queued", "https://example.com/b": "cancelled"}


def test_cancel_claimed_row_fences_out_the_worker(conn) -> None:
    url = "https://example.com/in-flight"
    queue.enqueue(conn, [url])
    [lease] = _claim(conn)
    conn.execute(
        "INSERT INTO blogqa.work_items (queue_id, lease_token, page) VALUES (%s, %s, '{}')",
        (lease.id, lease.token),
    )

    result = queue_admin.cancel(conn, url)
    assert (result.cancelled, result.previous_status, result.discarded_work) == (
        True,
        "processing",
        True,
    )
    row = _row(conn, url)
    assert row["status"] == "cancelled"
    assert row["lease_owner"] is row["lease_token"] is row["lease_until"] is None
    assert "lease owner test-worker" in row["error_history"][-1]["message"]
    assert row["error_history"][-1]["attempt"] == 1
    assert table_counts(conn)["work_items"] == 0

    # The worker carries on with its old lease: every write is fenced out.
    assert queue.renew(conn, [lease.ref()], 60) == []
    assert queue.complete(conn, lease) is False
    error = PageError("HTTP 503", stage="crawl", permanent=False)
    assert queue.fail(conn, lease, error, max_attempts=5, base=0) is None
    after = _row(conn, url)
    assert after["status"] == "cancelled"
    assert after["last_error"] == "cancelled by operator"
    assert len(after["error_history"]) == 1
    assert _claim(conn) == []


def test_cancel_during_a_real_run_discards_its_result(conn, settings, page_server) -> None:
    url = f"{page_server.base_url}/articles/07-raised-bed-soil.html"
    queue.enqueue(conn, [url])
    [chunk] = pipeline.claim_chunks(10, 5, settings)
    refs = pipeline.embed_chunk(
        pipeline.summarize_chunk(pipeline.crawl_chunk(chunk, settings), settings), settings
    )
    assert [ref["id"] for ref in refs] == [chunk[0]["id"]]
    # Everything but the load is done: the work item is complete, ready to load.
    leases = queue.renew(conn, refs, 60)
    [item] = store.work_items(conn, leases, settings.embed_dim)
    assert item.page and item.llm_result and item.vectors is not None

    result = queue_admin.cancel(conn, url)
    assert result.cancelled and result.discarded_work

    assert pipeline.load_chunk(refs, settings) == []
    # Even a worker that renewed just before the cancel cannot load what it holds.
    loaded, lost = store.load_documents(
        conn, [item], embed_model=settings.embed_model, fetched_at=dt.datetime.now(dt.UTC)
    )
    assert (loaded, lost) == ([], [item])
    counts = table_counts(conn)
    assert counts["documents"] == counts["summaries"] == counts["chunks"] == 0
    assert counts["work_items"] == 0
    assert _row(conn, url)["status"] == "cancelled"
    assert pipeline.finalize([chunk], settings) == {"claimed": 1, "cancelled": 1}


def test_cancel_before_the_crawl_stage_fetches_nothing(conn, settings, page_server) -> None:
    url = f"{page_server.base_url}/articles/08-tomato-variety-trial.html"
    queue.enqueue(conn, [url])
    [chunk] = pipeline.claim_chunks(10, 5, settings)
    hits_before = sum(page_server.hits.values())
    queue_admin.cancel(conn, str(chunk[0]["id"]))
    assert pipeline.crawl_chunk(chunk, settings) == []
    assert sum(page_server.hits.values()) == hits_before
    assert table_counts(conn)["work_items"] == 0
    assert _row(conn, url)["status"] == "cancelled"


@pytest.mark.parametrize("terminal", ["done", "dead", "skipped", "cancelled"])
def test_cancel_finished_row_cancels_nothing(conn, terminal: str) -> None:
    url = "https://example.com/finished"
    queue.enqueue(conn, [url])
    conn.execute(
        "UPDATE blogqa.url_queue SET status = %s, last_error = NULL WHERE url = %s",
        (terminal, url),
    )
    result = queue_admin.cancel(conn, url)
    assert (result.cancelled, result.previous_status, result.discarded_work) == (
        False,
        terminal,
        False,
    )
    assert result.reason == f"already {terminal}: only queued or processing rows can be cancelled"
    row = _row(conn, url)
    assert row["status"] == terminal
    assert row["error_history"] == [] and row["last_error"] is None


def test_cancel_unknown_target_raises(conn) -> None:
    queue.enqueue(conn, ["https://example.com/known"])
    with pytest.raises(queue_admin.QueueRowNotFoundError, match="no queue row matches '999'"):
        queue_admin.cancel(conn, "999")
    with pytest.raises(queue_admin.QueueRowNotFoundError, match="give a queue id or a URL"):
        queue_admin.cancel(conn, "https://example.com/unknown")
    with pytest.raises(InvalidURLError, match="neither a queue id nor a valid URL"):
        queue_admin.cancel(conn, "ftp://example.com/known")
    assert _row(conn, "https://example.com/known")["status"] == "queued"


# ---------------------------------------------------------------- requeue_dead


def test_requeue_dead_resets_dead_rows_only(conn) -> None:
    _kill(conn, "https://example.com/dead-1")
    _kill(conn, "https://example.com/dead-2", stage="summarize", message="model refused")
    queue.enqueue(conn, ["https://example.com/waiting", "https://example.com/done"])
    conn.execute(
        "UPDATE blogqa.url_queue SET status = 'done' WHERE url = 'https://example.com/done'"
    )
    queue_admin.cancel(conn, "https://example.com/waiting")

    requeued = queue_admin.requeue_dead(conn)
    assert [url for _, url in requeued] == [
        "https://example.com/dead-1",
        "https://example.com/dead-2",
    ]
    assert [row_id for row_id, _ in requeued] == sorted(row_id for row_id, _ in requeued)
    row = _row(conn, "https://example.com/dead-2")
    assert (row["status"], row["attempts"]) == ("queued", 0)
    assert row["finished_at"] is None and row["lease_token"] is None
    assert row["last_error"] is None and row["last_stage"] is None
    assert [e["stage"] for e in row["error_history"]] == ["summarize", "redrive"]
    assert row["error_history"][0]["message"] == "model refused"
    assert row["error_history"][-1]["class"] == "operator"
    assert row["error_history"][-1]["attempt"] == 1
    assert _row(conn, "https://example.com/done")["status"] == "done"
    assert _row(conn, "https://example.com/waiting")["status"] == "cancelled"

    leases = _claim(conn)
    assert sorted(lease.url for lease in leases) == [
        "https://example.com/dead-1",
        "https://example.com/dead-2",
    ]
    assert all(lease.attempts == 1 for lease in leases)
    assert queue_admin.requeue_dead(conn) == []


def test_requeue_dead_drops_leftover_work_items(conn) -> None:
    _kill(conn, "https://example.com/dead")
    row_id = _row(conn, "https://example.com/dead")["id"]
    conn.execute(
        "INSERT INTO blogqa.work_items (queue_id, lease_token, page)"
        " VALUES (%s, gen_random_uuid(), '{}')",
        (row_id,),
    )
    assert queue_admin.requeue_dead(conn) == [(row_id, "https://example.com/dead")]
    assert table_counts(conn)["work_items"] == 0


def test_requeue_dead_filters_by_stage_and_since(conn) -> None:
    _kill(conn, "https://example.com/crawl-old", stage="crawl")
    _kill(conn, "https://example.com/crawl-new", stage="crawl")
    _kill(conn, "https://example.com/embed-old", stage="embed")
    _kill(conn, "https://example.com/embed-new", stage="embed")
    _age_finished(conn, "https://example.com/crawl-old", 48)
    _age_finished(conn, "https://example.com/embed-old", 48)
    day_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)

    assert queue_admin.requeue_dead(conn, stage="load") == []
    assert [u for _, u in queue_admin.requeue_dead(conn, stage="crawl", since=day_ago)] == [
        "https://example.com/crawl-new"
    ]
    assert [u for _, u in queue_admin.requeue_dead(conn, since=day_ago)] == [
        "https://example.com/embed-new"
    ]
    assert [u for _, u in queue_admin.requeue_dead(conn, stage="embed")] == [
        "https://example.com/embed-old"
    ]
    statuses = dict(conn.execute("SELECT url, status FROM blogqa.url_queue").fetchall())
    assert statuses == {
        "https://example.com/crawl-old": "dead",
        "https://example.com/crawl-new": "queued",
        "https://example.com/embed-old": "queued",
        "https://example.com/embed-new": "queued",
    }


def test_requeue_dead_rejects_bad_arguments(conn) -> None:
    with pytest.raises(ValueError, match="unknown stage 'fetch'"):
        queue_admin.requeue_dead(conn, stage="fetch")
    with pytest.raises(ValueError, match="timezone-aware"):
        queue_admin.requeue_dead(conn, since=dt.datetime(2025, 1, 1))


def test_failure_stages_match_the_stages_that_fail_rows() -> None:
    assert set(queue_admin.FAILURE_STAGES) == {crawl.STAGE, llm.STAGE, embed.STAGE, "load", "lease"}


def test_error_history_stays_bounded_across_cancels_and_redrives(conn) -> None:
    url = "https://example.com/yo-yo"
    queue.enqueue(conn, [url])
    rounds = queue.ERROR_HISTORY_LIMIT + 5
    for _ in range(rounds):
        assert queue_admin.cancel(conn, url).cancelled
        conn.execute("UPDATE blogqa.url_queue SET status = 'dead' WHERE url = %s", (url,))
        assert len(queue_admin.requeue_dead(conn)) == 1
    history = _row(conn, url)["error_history"]
    assert len(history) == queue.ERROR_HISTORY_LIMIT
    assert [e["stage"] for e in history[-2:]] == ["cancel", "redrive"]
    assert all(set(e) == {"attempt", "stage", "class", "message", "at"} for e in history)


# ---------------------------------------------------------------- recent_errors


def test_recent_errors_newest_first_with_reason(conn) -> None:
    _kill(conn, "https://example.com/dead", message="HTTP 410 gone")
    queue.enqueue(conn, ["https://example.com/retry", "https://example.com/fine"])
    conn.execute(
        "UPDATE blogqa.url_queue SET run_after = now() + interval '1 day'"
        " WHERE url = 'https://example.com/fine'"
    )
    [lease] = _claim(conn)
    transient = PageError("HTTP 503", stage="crawl", permanent=False)
    assert queue.fail(conn, lease, transient, max_attempts=5, base=3600) == "queued"
    queue_admin.cancel(conn, "https://example.com/fine")
    ages = {"https://example.com/dead": 3, "https://example.com/retry": 2}
    for url, minutes in ages.items():
        conn.execute(
            "UPDATE blogqa.url_queue SET updated_at = now() - make_interval(mins => %s)"
            " WHERE url = %s",
            (minutes, url),
        )

    errors = queue_admin.recent_errors(conn)
    assert [e["url"] for e in errors] == [
        "https://example.com/fine",
        "https://example.com/retry",
        "https://example.com/dead",
    ]
    fine, retry, dead = errors
    assert (fine["status"], fine["stage"], fine["last_error"]) == (
        "cancelled",
        "cancel",
        "cancelled by operator",
    )
    assert (retry["status"], retry["stage"], retry["last_error"]) == ("queued", "crawl", "HTTP 503")
    assert retry["run_after"] > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=20)
    assert (retry["attempts"], retry["max_attempts"]) == (1, 5)
    assert (dead["status"], dead["last_error"], dead["run_after"]) == (
        "dead",
        "HTTP 410 gone",
        None,
    )
    assert fine["updated_at"] > retry["updated_at"] > dead["updated_at"]
    assert [e["url"] for e in queue_admin.recent_errors(conn, limit=2)] == [
        "https://example.com/fine",
        "https://example.com/retry",
    ]


def test_recent_errors_skips_clean_rows_and_checks_limit(conn) -> None:
    queue.enqueue(conn, ["https://example.com/clean"])
    [lease] = _claim(conn)
    assert queue.complete(conn, lease)
    assert queue_admin.recent_errors(conn) == []
    for bad in (0, queue_admin.MAX_ERRORS_LIMIT + 1):
        with pytest.raises(ValueError, match="between 1 and 1000"):
            queue_admin.recent_errors(conn, bad)


# ---------------------------------------------------------------- the command line


def test_cli_cancel_by_url_and_id(conn) -> None:
    queue.enqueue(conn, ["https://example.com/one", "https://example.com/two"])
    result = run_cli("cancel", "https://EXAMPLE.com/one?utm_medium=mail")
    assert result.returncode == 0, result.stderr
    assert "cancelled queue id 1 (https://example.com/one), was queued" in result.stdout

    as_json = run_cli("cancel", "2", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        "id": 2,
        "url": "https://example.com/two",
        "previous_status": "queued",
        "cancelled": True,
        "discarded_work": False,
        "reason": "cancelled by operator",
    }

    again = run_cli("cancel", "2", "--json")
    assert again.returncode == 1
    payload = json.loads(again.stdout)
    assert payload["cancelled"] is False and payload["previous_status"] == "cancelled"

    text = run_cli("cancel", "1")
    assert text.returncode == 1
    assert "nothing cancelled: queue id 1 (https://example.com/one) is already cancelled" in (
        " ".join(text.stdout.split())
    )


def test_cli_cancel_unknown_or_invalid_target(conn) -> None:
    missing = run_cli("cancel", "42")
    assert missing.returncode == 1
    assert "no queue row matches '42'" in missing.stderr
    invalid = run_cli("cancel", "not-a-url")
    assert invalid.returncode == 2
    assert "neither a queue id nor a valid URL" in invalid.stderr


def test_cli_requeue_dead_with_filters(conn) -> None:
    _kill(conn, "https://example.com/old", stage="crawl")
    _kill(conn, "https://example.com/new", stage="crawl")
    _kill(conn, "https://example.com/embed", stage="embed")
    _age_finished(conn, "https://example.com/old", 5)

    refused = run_cli("requeue")
    assert refused.returncode == 2
    assert "pass --dead" in refused.stderr
    assert _row(conn, "https://example.com/old")["status"] == "dead"

    result = run_cli("requeue", "--dead", "--stage", "crawl", "--since", "2h", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["requeued"] == 1 and payload["stage"] == "crawl"
    assert payload["rows"] == [{"id": 2, "url": "https://example.com/new"}]
    since = dt.datetime.fromisoformat(payload["since"])
    assert (
        dt.timedelta(hours=1, minutes=58)
        < dt.datetime.now(dt.UTC) - since
        < dt.timedelta(hours=2, minutes=2)
    )

    iso = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=6)).replace(tzinfo=None).isoformat()
    text = run_cli("requeue", "--dead", "--since", iso)
    assert text.returncode == 0, text.stderr
    assert "requeued 2 dead row(s)" in text.stdout
    assert "https://example.com/old" in text.stdout and "https://example.com/embed" in text.stdout
    dead = conn.execute("SELECT count(*) FROM blogqa.url_queue WHERE status = 'dead'").fetchone()
    assert dead[0] == 0


@pytest.mark.parametrize("bad", ["yesterday", "2h30m", "-1d", "2025-13-01", "5y"])
def test_cli_requeue_rejects_bad_since(conn, bad: str) -> None:
    _kill(conn, "https://example.com/dead")
    result = run_cli("requeue", "--dead", f"--since={bad}")
    assert result.returncode == 2
    assert "argument --since" in result.stderr
    assert "neither an ISO-8601 time" in result.stderr
    assert _row(conn, "https://example.com/dead")["status"] == "dead"


def test_cli_requeue_rejects_unknown_stage(conn) -> None:
    result = run_cli("requeue", "--dead", "--stage", "fetch")
    assert result.returncode == 2
    assert "invalid choice: 'fetch'" in result.stderr


def test_cli_errors_table_json_and_limit(conn) -> None:
    _kill(conn, "https://example.com/gone", message="HTTP 404 for https://example.com/gone")
    queue.enqueue(conn, ["https://example.com/stopped"])
    queue_admin.cancel(conn, "https://example.com/stopped")

    table = run_cli("errors")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "latest 2 failure(s), newest first (times in UTC)"
    assert lines[1].startswith("2 cancelled at stage cancel, attempt 0/5, 20")
    assert lines[1].endswith(": https://example.com/stopped")
    assert lines[2] == "    cancelled by operator"
    assert lines[3].startswith("1 dead at stage crawl, attempt 1/5, 20")
    assert lines[4] == "    HTTP 404 for https://example.com/gone"
    assert len(lines) == 5

    as_json = run_cli("errors", "--limit", "1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    [item] = json.loads(as_json.stdout)
    assert item["url"] == "https://example.com/stopped"
    assert (item["status"], item["stage"], item["run_after"]) == ("cancelled", "cancel", None)
    assert dt.datetime.fromisoformat(item["updated_at"]).tzinfo is not None

    for bad in ("0", "1001", "many"):
        result = run_cli("errors", "--limit", bad)
        assert result.returncode == 2
        assert "argument --limit" in result.stderr


def test_cli_errors_when_there_are_none(conn) -> None:
    result = run_cli("errors")
    assert result.returncode == 0, result.stderr
    assert "no failures recorded" in result.stdout
    assert json.loads(run_cli("errors", "--json").stdout) == []
