"""Database access: where the results database is, connections and migrations.

The results database is, in order: BLOGQA_DATABASE_URL; else the Airflow connection
`blogqa_db`, resolved the way Airflow resolves connections (AIRFLOW_CONN_BLOGQA_DB, a
connection made in the UI, a secrets backend) through the postgres provider's hook; else, for
the `blogqa` command only, the embedded PostgreSQL (`blogqa.embedded`). An Airflow component
(a task, the API plugin) with neither fails with a message naming both, rather than starting
a private database in a worker's working directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from importlib.resources.abc import Traversable
from urllib.parse import urlsplit, urlunsplit

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import make_conninfo

from blogqa import embedded, sql_queries
from blogqa.config import Settings
from blogqa.errors import ConfigError, SchemaMismatchError

log = logging.getLogger(__name__)

MIGRATION_LOCK_ID = 0x626C6F67  # pg_advisory_xact_lock key: "blog"
APP_DATABASE = "blogqa"
AIRFLOW_DATABASE = "airflow"
AIRFLOW_CONN_ID = "blogqa_db"

SQL = sql_queries.load(__name__)  # queries/db.sql

_created: set[str] = set()  # databases known to exist, by DSN
_migrated: set[str] = set()  # databases migrated by this process, by DSN


class DatabaseNotConfiguredError(ConfigError):
    """An Airflow component has no results database: neither setting is there."""


def airflow_connection_dsn(conn_id: str = AIRFLOW_CONN_ID) -> str | None:
    """libpq conninfo of an Airflow connection (None when it is not defined), built the way
    the postgres provider's hook connects: host, port, login, password, schema as the
    database, and every extra (sslmode, sslrootcert, options, ...) but the hook's own."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    hook = PostgresHook(postgres_conn_id=conn_id)
    try:
        conn = hook.connection
    except AirflowNotFoundException:
        return None
    extras = conn.extra_dejson
    login, password, port = conn.login, conn.password, conn.port
    if extras.get("iam", False):  # short-lived cloud IAM token, as the hook gets it
        login, password, port = hook.get_iam_token(conn)
    args = {"host": conn.host, "port": port, "user": login, "password": password}
    args["dbname"] = conn.schema or APP_DATABASE
    args.update((k, v) for k, v in extras.items() if k not in PostgresHook.ignored_extra_options)
    return make_conninfo(**{k: str(v) for k, v in args.items() if v not in (None, "")})


def _airflow_is_configured() -> bool:
    env = os.environ
    return bool(
        env.get(f"AIRFLOW_CONN_{AIRFLOW_CONN_ID.upper()}")
        or env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    )


def resolve(settings: Settings, *, in_airflow: bool = False) -> Settings:
    """`settings` with the results database filled in from Airflow's connection `blogqa_db`
    when BLOGQA_DATABASE_URL is unset. `in_airflow` (tasks, the API plugin) forbids the
    embedded fallback; elsewhere the connection is looked up only when Airflow is configured
    in this environment, so a plain `blogqa` command never pays for importing Airflow."""
    if settings.database_url is not None:
        return settings
    if in_airflow or _airflow_is_configured():
        dsn = airflow_connection_dsn()
        if dsn is not None:
            return dataclasses.replace(settings, database_url=dsn)
    if in_airflow:
        raise DatabaseNotConfiguredError(
            "no results database configured: set BLOGQA_DATABASE_URL, or create the Airflow "
            f"connection `{AIRFLOW_CONN_ID}` (AIRFLOW_CONN_{AIRFLOW_CONN_ID.upper()}, Admin > "
            "Connections in the UI, or a secrets backend), where this component runs: the "
            "scheduler's and workers' environment for tasks, the api-server's for the plugin"
        )
    return settings


def _ensure_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute(SQL.database_exists, (name,)).fetchone()
        if not exists:
            # an identifier, not a value: composed with psycopg.sql, not a named query
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _with_database(dsn: str, name: str) -> str:
    """The same server and credentials, another database (URL or key=value form)."""
    if "://" in dsn:
        return urlunsplit(urlsplit(dsn)._replace(path="/" + name))
    return make_conninfo(dsn, dbname=name)


def database_dsn(settings: Settings) -> str:
    """libpq URL of blogqa's own database (starting the embedded server when needed)."""
    if settings.database_url is not None:
        return settings.database_url
    dsn = embedded.uri(settings, APP_DATABASE)
    if dsn not in _created:
        _ensure_database(embedded.uri(settings, "postgres"), APP_DATABASE)
        _created.add(dsn)
    return dsn


