"""The `blogqa` command works on its own, as a user or a cron job would call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BLOGQA = Path(sys.executable).with_name("blogqa")


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return subprocess.run(
        [str(BLOGQA), *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=120,
        check=False,
    )


def test_enqueue_reports_new_duplicate_and_rejected_urls(conn):
    result = run_cli(
        "enqueue",
        "https://Example.com/a?utm_source=x",
        "https://example.com/a",
        "ftp://example.com/file",
        "not a url",
    )
    assert result.returncode == 1, result.stderr  # some were rejected; the rest went in
    assert "1 new" in result.stdout
    assert "scheme 'ftp' is not supported" in result.stdout
    assert "rejected 'not a url'" in result.stdout
    rows = conn.execute("SELECT url, status FROM blogqa.url_queue").fetchall()
    assert rows == [("https://example.com/a", "queued")]

    again = run_cli("enqueue", "--json", "--file", "-", stdin="https://example.com/a\n# note\n")
    assert again.returncode == 0
    assert json.loads(again.stdout) == {
        "new": 0,
        "requeued": 0,
        "already_queued": 1,
        "already_done": 0,
        "rejected": [],
    }


def test_stats_json_counts_per_status(conn):
    run_cli("enqueue", "https://example.com/x", "https://example.com/y")
    conn.execute("UPDATE blogqa.url_queue SET status = 'dead' WHERE url LIKE '%/y'")
    result = run_cli("stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["counts"]["queued"] == 1 and stats["counts"]["dead"] == 1
    assert stats["total"] == 2 and stats["oldest_queued_age_seconds"] >= 0


def test_bad_setting_gives_a_clear_error(conn):
    env_var = "BLOGQA_EMBED_DIM"
    os.environ[env_var] = "lots"
    try:
        result = run_cli("stats")
    finally:
        del os.environ[env_var]
    assert result.returncode == 2
    assert "BLOGQA_EMBED_DIM='lots' is not an integer" in result.stderr


def test_run_drains_the_queue_through_airflow(conn, page_server):
    url = f"{page_server.base_url}/articles/07-raised-bed-soil.html"
    assert run_cli("enqueue", url).returncode == 0
    result = run_cli("run", "--chunk-size", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "claimed 1 url(s) in 1 run(s)" in result.stdout and "done 1" in result.stdout
    assert conn.execute("SELECT count(*) FROM blogqa.documents").fetchone()[0] == 1
