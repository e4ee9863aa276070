"""`blogqa init`, the one set-up step of a deployment: schema migrations, the Airflow pool
blogqa_llm through Airflow's CLI, and checks of the results database and the model endpoint,
run as an operator would (the real command, the real `airflow` CLI, real HTTP)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from blogqa import checks, db
from blogqa.config import load_settings
from tests.test_cli import run_cli

AIRFLOW = Path(sys.executable).with_name("airflow")


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_init_migrates_sets_the_pool_and_checks_database_and_endpoint(openai_env, monkeypatch):
    monkeypatch.setenv("BLOGQA_LLM_POOL_SLOTS", "5")
    result = run_cli("init")
    assert result.returncode == 0, result.stdout + result.stderr
    latest = db.migration_files()[-1][0]
    out = result.stdout
    assert "schema ready" in out
    assert "Airflow pool blogqa_llm has 5 slots" in out
    assert "check: results database: ok - " in out
    assert "PostgreSQL 16." in out and "pgvector 0." in out
    assert f"schema version {latest} of {latest}" in out
    assert f"check: model endpoint: ok - {openai_env.base_url}/v1/ answered in" in out
    assert "serves test-chat-model and text-embedding-3-small" in out
    assert "warning" not in result.stderr

    # the pool as Airflow's public CLI shows it
    pool = subprocess.run(
        [str(AIRFLOW), "pools", "get", "blogqa_llm", "-o", "json"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert pool.returncode == 0, pool.stderr
    (row,) = json.loads(pool.stdout)
    assert int(row["slots"]) == 5 and row["description"].startswith("blogqa:")


def test_init_warns_about_an_unreachable_endpoint_and_fails_only_when_strict(
    settings, openai_env, monkeypatch
):
    db.migrate(settings)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{_closed_port()}/v1")
    result = run_cli("init", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check: results database: ok" in result.stdout
    assert "check: model endpoint: FAILED - could not connect to http://127.0.0.1:" in result.stdout
    assert "check OPENAI_BASE_URL" in result.stdout
    assert "warning: the model endpoint check failed (not fatal without --strict)" in result.stderr
    assert "schema ready" not in result.stdout  # --check changes nothing

    strict = run_cli("init", "--check", "--strict")
    assert strict.returncode == 1
    assert "check: model endpoint: FAILED" in strict.stdout
    assert "(init fails (--strict))" in strict.stderr


def test_endpoint_check_names_the_setting_to_fix(openai_env, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "not-the-key")
    check = checks.check_endpoint(load_settings())
    assert not check.ok and "HTTP 401" in check.detail and "OPENAI_API_KEY" in check.detail

    monkeypatch.setenv("OPENAI_API_KEY", openai_env.api_key)
    monkeypatch.setenv("BLOGQA_CHAT_MODEL", "no-such-model")
    check = checks.check_endpoint(load_settings())
    assert not check.ok and "does not list BLOGQA_CHAT_MODEL=no-such-model" in check.detail

    monkeypatch.setenv("BLOGQA_CHAT_MODEL", "test-chat-model")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_env.base_url)  # the /v1 prefix forgotten
    check = checks.check_endpoint(load_settings())
    assert not check.ok and "HTTP 404" in check.detail and "/v1" in check.detail

    monkeypatch.setenv("OPENAI_BASE_URL", f"{openai_env.base_url}/v1")
    assert checks.check_endpoint(load_settings()).ok


def test_init_check_offline_needs_no_endpoint_and_fails_on_a_down_database(settings, monkeypatch):
    db.migrate(settings)
    result = run_cli("init", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check: model endpoint: none - BLOGQA_LLM_PROVIDER=local" in result.stdout
    assert "warning" not in result.stderr

    port = _closed_port()
    monkeypatch.setenv("BLOGQA_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/blogqa")
    down = run_cli("init", "--check")
    assert down.returncode == 1, down.stdout + down.stderr
    assert (
        f"check: results database: FAILED - database blogqa on 127.0.0.1:{port} did not answer"
        in down.stdout
    )
    assert "check BLOGQA_DATABASE_URL" in down.stdout
    assert "check: model endpoint: none" in down.stdout  # every check still runs

    full = run_cli("init")  # the set-up steps report the failure too, without a traceback
    assert full.returncode == 1, full.stdout + full.stderr
    assert "schema migrations failed" in full.stderr
    assert "Traceback" not in full.stderr
