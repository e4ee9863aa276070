"""`blogqa vectors`: embedding vector sets from a shell (blogqa.vector_sets).

    blogqa vectors list
    blogqa vectors create --model text-embedding-3-large --dim 1024
    blogqa vectors build 2      # embed what set 2 lacks, build its indexes (resumable)
    blogqa vectors build 2 --switch   # ... and switch to it once it is complete
    blogqa vectors switch 2     # make it the active set, which the API serves at once
    blogqa vectors drop 1       # remove the retired set's columns

These commands skip the start-up check that BLOGQA_EMBED_MODEL/BLOGQA_EMBED_DIM name the
active set: they are how it changes. `--json` prints what they did as JSON.
"""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from blogqa import db
from blogqa.config import Settings


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _set_dict(vector_set) -> dict:
    return {
        "id": vector_set.id,
        "embed_model": vector_set.embed_model,
        "embed_dim": vector_set.embed_dim,
        "state": vector_set.state,
        "created_at": vector_set.created_at.isoformat(),
        "built_at": vector_set.built_at.isoformat() if vector_set.built_at else None,
        "switched_at": vector_set.switched_at.isoformat() if vector_set.switched_at else None,
    }


def _missing_text(counts: dict[str, tuple[int, int]]) -> str:
    return ", ".join(
        f"{table} {total - lacking}/{total}" for table, (lacking, total) in counts.items()
    )


def _list(conn, args: argparse.Namespace, out) -> None:
    from blogqa import vector_sets

    rows = []
    for vector_set in vector_sets.list_sets(conn):
        counts = vector_sets.missing(conn, vector_set) if vector_set.state != "dropped" else {}
        rows.append((vector_set, counts))
    if args.json:
        payload = [
            {**_set_dict(s), "embedded": {t: total - n for t, (n, total) in c.items()}}
            for s, c in rows
        ]
        out.print_json(json.dumps(payload))
        return
    table = Table("id", "state", "model", "dim", "embedded", "built", "switched")
    for vector_set, counts in rows:
        table.add_row(
            str(vector_set.id),
            vector_set.state,
            vector_set.embed_model or "",
            str(vector_set.embed_dim),
            _missing_text(counts),
            _when(vector_set.built_at),
            _when(vector_set.switched_at),
        )
    out.print(table)


def _create(conn, args: argparse.Namespace, settings: Settings) -> tuple[dict, str]:
    from blogqa import vector_sets

    made = vector_sets.create(conn, args.model, args.dim)
    message = (
        f"set {made.id} created ({made.embed_model}, {made.embed_dim} dimensions); "
        f"`blogqa vectors build {made.id}` embeds it"
    )
    return _set_dict(made), message


def _build(conn, args: argparse.Namespace, settings: Settings) -> tuple[dict, str]:
    from blogqa import vector_sets

    report = vector_sets.build(conn, settings, args.set_id)
    result = {
        **_set_dict(report.vector_set),
        "embedded_now": report.embedded,
        "requests": report.requests,
        "prompt_tokens": report.prompt_tokens,
    }
    message = (
        f"set {args.set_id}: {sum(report.embedded.values())} vectors embedded in "
        f"{report.requests} requests; {_missing_text(report.missing)} embedded; indexes built."
    )
    if not args.switch:
        return result, f"{message} `blogqa vectors switch {args.set_id}` makes it active"
    switched, said = _switch(conn, args, settings)
    return {"build": result, "switch": switched}, f"{message}\n{said}"


def _switch(conn, args: argparse.Namespace, settings: Settings) -> tuple[dict, str]:
    from blogqa import vector_sets

    report = vector_sets.switch(conn, settings, args.set_id)
    current, previous = report.current, report.previous
    result = {
        "active": _set_dict(current),
        "retired": _set_dict(previous),
        "caught_up": sum(report.caught_up.embedded.values()),
    }
    message = (
        f"set {current.id} ({current.embed_model}, {current.embed_dim} dimensions) is active; "
        f"set {previous.id} is retired. Where the pipeline runs, set BLOGQA_EMBED_MODEL="
        f"{current.embed_model} BLOGQA_EMBED_DIM={current.embed_dim}; "
        f"`blogqa vectors drop {previous.id}` frees the old set's space"
    )
    return result, message


def _drop(conn, args: argparse.Namespace, settings: Settings) -> tuple[dict, str]:
    from blogqa import vector_sets

    dropped = vector_sets.drop(conn, args.set_id)
    return _set_dict(dropped), f"set {dropped.id} ({dropped.embed_model}) dropped"


ACTIONS = {"create": _create, "build": _build, "switch": _switch, "drop": _drop}


def cmd_vectors(args: argparse.Namespace, settings: Settings) -> int:
    from blogqa.cli import out

    with db.connect(settings, check_vectors=False) as conn:
        if args.action == "list":
            _list(conn, args, out)
            return 0
        result, message = ACTIONS[args.action](conn, args, settings)
    if args.json:
        out.print_json(json.dumps(result))
    else:
        out.print(message)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from blogqa.cli import _at_most, _positive

    p = sub.add_parser(
        "vectors",
        help="embedding vector sets: embed a new model beside the active one, switch, drop",
    )
    actions = p.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the sets, their state and how much is embedded")
    listing.add_argument("--json", action="store_true")
    create = actions.add_parser("create", help="a new set for another model or dimension")
    create.add_argument("--model", required=True, help="the embedding model")
    create.add_argument("--dim", type=_at_most(2000), required=True, help="its dimension (1-2000)")
    create.add_argument("--json", action="store_true")
    for name, text in (
        ("build", "embed what the set lacks and build its indexes (resumable)"),
        ("switch", "make the set the active one (API and SQL users read it at once)"),
        ("drop", "remove a retired or building set's columns"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("set_id", type=_positive, metavar="ID")
        action.add_argument("--json", action="store_true")
        if name == "build":
            action.add_argument(
                "--switch", action="store_true", help="switch to the set once it is built"
            )
    p.set_defaults(func=cmd_vectors)
