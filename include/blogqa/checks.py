"""The checks `blogqa init` prints: does the results database answer, and with what (server,
pgvector, schema version); does the model endpoint answer.

They change nothing, so `blogqa init --check` runs them alone as a readiness probe, and each
failure says what to fix rather than raising: an operator sees every problem in one run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict

from blogqa import db, llm, sql_queries
from blogqa.config import Settings
from blogqa.errors import BlogqaError

SQL = sql_queries.load(__name__)  # queries/checks.sql
DATABASE_CONNECT_TIMEOUT = 5  # seconds (libpq connect_timeout)
ENDPOINT_TIMEOUT = 10.0  # seconds for the one request to the model endpoint
DATABASE_HINT = (
    "check BLOGQA_DATABASE_URL (or the Airflow connection blogqa_db) and that the server is running"
)


@dataclass(frozen=True)
class Check:
    """One check's outcome. `used` is False when there is nothing to check (the offline
    provider has no endpoint)."""

    name: str
    ok: bool
    detail: str
    used: bool = True


def _where(settings: Settings, dsn: str) -> str:
    """The database, without credentials."""
    if settings.embedded:
        return f"embedded PostgreSQL in {settings.pgdata}"
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the configured server"
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"database {parts.get('dbname') or '?'} on {host}{port}"


def first_line(exc: Exception) -> str:
    """libpq's messages run over several lines; the first says what failed."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def newest_migration() -> int:
    files = db.migration_files()
    return files[-1][0] if files else 0


def check_database(settings: Settings) -> Check:
    """Server version, pgvector's version and the schema version, on a connection of its own
    (no migration, so it also tells a fresh database from a migrated one)."""
    name = "results database"
    try:
        dsn = db.database_dsn(settings)
    except (BlogqaError, OSError) as exc:
        return Check(name, False, f"not reachable: {exc}")
    where = _where(settings, dsn)
    try:
        with psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=DATABASE_CONNECT_TIMEOUT,
            application_name="blogqa-init-check",
        ) as conn:
            server = conn.execute(SQL.server_version).fetchone()[0]
            vector = conn.execute(SQL.pgvector_version).fetchone()
            present = conn.execute(SQL.schema_present).fetchone()[0]
            version = db.schema_version(conn) if present else 0
    except psycopg.Error as exc:
        return Check(name, False, f"{where} did not answer ({first_line(exc)}): {DATABASE_HINT}")
    expected = newest_migration()
    facts = (
        f"{where}: PostgreSQL {server}, pgvector {vector[0] if vector else 'not installed'},"
        f" schema version {version} of {expected}"
    )
    if vector is None:
        return Check(
            name,
            False,
            f"{facts}; run `blogqa init` (it creates the extension; the server must have"
            " pgvector installed)",
        )
    if version < expected:
        return Check(name, False, f"{facts}; run `blogqa init` to migrate it")
    return Check(name, True, facts)


def check_endpoint(settings: Settings, timeout: float = ENDPOINT_TIMEOUT) -> Check:
    """One cheap request (list the models) through the same `openai` client the pipeline
    uses, without retries, so a wrong URL, key or model name shows now rather than as failed
    rows after the first run."""
    if settings.offline:
        return Check(
            "model endpoint",
            True,
            "BLOGQA_LLM_PROVIDER=local: the offline extractive stand-in, no LLM and no endpoint"
            " to check (set BLOGQA_LLM_PROVIDER=openai and OPENAI_BASE_URL/OPENAI_API_KEY for a"
            " model)",
            used=False,
        )
    return asyncio.run(_check_openai(settings, timeout))


async def _check_openai(settings: Settings, timeout: float) -> Check:
    import openai

    name = "model endpoint"
    started = time.perf_counter()
    async with llm.openai_client(settings, timeout=timeout) as base:
        client = base.with_options(max_retries=0)
        where = str(client.base_url)
        try:
            page = await client.models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            return Check(
                name,
                False,
                f"{where} refused the credentials (HTTP {exc.status_code}): check OPENAI_API_KEY",
            )
        except openai.NotFoundError:
            return Check(
                name,
                False,
                f"{where} has no models route (HTTP 404): check that OPENAI_BASE_URL ends with"
                " the API's prefix, usually /v1",
            )
        except openai.APIStatusError as exc:
            return Check(name, False, f"{where} answered HTTP {exc.status_code}: {exc.message}")
        except openai.APITimeoutError:
            return Check(
                name,
                False,
                f"{where} did not answer within {timeout:g} s: check OPENAI_BASE_URL and that"
                " the server is up",
            )
        except openai.APIConnectionError as exc:
            reason = exc.__cause__ or exc
            return Check(
                name,
                False,
                f"could not connect to {where} ({reason}): check OPENAI_BASE_URL and that the"
                " server is running",
            )
    millis = (time.perf_counter() - started) * 1000
    served = {model.id for model in page.data}
    wanted = {"BLOGQA_CHAT_MODEL": settings.chat_model, "BLOGQA_EMBED_MODEL": settings.embed_model}
    missing = [f"{var}={model}" for var, model in wanted.items() if model not in served]
    if missing:
        return Check(
            name,
            False,
            f"{where} answered in {millis:.0f} ms but does not list {', '.join(missing)}:"
            " check the model names (ignore this if the server accepts models it does not list)",
        )
    return Check(
        name,
        True,
        f"{where} answered in {millis:.0f} ms and serves {settings.chat_model} and"
        f" {settings.embed_model}",
    )
