"""The embedded PostgreSQL 16 + pgvector (the `pgserver` package) under $BLOGQA_HOME/pgdata.

Two lifetimes. By default a `blogqa` command starts the server on first use and the last
command using it stops it, so nothing is left running behind a one-off command. `blogqa db
start` keeps it running in the background (a marker file says so) for a scheduler, the API and
SQL tools; commands then attach to it without tying its life to theirs, until `blogqa db stop`.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from blogqa.config import Settings

log = logging.getLogger(__name__)

KEPT_MARKER = "kept-running"  # in $BLOGQA_HOME: `blogqa db start` asked for a lasting server

_servers: dict[Path, object] = {}  # pgdata -> the pgserver handle this process holds


@dataclass(frozen=True)
class Status:
    """What `blogqa db status` reports."""

    pgdata: Path
    running: bool
    kept: bool
    pid: int | None
    uri: str | None


def _pgserver():
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pgserver  # imported lazily: only the embedded default needs it
    return pgserver


def _running_info(pgdata: Path):
    """The postmaster's description (socket, pid) when a server is up on `pgdata`."""
    if not (pgdata / "postmaster.pid").is_file():
        return None
    _pgserver()  # first import under the warnings filter
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running() or info.status != "ready":
        return None
    return info


def _marker(settings: Settings) -> Path:
    return settings.home / KEPT_MARKER


def _start(settings: Settings, *, keep: bool):
    pgserver = _pgserver()
    settings.home.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded PostgreSQL in %s", settings.pgdata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(settings.pgdata, cleanup_mode=None if keep else "stop")
    _servers[settings.pgdata] = server
    return server


def uri(settings: Settings, database: str) -> str:
    """libpq URL of `database` on the embedded server, starting the server when needed."""
    server = _servers.get(settings.pgdata)
    if server is not None:
        return server.get_uri(database)
    if _marker(settings).is_file():
        info = _running_info(settings.pgdata)
        if info is not None:  # kept by `blogqa db start`: use it, never stop it
            return info.get_uri(database=database)
        return _start(settings, keep=True).get_uri(database)
    return _start(settings, keep=False).get_uri(database)


def handle(settings: Settings):
    """The pgserver handle this process holds for the server, if it started or joined one."""
    return _servers.get(settings.pgdata)


def start(settings: Settings) -> str:
    """Start the server (or adopt a running one) and leave it running after this process."""
    settings.home.mkdir(parents=True, exist_ok=True)
    _marker(settings).touch()
    info = _running_info(settings.pgdata)
    if info is not None:
        return info.get_uri(database="postgres")
    return _start(settings, keep=True).get_uri("postgres")


def stop(settings: Settings) -> bool:
    """Stop the server; True when one was running."""
    _marker(settings).unlink(missing_ok=True)
    info = _running_info(settings.pgdata)
    if info is None:
        return False
    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs postgres as it under root
    _pgserver().pg_ctl(["-w", "-m", "fast", "stop"], pgdata=settings.pgdata, user=user)
    return True


def status(settings: Settings) -> Status:
    info = _running_info(settings.pgdata)
    return Status(
        pgdata=settings.pgdata,
        running=info is not None,
        kept=_marker(settings).is_file(),
        pid=info.pid if info is not None else None,
        uri=info.get_uri(database="blogqa") if info is not None else None,
    )


def psql_path() -> Path:
    """The psql client shipped with the embedded server."""
    return Path(_pgserver().__file__).parent / "pginstall" / "bin" / "psql"


def release(settings: Settings) -> None:
    """Give up this process's handle on the server of `settings.home` (the last holder of a
    server that is not kept running stops it)."""
    server = _servers.pop(settings.pgdata, None)
    if server is not None:
        server.cleanup()


def release_all() -> None:
    """`release` for every server this process holds."""
    while _servers:
        _servers.popitem()[1].cleanup()
