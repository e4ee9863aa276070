"""Where the results database comes from: BLOGQA_DATABASE_URL, else the Airflow connection
`blogqa_db` (through the postgres provider's hook), else — for the `blogqa` command only —
the embedded server. Inside Airflow (tasks, the plugin) a missing setting is an error."""

from __future__ import annotations

import json

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from blogqa import db, pipeline
from blogqa.api import create_app
from blogqa.config import load_settings


@pytest.fixture
def no_database_setting(monkeypatch):
    url = load_settings().database_url
    monkeypatch.delenv("BLOGQA_DATABASE_URL", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_BLOGQA_DB", raising=False)
    return url


def test_a_task_without_either_setting_fails_naming_both(no_database_setting):
    with pytest.raises(db.DatabaseNotConfiguredError) as raised:
        pipeline.task_settings()
    message = str(raised.value)
    assert "BLOGQA_DATABASE_URL" in message and "`blogqa_db`" in message


def test_the_airflow_connection_is_resolved_with_its_extras(no_database_setting, monkeypatch):
    parts = conninfo_to_dict(no_database_setting)
    spec = {
        "conn_type": "postgres",
        "host": parts["host"],
        "login": "postgres",
        "schema": "blogqa",
        "extra": {"sslmode": "disable", "application_name": "from-the-connection"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_BLOGQA_DB", json.dumps(spec))

    settings = pipeline.task_settings()

    given = conninfo_to_dict(settings.database_url)
    assert given["sslmode"] == "disable" and given["dbname"] == "blogqa"
    with psycopg.connect(settings.database_url) as conn:
        name = conn.execute("SELECT current_setting('application_name')").fetchone()[0]
    assert name == "from-the-connection"
    assert db.resolve(load_settings()).database_url == settings.database_url  # the CLI too


def test_the_cli_falls_back_to_the_embedded_server(no_database_setting, monkeypatch):
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    assert db.resolve(load_settings()).database_url is None  # embedded, no Airflow imported


async def _get(app, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://plugin") as client:
        return await client.get(path)


def test_the_plugin_without_a_database_answers_503_naming_the_settings(no_database_setting):
    import asyncio

    app = create_app(airflow_auth=True)
    answer = asyncio.run(_get(app, "/health"))

    assert answer.status_code == 503
    assert "BLOGQA_DATABASE_URL" in answer.json()["detail"]
    assert "blogqa_db" in answer.json()["detail"]
