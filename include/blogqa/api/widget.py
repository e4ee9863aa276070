"""The publisher widget: `GET /widget.js` and the two routes it calls.

A blog adds one tag, `<script src="https://api.example.com/widget.js" async></script>`, and its
pages show their questions and answers (collapsible) and an "ask about this article" box. The
script is static, dependency-free and talks only to the API it was loaded from.

Scope: read-only and one page at a time. `GET /widget/v1/page?url=` gives a page's title and
questions (what /api/v1/questions/by-url already exposes, less its internals);
`POST /widget/v1/ask` answers from that page's chunks only (exact search within the document,
never the whole corpus), so no other page's text leaves through it. Standalone these routes
need no token (a reader's browser has none) and are rate-limited per client; the rest of the
API keeps its bearer token. Inside Airflow they are behind Airflow's authorization like every
other route: publishers serve the widget from `blogqa serve`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import psycopg
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from psycopg.rows import dict_row

from blogqa import answer as answering
from blogqa import search, sql_queries
from blogqa.api import models
from blogqa.api.queries import NotFoundError, normalized

STATIC = Path(__file__).resolve().parent / "static"
PASSAGES = 4  # chunks of the page given to the answerer
SQL = sql_queries.load(__name__)  # queries/api/widget.sql


async def _one(conn: psycopg.AsyncConnection, query: str, params: dict) -> dict | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchone()


async def page(conn: psycopg.AsyncConnection, url: str) -> tuple[int, models.WidgetPage]:
    """(document id, widget view) of the page at `url` (or whose canonical URL it is)."""
    key = normalized(url)
    row = await _one(conn, SQL.page, {"url": key})
    if row is None:
        canonical = await _one(conn, SQL.canonical, {"url": key})
        if canonical is not None:
            row = await _one(conn, SQL.page, {"url": canonical["url"]})
    if row is None:
        raise NotFoundError(f"no questions for {key} (yet)")
    return row["id"], models.WidgetPage(
        url=row["url"], title=row["title"], questions=row["questions"]
    )


def script() -> bytes:
    return (STATIC / "widget.js").read_bytes()


public_router = APIRouter(tags=["widget"])


@public_router.get("/widget.js", include_in_schema=False)
async def widget_js() -> Response:
    """The widget script (static; cached by browsers for 5 minutes)."""
    return Response(
        script(),
        media_type="text/javascript; charset=utf-8",
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )


@public_router.get(
    "/widget/v1/page",
    response_model=models.WidgetPage,
    responses={404: {"model": models.ErrorBody, "description": "no document for this URL"}},
)
async def widget_page(
    request: Request, url: Annotated[str, Query(min_length=1, max_length=2048)]
) -> models.WidgetPage:
    """The page's title and questions with answers, for the widget."""
    async with request.app.state.database.connection() as conn:
        _, found = await page(conn, url)
    return found


@public_router.post(
    "/widget/v1/ask",
    response_model=models.WidgetAnswer,
    responses={404: {"model": models.ErrorBody, "description": "no document for this URL"}},
)
async def widget_ask(request: Request, body: models.WidgetAskRequest) -> models.WidgetAnswer:
    """Answer a reader's question from this page's chunks only. The model calls are recorded
    in blogqa.llm_usage (stage 'ask') like the API's own answers."""
    database = request.app.state.database
    settings = database.settings
    clients = request.app.state.model_clients
    async with database.connection() as conn:
        document_id, _ = await page(conn, body.url)

    async def passages_for(search_settings) -> tuple:
        # the model call runs without holding a pooled connection
        vector, embed_call = await search.embed_query_async(
            search_settings, body.question, client=clients.embed(search_settings)
        )
        async with database.connection() as conn:
            found = await search.document_chunks_async(conn, vector, document_id, PASSAGES)
        return found, embed_call

    chunks, embed_call = await database.search_with(passages_for)
    passages = [answering.Passage(c.title, c.url, c.text, c.score) for c in chunks]
    result = await answering.answer_question(
        settings, body.question, passages, client=clients.chat(settings)
    )
    await database.record_usage(
        [dataclasses.replace(embed_call, stage=answering.STAGE), *result.calls]
    )
    return models.WidgetAnswer(
        answer=result.text,
        model=result.model,
        provider=result.provider,
        passages=[models.WidgetPassage(position=c.position, text=c.text) for c in chunks],
    )
