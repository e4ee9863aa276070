"""The `blogqa` command: init, enqueue, run, stats, requeue, cancel, errors, demo, and the
API's serve, questions, search, ask.

Works on its own (`.venv/bin/blogqa ...`): settings come from the environment, and Airflow's
home and metadata database are derived from BLOGQA_HOME when not set.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import re
import sys
from pathlib import Path

from psycopg import sql
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from blogqa import (
    cli_fresh,
    cli_quality,
    cli_vectors,
    db,
    export,
    queue,
    queue_admin,
    queue_stats,
    sql_queries,
)
from blogqa.config import DEFAULT_CHUNK_SIZE, Settings, load_settings
from blogqa.errors import BlogqaError
from blogqa.urls import InvalidURLError, normalize_url

out = Console(highlight=False)

SQL = sql_queries.load(__name__)  # queries/cli.sql
err = Console(stderr=True, highlight=False)
OUTPUT_TABLES = ("documents", "summaries", "questions", "chunks", "llm_usage", "url_queue")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_time=False, show_path=False)],
        force=True,
    )


INIT_DESCRIPTION = """\
Set up a deployment, in one step: apply the schema migrations to the results database,
create or resize the Airflow pool blogqa_llm (BLOGQA_LLM_POOL_SLOTS slots, through `airflow
pools set`), then check that the results database and the model endpoint answer.

Exit status: 0 when ready; 1 when a step or the database check failed (with --strict, also
when the endpoint check failed); 2 for invalid settings."""


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Every step runs and reports even when an earlier one failed, so one run shows every
    problem; the exit status says whether the deployment is ready."""
    from blogqa import checks

    steps_ok = True
    if not args.check:
        schema_ok = _init_schema(settings)
        pool_ok = _init_pool(settings)  # also after a failed migration: Airflow's own database
        steps_ok = schema_ok and pool_ok
    database = checks.check_database(settings)
    endpoint = checks.check_endpoint(settings)
    for check in (database, endpoint):
        mark = "[green]ok[/green]" if check.ok else "[red]FAILED[/red]"
        if not check.used:
            mark = "[dim]none[/dim]"
        out.print(f"check: {check.name}: {mark} - {escape(check.detail)}", soft_wrap=True)
    if not endpoint.ok:
        effect = "init fails (--strict)" if args.strict else "not fatal without --strict"
        err.print(
            f"[yellow]warning:[/yellow] the model endpoint check failed ({effect}); summarize"
            " and embed tasks fail until it answers"
        )
    if not (steps_ok and database.ok) or (args.strict and not endpoint.ok):
        return 1
    return 0


def _init_schema(settings: Settings) -> bool:
    """Apply pending migrations; False (reported) when the database refuses."""
    import psycopg

    from blogqa import checks

    try:
        applied = db.migrate(settings)
    except psycopg.OperationalError as exc:
        err.print(
            "[red]error:[/red] schema migrations failed, the results database did not answer"
            f" ({escape(checks.first_line(exc))}): {checks.DATABASE_HINT}"
        )
        return False
    except (psycopg.Error, BlogqaError) as exc:
        err.print(
            f"[red]error:[/red] schema migrations failed: {escape(str(exc).strip())}; fix that,"
            " then run `blogqa init` again"
        )
        return False
    where = (
        f"embedded PostgreSQL in {settings.pgdata}" if settings.embedded else "configured server"
    )
    out.print(
        f"schema ready on the {where}; migrations applied now: {', '.join(applied) or 'none'}"
    )
    return True


def _init_pool(settings: Settings) -> bool:
    """Airflow's metadata schema, then the pool through Airflow's CLI; False (reported) when
    either fails."""
    from blogqa import runner

    try:
        runner.configure_airflow(settings, log_level="WARNING")
        runner.ensure_airflow_db()
        runner.ensure_pools(settings)
    except BlogqaError as exc:
        err.print(f"[red]error:[/red] Airflow pool {runner.LLM_POOL}: {escape(str(exc))}")
        return False
    out.print(f"Airflow pool {runner.LLM_POOL} has {settings.llm_pool_slots} slots")
    return True


