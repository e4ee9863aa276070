"""`blogqa quality` and `blogqa quarantine`: the quality gate's results and the reviewer's
actions from a shell (the same actions as the DAG's review task in the Airflow UI)."""

from __future__ import annotations

import argparse
import json

from rich.markup import escape

from blogqa import db, sql_queries
from blogqa.config import Settings

SQL = sql_queries.load(__name__)  # queries/cli_quality.sql


def cmd_quality(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa import quality
    from blogqa.cli import err, out

    if args.docs:
        index = quality.build_docs(settings, args.run)
        out.print(f"Data Docs: {index}")
    with db.connect(settings) as conn:
        found = quality.summary(conn, args.run)
    if found is None:
        shown = f" for run {args.run}" if args.run else ""
        err.print(f"no quality results{escape(shown)}")
        return 1
    if args.json:
        out.print_json(json.dumps(found, default=str))
        return 0
    out.print(f"quality of run [bold]{escape(found['run_id'])}[/bold]")
    states = ", ".join(f"{s} {n}" for s, n in sorted(found["quarantined"].items()))
    out.print(f"documents quarantined in this run, by status now: {states or 'none'}")
    for e in found["expectations"]:
        mark = "[green]ok[/green]" if not e["failed"] else (
            "[red]FAILED[/red]" if e["blocking"] else "[yellow]warning[/yellow]"
        )  # fmt: skip
        ids = sorted(set(e["failing_ids"]))
        failing = f"; failing queue ids {ids[:20]}{' ...' if len(ids) > 20 else ''}" if ids else ""
        out.print(
            f"{mark} {e['level']} {e['suite']}: {e['expectation']} ({e['column'] or '-'}),"
            f" {e['passed']} passed, {e['failed']} failed{failing}",
            soft_wrap=True,
        )
    reasons = _reasons_of_run(settings, found["run_id"])
    for line in reasons:
        out.print(f"  {escape(line)}", soft_wrap=True)
    return 0


def _reasons_of_run(settings: Settings, run_id: str) -> list[str]:
    from blogqa import quarantine

    with db.connect(settings) as conn:
        rows = conn.execute(SQL.quarantined_by_run, (run_id,)).fetchall()
    return [
        f"{row_id} {status} {url}: {quarantine.describe(reasons or [])}"
        for row_id, url, status, reasons in rows
    ]


def cmd_quarantine(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa import quarantine
    from blogqa.cli import err, out
    from blogqa.urls import InvalidURLError

    with db.connect(settings) as conn:
        if args.action == "list":
            rows = quarantine.list_quarantined(conn)
            if args.json:
                out.print_json(json.dumps(rows, default=str))
                return 0
            if not rows:
                out.print("no quarantined documents")
                return 0
            out.print(f"{len(rows)} quarantined document(s)")
            for row in rows:
                out.print(
                    f"[bold]{row['id']}[/bold] run {escape(row['run_id'] or '-')}:"
                    f" {escape(row['url'])}\n    {escape(quarantine.describe(row['reasons'] or []))}",
                    soft_wrap=True,
                )
            return 0
        try:
            if args.action == "release":
                result = quarantine.release(
                    conn,
                    args.target,
                    embed_model=settings.embed_model,
                    embed_dim=settings.embed_dim,
                )
            elif args.action == "requeue":
                result = quarantine.requeue(conn, args.target)
            else:
                result = quarantine.drop(conn, args.target)
        except (quarantine.NotQuarantinedError, InvalidURLError) as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            return 1
    if args.json:
        out.print_json(json.dumps(result.as_dict()))
    else:
        out.print(
            f"{args.action}: queue id {result.id} ({escape(result.url)}) is now {result.status}"
        )
    return 0


def register(sub) -> None:
    """Add the commands to `blogqa`'s sub-parsers."""
    p = sub.add_parser("quality", help="quality results of a run (the latest by default)")
    p.add_argument("--run", metavar="RUN_ID", help="an Airflow run id")
    p.add_argument("--docs", action="store_true", help="(re)build the Data Docs first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("quarantine", help="documents held back by the quality gate")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("list", help="quarantined documents with their reasons")
    q.add_argument("--json", action="store_true")
    for name, text in (
        ("release", "load a quarantined document as it is"),
        ("requeue", "process a quarantined document again"),
        ("drop", "never load a quarantined document"),
    ):
        q = actions.add_parser(name, help=text)
        q.add_argument("target", metavar="ID", help="queue id or URL")
        q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quarantine)
