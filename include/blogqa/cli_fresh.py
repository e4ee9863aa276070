"""`blogqa reprocess` and `blogqa sources`: keeping the outputs fresh from a shell.

`reprocess` flags stored documents for the stages a change made stale (blogqa.reprocess);
the next run (`blogqa run`, the nightly DAG) does the work. `sources` keeps the feeds,
sitemaps and sites that the nightly run polls for new URLs (blogqa.sources).
"""

from __future__ import annotations

import argparse
import json

from rich.markup import escape
from rich.table import Table

from blogqa import db
from blogqa.config import Settings


def cmd_reprocess(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa import reprocess
    from blogqa.cli import out
    from blogqa.llm import PROMPT_VERSION

    with db.connect(settings) as conn:
        result = reprocess.requeue(
            conn,
            args.cause,
            chat_model=settings.chat_model,
            prompt_version=PROMPT_VERSION,
            embed_model=settings.embed_model,
            since=args.since,
            until=args.until,
            force=args.force,
            limit=args.limit,
            dry_run=args.dry_run,
        )
    if args.json:
        out.print_json(json.dumps(result.as_dict()))
        return 0
    verb = "would be" if args.dry_run else "were"
    out.print(
        f"cause {result.cause}: {len(result.requeued)} requeued, {len(result.flagged)} already"
        f" queued {verb} flagged, {result.in_progress} being processed left alone"
        + (" (dry run: nothing changed)" if args.dry_run else "; `blogqa run` does the work")
    )
    return 0


def cmd_sources(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa import sources
    from blogqa.cli import err, out

    with db.connect(settings) as conn:
        if args.action == "add":
            try:
                source = sources.add(conn, args.url, kind=args.kind, max_per_poll=args.max_per_poll)
            except sources.SourceError as exc:
                err.print(f"[red]error:[/red] {escape(str(exc))}")
                return 2
            if args.json:
                out.print_json(json.dumps(source, default=str))
            else:
                out.print(f"source {source['id']}: {escape(source['url'])} ({source['kind']})")
            return 0
        if args.action == "remove":
            removed = sources.remove(conn, args.target)
            if not removed:
                err.print(f"no source matches {escape(args.target)!r}")
                return 1
            out.print(f"removed source {escape(args.target)}")
            return 0
        if args.action == "poll":
            results = sources.poll_all(settings)
            if args.json:
                out.print_json(json.dumps([r.as_dict() for r in results]))
            else:
                for r in results:
                    out.print(
                        f"{escape(r.url)}: {r.status}, {r.found} listed, {r.enqueued} enqueued"
                        + (f" ({escape(r.error)})" if r.error else "")
                    )
            return 0
        rows = sources.list_sources(conn)
    if args.json:
        out.print_json(json.dumps(rows, default=str))
        return 0
    table = Table("id", "kind", "url", "max/poll", "last polled", "status", "found", "enqueued")
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["kind"],
            escape(row["url"]),
            str(row["max_per_poll"]),
            str(row["last_polled_at"] or "-"),
            escape(row["last_status"] or "-"),
            str(row["last_found"] if row["last_found"] is not None else "-"),
            str(row["last_enqueued"] if row["last_enqueued"] is not None else "-"),
        )
    out.print(table)
    return 0


def register(sub) -> None:
    """Add the commands to `blogqa`'s sub-parsers."""
    from blogqa.cli import _since
    from blogqa.reprocess import CAUSES

    p = sub.add_parser(
        "reprocess",
        help="redo the stages a change made stale (summaries: prompt or chat model changed;"
        " embeddings: embedding model changed; all: every stage, refetching)",
    )
    p.add_argument("--cause", choices=CAUSES, required=True)
    p.add_argument(
        "--since", type=_since, help="documents first fetched at or after (ISO time or 7d)"
    )
    p.add_argument("--until", type=_since, help="documents first fetched before")
    p.add_argument(
        "--force",
        action="store_true",
        help="every document of the window, not only those whose stored rows are stale",
    )
    p.add_argument("--limit", type=int, default=1_000_000, help="most documents to requeue")
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reprocess)

    p = sub.add_parser("sources", help="feeds, sitemaps and sites polled for new URLs")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("add", help="follow a feed, sitemap or site")
    a.add_argument("url")
    a.add_argument("--kind", choices=("feed", "sitemap", "site"), default="site")
    a.add_argument("--max-per-poll", type=int, default=100, help="most URLs one poll enqueues")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("list", help="the sources and their last poll")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("remove", help="stop following a source")
    a.add_argument("target", metavar="ID_OR_URL")
    a = actions.add_parser("poll", help="poll every source now and enqueue what is new")
    a.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sources)
