"""The read-only results API: `create_app()` builds the FastAPI app.

Standalone (`blogqa serve`) every route but /health and the publisher widget's
(`/widget.js`, `/widget/v1/...`, read-only, one page at a time) requires
`Authorization: Bearer <token>` when BLOGQA_API_TOKEN is set; every route but /health and
/metrics is rate-limited per client (access.py), and browsers of the origins in
BLOGQA_API_CORS_ORIGINS may call it (the widget on a publisher's pages). Mounted as an Airflow
plugin (`create_app(airflow_auth=True)`) every route but /health requires an Airflow user with
read access to the blogqa DAG, checked through Airflow's auth manager (airflow_auth.py).

Model calls (similar-by-text, ask, the widget's ask) go through one AsyncOpenAI per event loop,
made on first use and closed on shutdown (model_clients.py).

Database access is read-only by construction: pooled async connections are opened with
`default_transaction_read_only = on` (a connection option, so it holds from the first
statement). The one write, the `ask` route's usage ledger, goes through a separate pool of
at most LEDGER_POOL_MAX_SIZE connections that only `answers.write_usage` uses. The pools open
on first use (a sub-application mounted by Airflow gets no lifespan events) and close on
shutdown.

The API never migrates. On a database that answers but whose schema is missing or older than
the newest migration it ships, every route answers 503 naming `blogqa init`
(`Database.require_schema`): a set-up step still to do, told apart from "database
unavailable". A ready schema is remembered per process, so it costs nothing per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

import psycopg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pgvector.psycopg import register_vector_async
from psycopg.conninfo import conninfo_to_dict
from psycopg.types import TypeInfo
from psycopg_pool import AsyncConnectionPool
from pydantic import AfterValidator

from blogqa import db, search
from blogqa.answer import AnswerError
from blogqa.api import (
    access,
    answers,
    metrics,
    models,
    operations,
    quality_docs,
    queries,
    ui,
    widget,
)
from blogqa.api.airflow_auth import require_dag_reader
from blogqa.api.model_clients import ModelClients
from blogqa.config import Settings, load_settings
from blogqa.llm import LLMConfigurationError, ModelCall
from blogqa.queue import STATUSES

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY_BYTES = 64 * 1024
TOKEN_ENV = "BLOGQA_API_TOKEN"
POOL_MAX_SIZE = 8  # read connections per process (bench/api_bench.py)
LEDGER_POOL_MAX_SIZE = 2  # write connections per process, for the usage ledger only

ERRORS = {
    401: {"model": models.ErrorBody, "description": "missing or wrong credentials"},
    404: {"model": models.ErrorBody, "description": "no such row"},
    413: {"model": models.ErrorBody, "description": "request body over 64 KB"},
    503: {
        "model": models.ErrorBody,
        "description": "database unavailable, or its schema not initialised or behind"
        " (the detail names `blogqa init`)",
    },
}


# ---------------------------------------------------------------- database


class SchemaNotReadyError(Exception):
    """The database answers but blogqa's schema is missing, behind, or lacks a table or
    column this API reads; the message (shown to clients) names the fix."""


def session_options(dsn: str, settings: Settings) -> str:
    """libpq `options` of the read pool: read-only transactions, and hnsw.ef_search at the
    configured value so a search that needs no more runs as one statement
    (search.SQL.ef_search). Options already in the DSN (or PGOPTIONS) are kept."""
    given = conninfo_to_dict(dsn).get("options") or os.environ.get("PGOPTIONS", "")
    ours = f"-c default_transaction_read_only=on -c hnsw.ef_search={settings.hnsw_ef_search}"
    return f"{given} {ours}".strip()


class Database:
    """The settings, the DSN, a lazily opened read-only connection pool and the ledger's
    small write pool, and whether the schema is ready."""

    open_timeout = 10.0  # seconds a request waits for the first connection
    # While the schema is not ready, requests reuse the last verdict for this long, so a
    # client retrying in a loop costs one query per interval, not one per request.
    schema_recheck_seconds = 3.0
    # How long the active vector set read from the database is reused. A switch is seen
    # within this long; a query embedded for the old set in between is answered from the new
    # one's vectors when the dimension is the same, and retried when it is not (search_with).
    vector_set_recheck_seconds = 2.0

    def __init__(self, settings: Settings | None, *, in_airflow: bool = False) -> None:
        self._settings = settings
        self._in_airflow = in_airflow  # no embedded fallback inside Airflow's api-server
        self._dsn: str | None = None
        self._pool: AsyncConnectionPool | None = None
        self._ledger: AsyncConnectionPool | None = None
        self._lock = asyncio.Lock()
        self._expected: int | None = None
        self._schema: queries.SchemaState | None = None  # the last verdict
        self._schema_checked = float("-inf")  # time.monotonic() of that verdict
        # pooled connections opened before pgvector was installed (`blogqa init` not run yet)
        self._without_vector: weakref.WeakSet = weakref.WeakSet()
        self._vector_set: tuple | None = None  # the last read of the active vector set
        self._vector_set_read = float("-inf")

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @property
    def session_ef_search(self) -> int:
        """hnsw.ef_search of every read connection's session (set when it connects)."""
        return self.settings.hnsw_ef_search

    async def dsn(self) -> str:
        if self._dsn is None:
            # Airflow's connection lookup and the embedded server's start block: off the loop
            settings = await asyncio.to_thread(
                db.resolve, self.settings, in_airflow=self._in_airflow
            )
            self._dsn = await asyncio.to_thread(db.database_dsn, settings)
        return self._dsn

    async def _open(self, max_size: int, kwargs: dict, configure=None) -> AsyncConnectionPool:
        pool = AsyncConnectionPool(
            await self.dsn(),
            min_size=1,
            max_size=max_size,
            kwargs=kwargs,
            configure=configure,
            open=False,
            timeout=self.open_timeout,
        )
        try:
            await pool.open(wait=True, timeout=self.open_timeout)
        except BaseException:
            await pool.close()
            raise
        return pool

    async def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    options = session_options(await self.dsn(), self.settings)
                    kwargs = {
                        "autocommit": True,
                        "application_name": "blogqa-api",
                        "options": options,
                    }
                    self._pool = await self._open(POOL_MAX_SIZE, kwargs, self._configure)
        return self._pool

    async def _configure(self, conn: psycopg.AsyncConnection) -> None:
        """Every pooled connection: pgvector types. On a database without the extension yet
        (before `blogqa init`) the connection is kept without them, so requests get the
        schema's 503 instead of a pool that can never connect; it registers them on first
        use once the extension exists."""
        if await TypeInfo.fetch(conn, "vector") is None:
            self._without_vector.add(conn)
        else:
            await register_vector_async(conn)
            self._without_vector.discard(conn)

    async def ledger(self) -> AsyncConnectionPool:
        """The write pool of the usage ledger (opened on the first `ask`)."""
        if self._ledger is None:
            async with self._lock:
                if self._ledger is None:
                    kwargs = {"autocommit": True, "application_name": "blogqa-api-ledger"}
                    self._ledger = await self._open(LEDGER_POOL_MAX_SIZE, kwargs)
        return self._ledger

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        pool = await self.pool()
        async with pool.connection() as conn:
            if self._without_vector and conn in self._without_vector:
                await self._configure(conn)
            yield conn

    # ------------------------------------------------------------ schema

    @property
    def expected_schema_version(self) -> int:
        """The newest migration this code ships (what `blogqa init` migrates to)."""
        if self._expected is None:
            files = db.migration_files()
            if not files:
                log.warning("no migration files found in the blogqa package: schema unchecked")
            self._expected = files[-1][0] if files else 0
        return self._expected

    def note_schema(self, state: queries.SchemaState) -> None:
        """Remember a verdict (logging changes only, not every request)."""
        previous = self._schema
        if previous is None or previous.status != state.status:
            if state.ready:
                log.info("blogqa schema ready (version %d)", state.version)
            else:
                log.warning("%s", state.message)
        self._schema = state
        self._schema_checked = time.monotonic()

    def forget_schema(self) -> None:
        """The schema changed under us (a table went missing): check again on next use."""
        self._schema = None
        self._schema_checked = float("-inf")

    async def check_schema(self) -> queries.SchemaState:
        """Query the schema's state now, on a pooled connection."""
        async with self.connection() as conn:
            state = await queries.schema_state(conn, self.expected_schema_version)
        self.note_schema(state)
        return state

    async def require_schema(self) -> None:
        """SchemaNotReadyError unless the schema is at the newest migration.

        Free once the schema was seen ready in this process. While it is not, the last
        verdict is reused for `schema_recheck_seconds`; the request that finds it stale
        claims the re-check, so concurrent requests do not query too."""
        state = self._schema
        if state is not None and state.ready:
            return
        if state is None or time.monotonic() - self._schema_checked >= self.schema_recheck_seconds:
            if state is not None:
                self._schema_checked = time.monotonic()  # claim the re-check
            state = await self.check_schema()
        if not state.ready:
            raise SchemaNotReadyError(state.message)

    async def search_settings(self) -> Settings:
        """The settings a query is embedded with: the active vector set's model and dimension
        once `blogqa vectors` has made another set (so the API follows a switch without a
        restart), else the configured ones (migration 013)."""
        if time.monotonic() - self._vector_set_read >= self.vector_set_recheck_seconds:
            async with self.connection() as conn:
                cur = await conn.execute(db.SQL.active_vector_set)
                self._vector_set = await cur.fetchone()
            self._vector_set_read = time.monotonic()
        row = self._vector_set
        if row is None or not row[3]:
            return self.settings
        return dataclasses.replace(self.settings, embed_model=row[1], embed_dim=int(row[2]))

    def forget_vector_set(self) -> None:
        self._vector_set_read = float("-inf")

    async def search_with(self, attempt: Callable[[Settings], Awaitable[T]]) -> T:
        """`attempt(search_settings)`, once more after reading the active set again when the
        stored vectors have another dimension than the query's: a switch committed between
        the read and the search."""
        try:
            return await attempt(await self.search_settings())
        except psycopg.errors.DataException as exc:
            if "different vector dimensions" not in str(exc):
                raise
            log.info("stage=api the active vector set changed during a search: retried")
            self.forget_vector_set()
            return await attempt(await self.search_settings())

    async def record_usage(self, calls: list[ModelCall]) -> None:
        """Append model calls to blogqa.llm_usage through the ledger pool."""
        if calls:
            async with (await self.ledger()).connection() as conn:
                await answers.write_usage(conn, calls)

    async def close(self) -> None:
        for pool in (self._pool, self._ledger):
            if pool is not None:
                await pool.close()
        self._pool = self._ledger = None


