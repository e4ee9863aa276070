"""`blogqa export`: the question/answer dataset out of the database, for evaluation or
fine-tuning.

One row per stored question: the page's url and title, the question, its answer, the
supporting passage (the page's chunk nearest to the question, by the stored embeddings: the
text the answer should be grounded in), the chat model and prompt version that wrote the pair,
and when. Written through pandas as Parquet (pyarrow) or JSON Lines, in batches, so an export
of millions of rows needs the memory of one batch, not of the whole table.

`--since T` keeps questions written at or after T (an ISO date or timestamp; UTC when it has
no offset), for incremental exports.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg

from blogqa import db, sql_queries
from blogqa.config import Settings

log = logging.getLogger(__name__)
SQL = sql_queries.load(__name__)  # queries/export.sql

FORMATS = ("parquet", "jsonl")
BATCH_ROWS = 10_000
COLUMNS = (
    "url",
    "title",
    "question",
    "answer",
    "supporting_passage",
    "model",
    "prompt_version",
    "document_id",
    "position",
    "created_at",
)


def parse_since(text: str) -> dt.datetime:
    """An ISO date or timestamp; one without an offset is UTC."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO date or timestamp (e.g. 2026-11-01 or 2026-11-01T08:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def batches(conn: psycopg.Connection, since: dt.datetime | None) -> Iterator[list[tuple]]:
    """Rows of the dataset, BATCH_ROWS at a time, from a server-side cursor."""
    with conn.transaction(), conn.cursor(name="blogqa_export") as cur:
        cur.itersize = BATCH_ROWS
        cur.execute(SQL.dataset, {"since": since})
        while rows := cur.fetchmany(BATCH_ROWS):
            yield rows


def _frame(rows: list[tuple]):
    import pandas as pd

    frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    frame["document_id"] = frame["document_id"].astype("int64")
    frame["position"] = frame["position"].astype("int32")
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    return frame


def write(
    conn: psycopg.Connection, fmt: str, out: Path | None, since: dt.datetime | None = None
) -> int:
    """Write the dataset to `out` (None: JSON Lines on stdout); returns the rows written.
    An empty selection still writes a valid, empty file (with the schema, for Parquet)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        raise ValueError("parquet needs a file: give --out")
    total = 0
    if fmt == "jsonl":
        stream = sys.stdout if out is None else out.open("w", encoding="utf-8")
        try:
            for rows in batches(conn, since):
                frame = _frame(rows)
                text = frame.to_json(orient="records", lines=True, date_format="iso")
                stream.write(text if text.endswith("\n") else text + "\n")
                total += len(frame)
        finally:
            if out is not None:
                stream.close()
        return total
    import pyarrow.parquet as pq

    schema = parquet_schema()
    # one schema for every batch: a batch whose titles are all missing would otherwise infer
    # a null column that the next batch's strings do not match
    with pq.ParquetWriter(out, schema) as writer:
        for rows in batches(conn, since):
            writer.write_table(_table(rows, schema))
            total += len(rows)
    return total


def parquet_schema():
    import pyarrow as pa

    text = pa.string()
    return pa.schema(
        [
            *((name, text) for name in COLUMNS[:7]),
            ("document_id", pa.int64()),
            ("position", pa.int32()),
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def _table(rows: list[tuple], schema):
    import pyarrow as pa

    return pa.Table.from_pandas(_frame(rows), schema=schema, preserve_index=False)


def default_path(fmt: str) -> Path:
    return Path(f"blogqa-qa-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.{fmt}")


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """`blogqa export`: say where it wrote and how many rows (on stderr when the data goes to
    stdout)."""
    out = None if args.out == "-" else Path(args.out or default_path(args.format))
    if args.format == "parquet" and out is None:
        sys.stderr.write("error: parquet is binary: give a file with --out\n")
        return 2
    with db.connect(settings) as conn:
        rows = write(conn, args.format, out, args.since)
    where = "stdout" if out is None else str(out)
    log.info("export: %d rows to %s (stage export, url -)", rows, where)
    (sys.stderr if out is None else sys.stdout).write(f"wrote {rows} rows to {where}\n")
    return 0


def add_parser(sub) -> None:
    """Register `blogqa export` on the CLI's subparsers."""
    p = sub.add_parser(
        "export",
        help="write the question/answer dataset (url, title, question, answer, supporting"
        " passage, model) as Parquet or JSON Lines",
    )
    p.add_argument("--format", choices=FORMATS, default="parquet")
    p.add_argument(
        "--since", type=parse_since, help="questions written at or after this ISO date/time"
    )
    p.add_argument(
        "--out", help="output file (default blogqa-qa-<time>.<format>; '-' = stdout, jsonl only)"
    )
    p.set_defaults(func=cmd_export)