def _read_urls(args: argparse.Namespace) -> list[str]:
    urls = list(args.urls)
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        urls += [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
    return urls


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    urls = _read_urls(args)
    if not urls:
        err.print(
            "no URLs given: pass them as arguments or with --file (one per line, - for stdin)"
        )
        return 2
    with db.connect(settings) as conn:
        result = queue.enqueue(
            conn, urls, priority=args.priority, force=args.force, max_attempts=settings.max_attempts
        )
    if args.json:
        out.print_json(json.dumps(result.as_dict()))
    else:
        summary = result.as_dict()
        out.print(
            f"{summary['new']} new, {summary['requeued']} re-queued, "
            f"{summary['already_queued']} already queued, {summary['already_done']} already "
            f"processed (use --force to redo), {len(result.rejected)} rejected"
        )
        for url, reason in result.rejected:
            out.print(f"  rejected {url!r}: {reason}")
    return 1 if result.rejected else 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa import runner

    runner.configure_airflow(settings, log_level=None if args.verbose else "WARNING")
    tally = runner.run_pipeline(
        settings, max_urls=args.max_urls, chunk_size=args.chunk_size, wait_seconds=args.wait
    )
    out.print(tally.line())
    return 1 if tally.failed_runs else 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    with db.connect(settings) as conn:
        stats = queue_stats.stats(conn)
    if args.json:
        out.print_json(json.dumps(stats))
        return 0
    table = Table(title="url_queue")
    table.add_column("status")
    table.add_column("count", justify="right")
    for status, count in stats["counts"].items():
        table.add_row(status, str(count))
    out.print(table)
    age = stats["oldest_queued_age_seconds"]
    out.print(f"oldest queued: {'-' if age is None else f'{age:.0f} s ago'}")
    return 0


# ---------------------------------------------------------------- operations

AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _since(text: str) -> dt.datetime:
    """--since: an ISO-8601 time (UTC when it has no offset) or an age like 30m, 2h, 1d."""
    match = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    try:
        if match:
            age = dt.timedelta(seconds=int(match.group(1)) * AGE_UNITS[match.group(2)])
            return dt.datetime.now(dt.UTC) - age
        value = dt.datetime.fromisoformat(text.strip())
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is too far back") from None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO-8601 time (e.g. 2025-01-31T12:00:00+00:00, UTC when no"
            " offset is given) nor an age like 30m, 2h, 1d (units s, m, h, d, w)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _utc(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat(timespec="seconds")


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    if not args.dead:
        err.print(
            "[red]error:[/red] only the redrive of dead rows is supported: pass --dead"
            " (optionally with --stage and --since); to redo other finished URLs use"
            " `blogqa enqueue --force URL`"
        )
        return 2
    with db.connect(settings) as conn:
        rows = queue_admin.requeue_dead(conn, stage=args.stage, since=args.since)
    if args.json:
        out.print_json(
            json.dumps(
                {
                    "requeued": len(rows),
                    "stage": args.stage,
                    "since": _utc(args.since),
                    "rows": [{"id": row_id, "url": url} for row_id, url in rows],
                }
            )
        )
        return 0
    filters = [f"stage {args.stage}"] if args.stage else []
    filters += [f"finished since {_utc(args.since)}"] if args.since else []
    shown = f" ({', '.join(filters)})" if filters else ""
    out.print(f"requeued {len(rows)} dead row(s){shown}; attempts reset, due now")
    for row_id, url in rows:
        out.print(f"  {row_id}  {escape(url)}")
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with db.connect(settings) as conn:
            result = queue_admin.cancel(conn, args.target)
    except queue_admin.QueueRowNotFoundError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    except InvalidURLError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    if args.json:
        out.print_json(json.dumps(result.as_dict()))
    elif result.cancelled:
        effect = (
            "its in-flight result will be discarded"
            if result.previous_status == "processing"
            else "it will not be processed"
        )
        out.print(
            f"cancelled queue id {result.id} ({escape(result.url)}), was"
            f" {result.previous_status}; {effect}"
        )
    else:
        out.print(
            f"nothing cancelled: queue id {result.id} ({escape(result.url)}) is {result.reason}"
        )
    return 0 if result.cancelled else 1


def cmd_errors(args: argparse.Namespace, settings: Settings) -> int:
    with db.connect(settings) as conn:
        rows = queue_admin.recent_errors(conn, args.limit)
    if args.json:
        items = [
            {**row, "updated_at": _utc(row["updated_at"]), "run_after": _utc(row["run_after"])}
            for row in rows
        ]
        out.print_json(json.dumps(items))
        return 0
    if not rows:
        out.print("no failures recorded")
        return 0
    # One record per failure rather than a table: URLs and reasons stay whole at any width.
    out.print(f"latest {len(rows)} failure(s), newest first (times in UTC)")
    for row in rows:
        retry = f", retry at {_utc(row['run_after'])}" if row["run_after"] else ""
        out.print(
            f"[bold]{row['id']}[/bold] {row['status']} at stage {row['stage'] or '-'}, attempt"
            f" {row['attempts']}/{row['max_attempts']}, {_utc(row['updated_at'])}{retry}:"
            f" {escape(row['url'])}\n    {escape(row['last_error'])}",
            soft_wrap=True,
        )
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa import demo, runner, search

    runner.configure_airflow(settings, log_level=None if args.verbose else "WARNING")
    with demo.serve_articles(args.port) as base_url:
        urls = demo.article_urls(base_url)
        with db.connect(settings) as conn:
            queue.enqueue(conn, urls, force=True, max_attempts=settings.max_attempts)
            calls_before = _model_calls(conn)
        out.print(f"serving {len(urls)} sample articles at {base_url}; running the pipeline DAG…")
        tally = runner.run_pipeline(settings, chunk_size=args.chunk_size)
    out.print(f"[bold]run:[/bold] {tally.line()}")
    if settings.offline:
        out.print("[yellow]provider: local (offline, deterministic extractive stand-in; no LLM)")
    with db.connect(settings) as conn:
        _print_counts(conn, calls_before)
        _print_example(conn, urls)
        vector = search.embed_query(settings, demo.DEMO_QUERY)
        matches = search.similar_documents(conn, vector, k=3, ef_search=settings.hnsw_ef_search)
    table = Table(title=f"top matches for {demo.DEMO_QUERY!r}")
    table.add_column("score", justify="right")
    table.add_column("title")
    table.add_column("url")
    for match in matches:
        table.add_row(f"{match.score:.3f}", match.title or "", match.url)
    out.print(table)
    return 1 if tally.failed_runs else 0


def _print_counts(conn, calls_before: int) -> None:
    table = Table(title="rows per table (schema blogqa)")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name in OUTPUT_TABLES:
        # the table is an identifier: composed with psycopg.sql, not a named query
        query = sql.SQL("SELECT count(*) FROM blogqa.{}").format(sql.Identifier(name))
        count = conn.execute(query).fetchone()[0]
        table.add_row(name, str(count))
    out.print(table)
    calls = _model_calls(conn) - calls_before
    out.print(f"model calls in this demo run: {calls} (0 when every page was unchanged)")


def _model_calls(conn) -> int:
    """Model requests in the ledger (an embedding request has a row per document it served)."""
    return conn.execute(SQL.model_calls).fetchone()[0]


def _print_example(conn, urls: list[str]) -> None:
    row = conn.execute(SQL.example_document, ([normalize_url(u) for u in urls],)).fetchone()
    if row is None:
        return
    title, url, summary, questions = row
    out.print(f"\n[bold]{title}[/bold]  ({url})\n[italic]summary:[/italic] {summary}")
    for n, pair in enumerate(questions, 1):
        out.print(f"  Q{n}. {pair['question']}\n      A: {pair['answer']}")
    out.print()


# ---------------------------------------------------------------- the embedded database


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    """The embedded PostgreSQL's lifetime, for a scheduler, the API and SQL tools."""
    from blogqa import embedded

    if args.action in ("start", "stop", "psql") and not settings.embedded:
        err.print(
            f"[red]error:[/red] `blogqa db {args.action}` manages the embedded PostgreSQL, but"
            " BLOGQA_DATABASE_URL (or the Airflow connection blogqa_db) points at another"
            " server; unset it to use the embedded one"
        )
        return 2
    if args.action == "start":
        embedded.start(settings)
        out.print(f"embedded PostgreSQL running in {settings.pgdata} until `blogqa db stop`")
        out.print(f"BLOGQA_DATABASE_URL={db.database_dsn(settings)}", soft_wrap=True)
        return 0
    if args.action == "stop":
        stopped = embedded.stop(settings)
        out.print("stopped" if stopped else f"not running ({settings.pgdata})")
        return 0
    if args.action == "url":
        out.print(db.database_dsn(settings), soft_wrap=True)
        return 0
    if args.action == "psql":
        dsn = db.database_dsn(settings)
        os.execv(embedded.psql_path(), ["psql", dsn, *args.psql_args])
    status = embedded.status(settings)
    if not settings.embedded:
        out.print("configured server (not embedded): " + _redacted(settings.database_url or ""))
        return 0
    if not status.running:
        out.print(f"not running ({status.pgdata}); start it with `blogqa db start`")
        return 3
    lifetime = "kept running" if status.kept else "stops with the last blogqa command using it"
    out.print(f"running, pid {status.pid}, {lifetime}\n{status.uri}", soft_wrap=True)
    return 0


def _redacted(dsn: str) -> str:
    return re.sub(r"(password=|://[^:/@]*:)[^@\s]*", r"\1***", dsn)


def cmd_airflow(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa import local_airflow

    return local_airflow.serve(settings, port=args.port)


# ---------------------------------------------------------------- the results API


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from blogqa.api import create_app

    db.migrate(settings)
    if args.workers > 1:  # each worker process builds its own app and pool from the environment
        uvicorn.run(
            "blogqa.api.app:create_app",
            factory=True,
            workers=args.workers,
            host=args.host,
            port=args.port,
            log_level="info",
            access_log=args.access_log,
        )
    else:
        uvicorn.run(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_level="info",
            access_log=args.access_log,
        )
    return 0


async def _read_only(settings: Settings, work):
    """Run `work(conn)` on a read-only async connection, as the API's pool does."""
    import psycopg
    from pgvector.psycopg import register_vector_async

    dsn = db.database_dsn(settings)
    db.migrate(settings)
    async with await psycopg.AsyncConnection.connect(
        dsn, application_name="blogqa-cli", autocommit=True
    ) as conn:
        await conn.execute("SET default_transaction_read_only = on")
        await register_vector_async(conn)
        return await work(conn), dsn


def _invalid_input(exc: ValidationError) -> int:
    for problem in exc.errors():
        err.print(
            f"[red]error:[/red] {problem['loc'][-1] if problem['loc'] else 'input'}: "
            f"{problem['msg']}"
        )
    return 2


def _print_model(model) -> None:
    out.print_json(model.model_dump_json(by_alias=True))


def cmd_questions(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa.api import queries

    try:
        doc, _ = asyncio.run(_read_only(settings, lambda c: queries.get_document(c, url=args.url)))
    except (queries.NotFoundError, queries.InvalidInputError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    if args.json:
        _print_model(doc)
        return 0
    out.print(f"[bold]{doc.title or doc.url}[/bold]  ({doc.url})")
    if doc.summary is not None:
        out.print(f"[italic]summary:[/italic] {doc.summary.summary}")
    for n, item in enumerate(doc.questions, 1):
        out.print(f"  Q{n}. {item.question}\n      A: {item.answer}")
    return 0


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa import search
    from blogqa.api import models, queries

    try:
        request = models.SimilarRequest(text=args.text, k=args.k)
    except ValidationError as exc:
        return _invalid_input(exc)

    async def work():
        # the model call first, as the API does: queries.similar only reads
        vector, _ = await search.embed_query_async(settings, request.text)
        return await _read_only(
            settings, lambda c: queries.similar(c, settings, request, vector=vector)
        )

    result, _ = asyncio.run(work())
    if args.json:
        _print_model(result)
        return 0
    table = Table(title=f"documents most similar to {args.text!r}")
    table.add_column("score", justify="right")
    table.add_column("title")
    table.add_column("url")
    for match in result.results:
        table.add_row(f"{match.score:.3f}", match.title or "", match.url)
    out.print(table)
    return 0


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa.api import answers, models

    try:
        request = models.AskRequest(question=args.question, k=args.k)
    except ValidationError as exc:
        return _invalid_input(exc)

    async def work():
        (response, calls), dsn = await _read_only(
            settings, lambda c: answers.ask(c, settings, request)
        )
        await answers.record_usage(dsn, calls)
        return response

    response = asyncio.run(work())
    if args.json:
        _print_model(response)
        return 0
    out.print(f"[bold]{response.answer}[/bold]")
    if response.provider == "local":
        out.print("[yellow](offline provider: extractive answer, no LLM)")
    for n, source in enumerate(response.sources, 1):
        out.print(f"  [{n}] {source.score:.3f} {source.title or ''}  {source.url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blogqa", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show INFO logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "init",
        help="set up a deployment: schema, Airflow pool, database and model endpoint checks",
        description=INIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--check", action="store_true", help="only the checks: change nothing (readiness probe)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when the model endpoint check fails too. Off by default: the endpoint is"
        " often set up after the database or reachable only from the workers, and the pipeline"
        " rides out an endpoint outage (retries, circuit breaker), so a failed endpoint check"
        " is a warning, not a failed set-up",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("enqueue", help="add URLs to the queue")
    p.add_argument("urls", nargs="*", metavar="URL")
    p.add_argument("--file", help="file with one URL per line (- for stdin)")
    p.add_argument("--priority", type=int, default=0, help="higher is claimed first")
    p.add_argument("--force", action="store_true", help="re-queue URLs already processed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("run", help="run the pipeline DAG until the queue is drained")
    p.add_argument("--max-urls", type=_positive, default=None, help="stop after this many URLs")
    p.add_argument(
        "--chunk-size",
        type=_positive,
        default=DEFAULT_CHUNK_SIZE,
        help=f"URLs per mapped chunk (default {DEFAULT_CHUNK_SIZE})",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when every remaining row is waiting (retry backoff, circuit breaker, a dead "
        "worker's lease), wait up to this long for the next one instead of stopping",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stats", help="queue counts per status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("requeue", help="put dead rows back in the queue (redrive)")
    p.add_argument(
        "--dead", action="store_true", help="requeue rows in status dead (the only redrive)"
    )
    p.add_argument("--stage", choices=queue_admin.FAILURE_STAGES, help="only rows that died at it")
    p.add_argument(
        "--since",
        type=_since,
        metavar="T",
        help="only rows that died at or after T: ISO-8601 (UTC without an offset) or an age"
        " like 30m, 2h, 1d",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_requeue)

    p = sub.add_parser("cancel", help="cancel a queued or processing URL; it is never processed")
    p.add_argument("target", metavar="ID|URL", help="queue id, or URL as enqueued")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("errors", help="latest failures with their reason")
    p.add_argument(
        "--limit",
        type=_at_most(queue_admin.MAX_ERRORS_LIMIT),
        default=20,
        help=f"rows to show (<= {queue_admin.MAX_ERRORS_LIMIT}, default 20)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_errors)

    p = sub.add_parser("demo", help="run the pipeline on the bundled sample articles, offline")
    p.add_argument("--port", type=int, default=None, help="port for the sample site")
    p.add_argument("--chunk-size", type=_positive, default=5)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "db", help="the embedded PostgreSQL: start (keep running), stop, status, url, psql"
    )
    p.add_argument("action", choices=("start", "stop", "status", "url", "psql"))
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="passed to psql")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser(
        "airflow",
        help="a local Airflow (api-server, scheduler, dag-processor, triggerer, LocalExecutor)"
        " with the DAG and the plugin, on the embedded database, until Ctrl-C",
    )
    p.add_argument("--port", type=_positive, default=8080, help="api-server port (UI and API)")
    p.set_defaults(func=cmd_airflow)

    p = sub.add_parser("serve", help="run the read-only results API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive, default=8000)
    p.add_argument("--workers", type=_positive, default=1, help="uvicorn worker processes")
    p.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="no log line per request (saves CPU on every request)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("questions", help="summary and questions stored for a URL")
    p.add_argument("url", metavar="URL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_questions)

    p = sub.add_parser("search", help="documents most similar to a text")
    p.add_argument("text")
    p.add_argument("--k", type=_at_most(100), default=10, help="number of documents (<= 100)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="answer a question from the stored chunks")
    p.add_argument("question")
    p.add_argument("--k", type=_at_most(20), default=5, help="chunks to answer from (<= 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ask)

    export.add_parser(sub)  # blogqa export (export.py)
    cli_quality.register(sub)  # blogqa quality, blogqa quarantine (cli_quality.py)
    cli_fresh.register(sub)  # blogqa reprocess, blogqa sources (cli_fresh.py)
    cli_vectors.register(sub)  # blogqa vectors (cli_vectors.py)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _at_most(maximum: int):
    def parse(text: str) -> int:
        value = _positive(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "demo":
            # the sample site is on loopback, which the crawler refuses by default
            os.environ.setdefault("BLOGQA_CRAWL_ALLOW_PRIVATE", "true")
        settings = db.resolve(load_settings())
        return args.func(args, settings)
    except BlogqaError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
