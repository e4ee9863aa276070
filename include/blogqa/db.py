"""Database access: the embedded server, connections and migrations.

With no server configured, blogqa starts PostgreSQL 16 + pgvector from the `pgserver` package
under $BLOGQA_HOME/pgdata on first use; every later command and task process reuses it (it
stops when the last process using it exits).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from blogqa.config import Settings
from blogqa.errors import ConfigError, SchemaMismatchError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "sql"
MIGRATION_LOCK_ID = 0x626C6F67  # pg_advisory_xact_lock key: "blog"
APP_DATABASE = "blogqa"
AIRFLOW_DATABASE = "airflow"

_servers: dict[Path, object] = {}
_created: set[str] = set()  # databases known to exist, by DSN
_migrated: set[str] = set()  # databases migrated by this process, by DSN


def _embedded_server(settings: Settings):  # -> pgserver.PostgresServer
    """Start (or attach to) the bundled PostgreSQL under $BLOGQA_HOME/pgdata."""
    server = _servers.get(settings.pgdata)
    if server is None:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver  # imported lazily: only the embedded default needs it

        settings.home.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", settings.pgdata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(settings.pgdata, cleanup_mode="stop")
        _servers[settings.pgdata] = server
    return server


def _ensure_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


def database_dsn(settings: Settings) -> str:
    """libpq URL of blogqa's own database (starting the embedded server when needed)."""
    if settings.database_url is not None:
        return settings.database_url
    server = _embedded_server(settings)
    dsn = server.get_uri(APP_DATABASE)
    if dsn not in _created:
        _ensure_database(server.get_uri("postgres"), APP_DATABASE)
        _created.add(dsn)
    return dsn


def airflow_dsn(settings: Settings) -> str:
    """libpq URL for Airflow's metadata database: its own database on the same server."""
    if settings.database_url is not None:
        dsn = _with_database(settings.database_url, AIRFLOW_DATABASE)
        admin = _with_database(settings.database_url, "postgres")
    else:
        server = _embedded_server(settings)
        dsn, admin = server.get_uri(AIRFLOW_DATABASE), server.get_uri("postgres")
    try:
        _ensure_database(admin, AIRFLOW_DATABASE)
    except psycopg.Error as exc:
        raise ConfigError(
            f"could not create the Airflow metadata database '{AIRFLOW_DATABASE}' ({exc}); "
            "create it yourself or set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
        ) from exc
    return dsn


@contextmanager
def connect(settings: Settings, *, migrate_first: bool = True) -> Iterator[psycopg.Connection]:
    """An autocommit connection (writes use explicit `conn.transaction()` blocks) to blogqa's
    database, with the schema migrated and pgvector registered."""
    dsn = database_dsn(settings)
    if migrate_first and dsn not in _migrated:
        migrate(settings)
    with psycopg.connect(dsn, application_name="blogqa", autocommit=True) as conn:
        register_vector(conn)
        yield conn


def migration_files() -> list[tuple[int, str, Path]]:
    """The numbered files of sql/, in order."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = re.match(r"^(\d+)_([\w-]+)\.sql$", path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return found


def migrate(settings: Settings) -> list[str]:
    """Apply pending migrations in order, under an advisory lock; return the ones applied."""
    dsn = database_dsn(settings)
    applied: list[str] = []
    with psycopg.connect(dsn, application_name="blogqa-migrate") as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            conn.execute("CREATE SCHEMA IF NOT EXISTS blogqa")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS blogqa.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM blogqa.schema_migrations")}
            for version, name, path in migration_files():
                if version in done:
                    continue
                log.info("applying migration %03d_%s", version, name)
                ddl = path.read_text().replace("{embed_dim}", str(int(settings.embed_dim)))
                conn.execute(ddl)
                conn.execute(
                    "INSERT INTO blogqa.schema_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
                applied.append(f"{version:03d}_{name}")
        _check_embed_dim(conn, settings)
    _migrated.add(dsn)
    return applied


def _check_embed_dim(conn: psycopg.Connection, settings: Settings) -> None:
    row = conn.execute("SELECT value FROM blogqa.settings WHERE key = 'embed_dim'").fetchone()
    if row and int(row[0]) != settings.embed_dim:
        raise SchemaMismatchError(
            f"the database stores {row[0]}-dimensional embeddings but BLOGQA_EMBED_DIM="
            f"{settings.embed_dim}; set BLOGQA_EMBED_DIM={row[0]} or point blogqa at a new database"
        )


SCHEMA_VERSION_SQL = "SELECT coalesce(max(version), 0) FROM blogqa.schema_migrations"


def schema_version(conn: psycopg.Connection) -> int:
    row = conn.execute(SCHEMA_VERSION_SQL).fetchone()
    return int(row[0])


async def schema_version_async(conn: psycopg.AsyncConnection) -> int:
    """`schema_version` for an async connection (the API)."""
    cur = await conn.execute(SCHEMA_VERSION_SQL)
    row = await cur.fetchone()
    return int(row[0])
