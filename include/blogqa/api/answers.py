"""The API's answer flow (`POST /qa/ask`, `blogqa ask`): the one part of the API that calls a
model and writes.

`ask` embeds the question, reads the top-k chunks (`queries.ask_sources`, read-only), and has
the chat model answer from those chunks only (blogqa.answer). Its model calls are appended to
blogqa.llm_usage, stage 'ask', on a write-capable connection: the API's ledger pool
(`write_usage`) or, for the CLI, a short-lived connection (`record_usage`). Everything else the
API serves is a read in blogqa.api.queries.
"""

from __future__ import annotations

import dataclasses

import psycopg

from blogqa import answer as answering
from blogqa import search, store
from blogqa.api import models, queries
from blogqa.config import Settings
from blogqa.llm import ModelCall
from blogqa.store import usage_row


async def ask_answer(
    settings: Settings,
    request: models.AskRequest,
    chunks: list[search.ChunkMatch],
    embed_call: ModelCall,
    *,
    client=None,
) -> tuple[models.AskResponse, list[ModelCall]]:
    """The answer from the chunks only (the model part of `ask`, no database). `client`: the
    caller's reused AsyncOpenAI (see answer.answer_question)."""
    passages = [answering.Passage(c.title, c.url, c.text, c.score) for c in chunks]
    result = await answering.answer_question(settings, request.question, passages, client=client)
    calls = [dataclasses.replace(embed_call, stage=answering.STAGE), *result.calls]
    response = models.AskResponse(
        question=request.question,
        answer=result.text,
        model=result.model,
        provider=result.provider,
        sources=[
            models.Source(
                document_id=c.document_id,
                chunk_id=c.chunk_id,
                url=c.url,
                title=c.title,
                text=c.text,
                score=round(c.score, 6),
            )
            for c in chunks
        ],
        usage=models.Usage(
            prompt_tokens=sum(c.prompt_tokens for c in calls),
            completion_tokens=sum(c.completion_tokens for c in calls),
        ),
    )
    return response, calls


async def ask(
    conn: psycopg.AsyncConnection, settings: Settings, request: models.AskRequest
) -> tuple[models.AskResponse, list[ModelCall]]:
    """Top-k chunks for the question and an answer from those chunks only.

    Returns the response and the model calls made (query embedding and chat), all with
    stage 'ask', for the caller to write to the ledger with `write_usage`/`record_usage`.
    `conn` may be read-only: the search is the only database work.
    """
    vector, embed_call = await search.embed_query_async(settings, request.question)
    chunks = await queries.ask_sources(conn, settings, request, vector)
    return await ask_answer(settings, request, chunks, embed_call)


def _usage_insert_sql(rows: int) -> str:
    """The query store.SQL.usage_insert with `rows` rows of values: one statement, atomic on
    its own, so an autocommit connection writes the calls of a request in one round trip (no
    BEGIN, executemany, COMMIT)."""
    head, values, row = store.SQL.usage_insert.rpartition("VALUES")
    return f"{head}{values} {', '.join([row.strip()] * rows)}"


async def write_usage(conn: psycopg.AsyncConnection, calls: list[ModelCall]) -> None:
    """Append the ask calls to blogqa.llm_usage on a write-capable autocommit connection."""
    if not calls:
        return
    params = [value for call in calls for value in usage_row(call)]
    await conn.execute(_usage_insert_sql(len(calls)), params)


async def record_usage(dsn: str, calls: list[ModelCall]) -> None:
    """`write_usage` on a short-lived connection of its own (the CLI; the API uses its
    ledger pool)."""
    if not calls:
        return
    async with await psycopg.AsyncConnection.connect(
        dsn, application_name="blogqa-api-ledger", autocommit=True
    ) as conn:
        await write_usage(conn, calls)