def airflow_dsn(settings: Settings, name: str = AIRFLOW_DATABASE) -> str:
    """libpq URL for Airflow's metadata database: its own database (`name`) on the results
    database's server, created when missing."""
    if settings.database_url is not None:
        dsn = _with_database(settings.database_url, name)
        admin = _with_database(settings.database_url, "postgres")
    else:
        dsn = embedded.uri(settings, name)
        admin = embedded.uri(settings, "postgres")
    try:
        _ensure_database(admin, name)
    except psycopg.Error as exc:
        raise ConfigError(
            f"could not create the Airflow metadata database '{name}' ({exc}); "
            "create it yourself or set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
        ) from exc
    return dsn


@contextmanager
def connect(
    settings: Settings, *, migrate_first: bool = True, check_vectors: bool = True
) -> Iterator[psycopg.Connection]:
    """An autocommit connection (writes use explicit `conn.transaction()` blocks) to blogqa's
    database, with the schema migrated and pgvector registered. `check_vectors=False` skips
    the check that the settings name the active vector set (for `blogqa vectors`, which
    changes it)."""
    dsn = database_dsn(settings)
    if migrate_first and dsn not in _migrated:
        migrate(settings, check_vectors=check_vectors)
    with psycopg.connect(dsn, application_name="blogqa", autocommit=True) as conn:
        register_vector(conn)
        yield conn


def migration_files() -> list[tuple[int, str, Traversable]]:
    """The numbered files of the package's sql/ folder, in order (package data, so a wheel
    installed into Airflow's image carries them)."""
    found = []
    folder = resources.files("blogqa") / "sql"
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        match = re.match(r"^(\d+)_([\w-]+)\.sql$", path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return found


def migrate(settings: Settings, *, check_vectors: bool = True) -> list[str]:
    """Apply pending migrations in order, under an advisory lock; return the ones applied."""
    dsn = database_dsn(settings)
    applied: list[str] = []
    with psycopg.connect(dsn, application_name="blogqa-migrate") as conn:
        with conn.transaction():
            conn.execute(SQL.migration_lock, (MIGRATION_LOCK_ID,))
            conn.execute(SQL.create_schema)
            conn.execute(SQL.create_migrations_table)
            done = {row[0] for row in conn.execute(SQL.applied_versions)}
            for version, name, path in migration_files():
                if version in done:
                    continue
                log.info("applying migration %03d_%s", version, name)
                ddl = path.read_text().replace("{embed_dim}", str(int(settings.embed_dim)))
                conn.execute(ddl)
                conn.execute(SQL.record_migration, (version, name))
                applied.append(f"{version:03d}_{name}")
        active = conn.execute(SQL.active_vector_set).fetchone()
        if active is not None and not active[3] and active[1] != settings.embed_model:
            with conn.transaction():  # a write only when set 1's model is to follow
                conn.execute(
                    SQL.follow_configured_model, (settings.embed_model, settings.embed_model)
                )
        if check_vectors:
            _check_vector_set(active, settings)
    _migrated.add(dsn)
    return applied


def _check_vector_set(row: tuple | None, settings: Settings) -> None:
    """BLOGQA_EMBED_DIM must be the active vector set's dimension (migration 013; `row` is
    SQL.active_vector_set), and once `blogqa vectors` has made another set, BLOGQA_EMBED_MODEL
    its model: otherwise the pipeline would write vectors of another size or model into its
    columns. (While set 1 follows the configured model, only the dimension can differ.)"""
    if row is None:
        return
    set_id, model, dim, pinned = row
    if int(dim) == settings.embed_dim and (not pinned or model == settings.embed_model):
        return
    if not pinned:
        raise SchemaMismatchError(
            f"the database stores {dim}-dimensional embeddings but BLOGQA_EMBED_DIM="
            f"{settings.embed_dim}; set BLOGQA_EMBED_DIM={dim}, or embed the new size beside "
            "the stored vectors with `blogqa vectors create` (docs/freshness.md)"
        )
    raise SchemaMismatchError(
        f"the database's active vector set is set {set_id}: {model}, {dim} dimensions; "
        f"BLOGQA_EMBED_MODEL={settings.embed_model} and BLOGQA_EMBED_DIM={settings.embed_dim} "
        f"here. Set BLOGQA_EMBED_MODEL={model} and BLOGQA_EMBED_DIM={dim}, or switch sets with "
        "`blogqa vectors switch ID` (`blogqa vectors list`)"
    )


def schema_version(conn: psycopg.Connection) -> int:
    row = conn.execute(SQL.schema_version).fetchone()
    return int(row[0])


async def schema_version_async(conn: psycopg.AsyncConnection) -> int:
    """`schema_version` for an async connection (the API)."""
    cur = await conn.execute(SQL.schema_version)
    row = await cur.fetchone()
    return int(row[0])