async def _database(request: Request) -> Database:
    # async: FastAPI runs a plain `def` dependency in its thread pool
    return request.app.state.database


async def _connection(request: Request) -> AsyncIterator[psycopg.AsyncConnection]:
    async with request.app.state.database.connection() as conn:
        yield conn


Conn = Annotated[psycopg.AsyncConnection, Depends(_connection)]
DatabaseDep = Annotated[Database, Depends(_database)]


# ---------------------------------------------------------------- request size and errors


class BodyTooLargeError(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"request body larger than {MAX_BODY_BYTES} bytes")


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while streaming."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                await _json(scope, receive, send, 400, "invalid Content-Length header")
                return
            if too_large:
                await _json(scope, receive, send, 413, BodyTooLargeError().detail)
                return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # an HTTPException passes FastAPI's body parsing unchanged
                    raise BodyTooLargeError
            return message

        await self.app(scope, limited_receive, send)


async def _json(scope, receive, send, code: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=code)(scope, receive, send)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


async def _not_found(request: Request, exc: queries.NotFoundError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _invalid(request: Request, exc: queries.InvalidInputError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def _database_down(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
    log.error("database unavailable: %s", exc)
    return JSONResponse({"detail": "database unavailable"}, status_code=503)


async def _not_configured(request: Request, exc: db.DatabaseNotConfiguredError) -> JSONResponse:
    log.error("%s", exc)
    return JSONResponse({"detail": str(exc)}, status_code=503)


async def _schema_not_ready(request: Request, exc: SchemaNotReadyError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


async def _schema_changed(request: Request, exc: psycopg.errors.UndefinedTable) -> JSONResponse:
    """A table or column went missing under a running API (schema dropped or changed after
    it was seen ready): the same 503 as a schema never initialised, not a 500. The cached
    verdict is dropped and the schema checked now, so the detail says what is wrong."""
    log.error("schema changed under the API (%s %s): %s", request.method, request.url.path, exc)
    database: Database = request.app.state.database
    database.forget_schema()
    try:
        state = await database.check_schema()
    except (psycopg.OperationalError, OSError, TimeoutError) as check_error:
        log.error("database unavailable: %s", check_error)
        return JSONResponse({"detail": "database unavailable"}, status_code=503)
    detail = queries.SCHEMA_MISMATCH if state.ready else state.message
    return JSONResponse({"detail": detail}, status_code=503)


async def _model_failed(request: Request, exc: Exception) -> JSONResponse:
    log.error("model endpoint failed: %s", exc)
    return JSONResponse({"detail": "the model endpoint could not answer"}, status_code=502)


# ---------------------------------------------------------------- auth

_bearer = HTTPBearer(auto_error=False, description=f"the value of {TOKEN_ENV}")


def token_auth(token: str):
    """Dependency: `Authorization: Bearer <token>`, compared in constant time."""
    expected = token.encode()

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


# ---------------------------------------------------------------- routes

Limit = Annotated[int, Query(ge=1, le=models.MAX_LIMIT, description="at most 100")]
Offset = Annotated[int, Query(ge=0)]


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL's text cannot hold NUL, so a filter with one could match nothing and would
    fail in the driver: it is the client's error (422), not a server error."""
    if text is not None and "\x00" in text:
        raise ValueError("must not contain NUL (\\x00) characters")
    return text


health_router = APIRouter(tags=["health"])
router = APIRouter(prefix="/api/v1", responses={k: ERRORS[k] for k in (401, 413, 503)})


async def _schema_ready(request: Request) -> None:
    """Every /api/v1 route: 503 naming `blogqa init` until the schema is ready."""
    await request.app.state.database.require_schema()


@health_router.get(
    "/health",
    response_model=models.Health,
    responses={
        503: {
            "model": models.Health,
            "description": "database unreachable (`database` false), or its schema not ready"
            " (`schema_status`; `detail` names the fix)",
        }
    },
)
async def health(database: DatabaseDep) -> models.Health | JSONResponse:
    """Database reachable, schema ready, queue depth (queued + processing). It checks the
    schema on every call (it is the probe) and updates the verdict the other routes reuse."""
    try:
        async with database.connection() as conn:
            body, state = await queries.health(conn, database.expected_schema_version)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        log.error("health check: schema changed under the API: %s", exc)
        database.forget_schema()
        body = models.Health(
            status="unavailable",
            database=True,
            schema_status="mismatch",
            schema_expected_version=database.expected_schema_version,
            detail=queries.SCHEMA_MISMATCH,
        )
        return JSONResponse(body.model_dump(), status_code=503)
    except (psycopg.Error, OSError, TimeoutError) as exc:
        log.error("health check: database unavailable: %s", exc)
        body = models.Health(status="unavailable", database=False, detail="database unavailable")
        return JSONResponse(body.model_dump(), status_code=503)
    except db.DatabaseNotConfiguredError as exc:
        body = models.Health(status="unavailable", database=False, detail=str(exc))
        return JSONResponse(body.model_dump(), status_code=503)
    database.note_schema(state)
    if not state.ready:
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.get("/documents", response_model=models.DocumentList, tags=["documents"])
async def list_documents(
    conn: Conn,
    url: Annotated[str | None, Query(max_length=2048, description="exact URL")] = None,
    site: Annotated[
        str | None, Query(max_length=500, description="site name"), AfterValidator(_no_nul)
    ] = None,
    q: Annotated[
        str | None,
        Query(max_length=500, description="text in title or body"),
        AfterValidator(_no_nul),
    ] = None,
    limit: Limit = 20,
    offset: Offset = 0,
) -> models.DocumentList:
    """Processed documents, most recently updated first."""
    return await queries.list_documents(conn, url=url, site=site, q=q, limit=limit, offset=offset)


@router.get(
    "/documents/{document_id}",
    response_model=models.DocumentDetail,
    responses={404: ERRORS[404]},
    tags=["documents"],
)
async def get_document(
    conn: Conn, document_id: int, include_text: bool = False
) -> models.DocumentDetail:
    """One document with its summary and questions."""
    return await queries.get_document(conn, document_id, include_text=include_text)


@router.get(
    "/questions/by-url",
    response_model=models.DocumentDetail,
    responses={404: ERRORS[404]},
    tags=["questions"],
)
async def questions_by_url(
    conn: Conn, url: Annotated[str, Query(min_length=1, max_length=4096)]
) -> models.DocumentDetail:
    """The document for a URL (normalized as the queue does) with its summary and questions.
    404 says whether the URL is still queued or failed."""
    return await queries.get_document(conn, url=url)


@router.get(
    "/questions/{question_id}",
    response_model=models.QuestionDetail,
    responses={404: ERRORS[404]},
    tags=["questions"],
)
async def get_question(conn: Conn, question_id: int) -> models.QuestionDetail:
    return await queries.get_question(conn, question_id)


@router.post(
    "/search/similar",
    response_model=models.SimilarResponse,
    responses={404: ERRORS[404]},
    tags=["search"],
)
async def search_similar(
    request: Request, database: DatabaseDep, body: models.SimilarRequest
) -> models.SimilarResponse:
    """Documents ranked by cosine similarity (pgvector HNSW) to a text or to a stored URL."""

    async def attempt(settings: Settings) -> models.SimilarResponse:
        vector = None
        if body.text is not None:  # a model call: before taking a pooled connection
            client = request.app.state.model_clients.embed(settings)
            vector, _ = await search.embed_query_async(settings, body.text, client=client)
        async with database.connection() as conn:
            return await queries.similar(
                conn, settings, body, vector=vector, session_ef_search=database.session_ef_search
            )

    return await database.search_with(attempt)


@router.post("/qa/ask", response_model=models.AskResponse, tags=["search"])
async def ask(
    request: Request, database: DatabaseDep, body: models.AskRequest
) -> models.AskResponse:
    """Answer from the top-k chunks only, with the configured chat model (offline: the
    best-matching sentence). Token usage is recorded in blogqa.llm_usage, stage 'ask'."""
    clients = request.app.state.model_clients

    async def sources(settings: Settings) -> tuple:
        # the model calls run without holding a pooled connection; only the search takes one
        vector, embed_call = await search.embed_query_async(
            settings, body.question, client=clients.embed(settings)
        )
        async with database.connection() as conn:
            chunks = await queries.ask_sources(
                conn, settings, body, vector, session_ef_search=database.session_ef_search
            )
        return chunks, embed_call

    chunks, embed_call = await database.search_with(sources)
    settings = database.settings
    response, calls = await answers.ask_answer(
        settings, body, chunks, embed_call, client=clients.chat(settings)
    )
    await database.record_usage(calls)
    return response


@router.get("/jobs/stats", response_model=models.JobStats, tags=["jobs"])
async def job_stats(conn: Conn) -> models.JobStats:
    """Queue counts per status, oldest queued age and last-hour throughput."""
    return await queries.job_stats(conn)


@router.get("/jobs", response_model=models.JobList, tags=["jobs"])
async def list_jobs(
    conn: Conn,
    status: Annotated[str | None, Query(pattern=f"^({'|'.join(STATUSES)})$")] = None,
    limit: Limit = 20,
    offset: Offset = 0,
) -> models.JobList:
    return await queries.list_jobs(conn, status=status, limit=limit, offset=offset)


@router.get(
    "/jobs/{job_id}", response_model=models.JobDetail, responses={404: ERRORS[404]}, tags=["jobs"]
)
async def get_job(conn: Conn, job_id: int) -> models.JobDetail:
    """One queue row with its attempts, stage and error history."""
    return await queries.get_job(conn, job_id)


# ---------------------------------------------------------------- operators

ops_router = APIRouter(responses={k: ERRORS[k] for k in (401, 503)})


@ops_router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(conn: Conn) -> Response:
    """blogqa's counters in the Prometheus text format (metrics.py)."""
    counters = await operations.counters(conn)
    return Response(metrics.render(counters), media_type=metrics.CONTENT_TYPE)


@ops_router.get("/ui", include_in_schema=False, response_class=HTMLResponse)
async def operations_view(
    conn: Conn,
    dag_id: Annotated[str | None, Query(max_length=250)] = None,
) -> HTMLResponse:
    """The operators' page (ui.py): queue, runs, dead letters, model cost, quality."""
    overview = await operations.overview(conn)
    return HTMLResponse(
        ui.render(overview, dag_id=dag_id),
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


# ---------------------------------------------------------------- app


def create_app(
    settings: Settings | None = None,
    *,
    airflow_auth: bool = False,
    api_token: str | None = None,
) -> FastAPI:
    """The API. `airflow_auth` (for the plugin) requires an Airflow user allowed to read the
    blogqa DAG; otherwise `api_token` (default: $BLOGQA_API_TOKEN), when set, is required as a
    bearer token, the widget's routes stay public, and the rate limit and CORS origins of the
    settings apply. /health is always open."""
    database = Database(settings, in_airflow=airflow_auth)
    model_clients = ModelClients()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await model_clients.aclose()
        await database.close()

    app = FastAPI(
        title="blogqa results API",
        version="1",
        description="Read-only access to the documents, questions, embeddings and queue "
        "that the blogqa pipeline writes.",
        lifespan=lifespan,
    )
    app.state.database = database
    app.state.model_clients = model_clients
    if airflow_auth:
        dependencies = [Depends(require_dag_reader)]
    else:
        token = api_token if api_token is not None else os.environ.get(TOKEN_ENV, "")
        dependencies = [Depends(token_auth(token))] if token else []
    app.include_router(health_router)
    # after the credentials: an anonymous caller learns nothing beyond what /health says
    app.include_router(router, dependencies=[*dependencies, Depends(_schema_ready)])
    app.include_router(ops_router, dependencies=[*dependencies, Depends(_schema_ready)])
    app.include_router(quality_docs.router(settings), dependencies=dependencies)  # Data Docs
    # the widget: public standalone (a reader's browser has no token), Airflow's auth inside it
    app.include_router(
        widget.public_router,
        dependencies=[*(dependencies if airflow_auth else []), Depends(_schema_ready)],
    )
    app.add_middleware(BodyLimitMiddleware)
    if not airflow_auth:
        _standalone_access(app, database)
    app.add_exception_handler(queries.NotFoundError, _not_found)
    app.add_exception_handler(queries.InvalidInputError, _invalid)
    app.add_exception_handler(psycopg.OperationalError, _database_down)
    app.add_exception_handler(SchemaNotReadyError, _schema_not_ready)
    app.add_exception_handler(db.DatabaseNotConfiguredError, _not_configured)
    app.add_exception_handler(psycopg.errors.UndefinedTable, _schema_changed)
    app.add_exception_handler(psycopg.errors.UndefinedColumn, _schema_changed)
    app.add_exception_handler(AnswerError, _model_failed)
    app.add_exception_handler(LLMConfigurationError, _model_failed)
    app.add_exception_handler(Exception, _internal_error)
    return app


def _standalone_access(app: FastAPI, database: Database) -> None:
    """The rate limit and CORS of `blogqa serve` (settings read now when given, else at the
    first request would be too late for middleware: read them here)."""
    settings = database.settings
    if settings.api_rate_limit_per_minute > 0:
        limiter = access.RateLimiter(settings.api_rate_limit_per_minute, settings.api_rate_burst)
        app.add_middleware(access.RateLimitMiddleware, limiter=limiter)
    if settings.api_cors_origins:
        # outermost: refusals (429, 401) carry the CORS headers too, so a page can read them
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.api_cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
