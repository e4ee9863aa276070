"""The quality gate: Great Expectations suites over a chunk's results before load, and over a
run's tables after it; their results for SQL (blogqa.quality_results) and for people (Data
Docs under $BLOGQA_HOME/quality).

The suites are JSON files (blogqa/expectations/*.json, or the folder BLOGQA_EXPECTATIONS_DIR
names) that users edit: thresholds in the expectations' kwargs, `meta.blocking` (a failing
document is quarantined; false: a warning is recorded), `meta.enabled` (false: left out),
`meta.reason` (what a reviewer reads). The chunk suites see pandas frames built here from the
work items (one row per document, per question/answer pair, per vector), so a derived value
such as an answer's support by the page is a column the suite puts a threshold on.

Great Expectations takes seconds to import, so it is imported on first use only (never at
DAG parse time) with its analytics off and its progress bars silenced.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from blogqa import sql_queries
from blogqa.config import Settings, _env_bool, _env_float, _env_int
from blogqa.errors import BlogqaError
from blogqa.text import STOPWORDS

log = logging.getLogger(__name__)

SQL = sql_queries.load(__name__)  # queries/quality.sql

CHUNK_SUITES = ("documents", "questions", "vectors")
TABLE_SUITE = "run_tables"
TABLE_MAP_INDEX = -1  # quality_results.map_index of a run's table-level validation
EXPECTATIONS_ENV = "BLOGQA_EXPECTATIONS_DIR"
DOCS_SITE = "local_site"
# The Data Docs keep the results of this many runs (BLOGQA_QUALITY_DOCS_RUNS): a month of
# nightly runs. GX's index build reads every result the site keeps, so without a bound the
# end of every run grew with the history (2.6 ms per result kept: bench/README.md).
DEFAULT_DOCS_RUNS = 30


class QualityConfigError(BlogqaError):
    """An expectation suite file is unreadable, or one of its expectations could not be
    evaluated (a misspelt column or type): the gate cannot judge, so the task fails."""


class TableValidationError(BlogqaError):
    """The run's tables failed a blocking table-level expectation."""


@dataclass(frozen=True)
class QualitySettings:
    """The gate's settings (read where the task runs, like every BLOGQA_* variable)."""

    expectations_dir: Path | None
    review: bool
    review_timeout: float
    docs_runs: int  # runs whose results the Data Docs site keeps (build_docs)

    @classmethod
    def load(cls) -> QualitySettings:
        folder = os.environ.get(EXPECTATIONS_ENV, "").strip()
        return cls(
            expectations_dir=Path(folder).expanduser() if folder else None,
            review=_env_bool("BLOGQA_REVIEW", True),
            review_timeout=_env_float("BLOGQA_REVIEW_TIMEOUT", 3600.0, minimum=1.0),
            docs_runs=_env_int("BLOGQA_QUALITY_DOCS_RUNS", DEFAULT_DOCS_RUNS, maximum=100_000),
        )


# ---------------------------------------------------------------- suites


def suite_file(name: str, folder: Path | None = None) -> Path:
    """Where suite `name` is read from: BLOGQA_EXPECTATIONS_DIR when set, else the package."""
    folder = folder or QualitySettings.load().expectations_dir
    if folder is not None:
        return folder / f"{name}.json"
    return Path(str(resources.files("blogqa") / "expectations" / f"{name}.json"))


def load_suite(name: str, folder: Path | None = None) -> dict:
    """Suite `name` as GX's JSON form, with the disabled expectations left out."""
    path = suite_file(name, folder)
    try:
        suite = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QualityConfigError(f"expectation suite {path}: {exc}") from None
    expectations = suite.get("expectations")
    if not isinstance(expectations, list):
        raise QualityConfigError(f"expectation suite {path}: no list of expectations")
    suite["expectations"] = [
        e for e in expectations if (e.get("meta") or {}).get("enabled", True) is not False
    ]
    suite.setdefault("name", name)
    return suite


# ---------------------------------------------------------------- Great Expectations


@cache
def gx():
    """The great_expectations module, imported once per process: no usage analytics (no
    network call), its import-time deprecation noise kept out of the task log."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    # before the import: it logs a line per API function it registers
    for name in ("great_expectations", "great_expectations._docs_decorators"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations

    return great_expectations


def preload() -> None:
    """Import Great Expectations now (a few seconds): for a process that forks the tasks."""
    gx()


def import_in_background() -> threading.Thread:
    """Start importing Great Expectations in a thread (join it before validating): a task
    that first waits seconds for model responses gets the import done meanwhile. A failed
    import is not raised here; the validation's own `gx()` call raises it."""

    def run() -> None:
        with contextlib.suppress(Exception):  # not cached: gx() raises it again when called
            gx()

    thread = threading.Thread(target=run, name="gx-import", daemon=True)
    thread.start()
    return thread


def _quiet(context) -> None:
    """No progress bars ("Calculating Metrics: ...") in task logs."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)


def ephemeral_context():
    context = gx().get_context(mode="ephemeral")
    _quiet(context)
    return context


def _suite_object(name: str, parameters: dict):
    from great_expectations.core import ExpectationSuite

    data = load_suite(name)
    try:
        return ExpectationSuite(
            **{k: data[k] for k in ("name", "expectations", "notes", "meta") if k in data}
        )
    except Exception as exc:  # noqa: BLE001 - GX raises many kinds for a bad suite
        raise QualityConfigError(f"expectation suite {suite_file(name)}: {exc}") from None


RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": ["queue_id"]}


def _validate_batch(batch, name: str, parameters: dict):
    suite = _suite_object(name, parameters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return batch.validate(suite, expectation_parameters=parameters, result_format=RESULT_FORMAT)


# ---------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """One expectation's result in one validation, reduced to what SQL and reviewers need."""

    suite: str
    expectation: str
    column: str | None
    blocking: bool
    success: bool
    reason: str
    kwargs: dict
    observed: Any  # the aggregate observed value, or a sample of unexpected values
    failing: dict[int, list]  # queue id -> its unexpected values (row-level expectations)

    def reason_for(self, queue_id: int) -> dict:
        """The failure as recorded on a quarantined queue row."""
        observed = self.failing.get(queue_id, self.observed)
        limits = {k: v for k, v in self.kwargs.items() if k not in ("column", "batch_id")}
        return {
            "suite": self.suite,
            "expectation": self.expectation,
            "column": self.column,
            "reason": self.reason,
            "observed": observed,
            "expected": limits,
            "blocking": self.blocking,
        }


def _plain(value: Any) -> Any:
    """JSON-safe copy of GX/numpy values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _column(kwargs: dict) -> str | None:
    if "column" in kwargs:
        return kwargs["column"]
    for key in ("column_list", "column_A"):
        if key in kwargs:
            names = (
                kwargs[key] if key == "column_list" else [kwargs["column_A"], kwargs["column_B"]]
            )
            return ",".join(names)
    return None


def _raised(info) -> str | None:
    """The message of an exception GX caught while evaluating an expectation (its
    exception_info is either one such record or one per metric), else None."""
    if not isinstance(info, dict):
        return None
    records = [info] if "raised_exception" in info else list(info.values())
    for record in records:
        if isinstance(record, dict) and record.get("raised_exception"):
            return str(record.get("exception_message") or "unknown error")
    return None


def outcomes_of(name: str, result, all_ids: list[int]) -> list[Outcome]:
    """The suite result's expectations as Outcomes. A failing expectation without row-level
    results (a table-wide one a user added) fails every row of the batch. An expectation that
    raised is a broken suite, not bad data: QualityConfigError."""
    found = []
    for r in result.results:
        config = r.expectation_config
        problem = _raised(r.exception_info)
        if problem is not None:
            raise QualityConfigError(
                f"expectation {config.type} {dict(config.kwargs)} of suite {name} could not "
                f"be evaluated: {problem}"
            )
        details = r.result or {}
        meta = config.meta or {}
        kwargs = _plain(dict(config.kwargs))
        column = _column(kwargs)
        failing: dict[int, list] = {}
        rows = details.get("unexpected_index_list")
        if not r.success:
            if rows:
                for row in rows:
                    key = int(row["queue_id"])
                    value = {k: v for k, v in row.items() if k != "queue_id"}
                    values = list(value.values())
                    failing.setdefault(key, []).append(
                        _plain(values[0] if len(values) == 1 else value)
                    )
            elif not details.get("unexpected_list"):
                failing = {i: [] for i in all_ids}
        observed = details.get("observed_value")
        if observed is None and not r.success:
            observed = details.get("partial_unexpected_list")
        found.append(
            Outcome(
                suite=name,
                expectation=config.type,
                column=column,
                blocking=bool(meta.get("blocking", True)),
                success=bool(r.success),
                reason=str(meta.get("reason") or config.type),
                kwargs=kwargs,
                observed=_plain(observed),
                failing=failing,
            )
        )
    return found


@dataclass
class Validation:
    """One suite run: its outcomes and GX's whole result (JSON, for the Data Docs)."""

    suite: str
    success: bool
    outcomes: list[Outcome]
    result: dict


@dataclass
class Verdict:
    """What the gate decided for a chunk."""

    validations: list[Validation] = field(default_factory=list)

    def reasons(self, *, blocking: bool) -> dict[int, list[dict]]:
        """queue id -> its failed expectations (blocking ones, or the warnings)."""
        found: dict[int, list[dict]] = {}
        for validation in self.validations:
            for outcome in validation.outcomes:
                if outcome.success or outcome.blocking != blocking:
                    continue
                for queue_id in outcome.failing:
                    found.setdefault(queue_id, []).append(outcome.reason_for(queue_id))
        return found

    @property
    def quarantined(self) -> dict[int, list[dict]]:
        return self.reasons(blocking=True)

    @property
    def warnings(self) -> dict[int, list[dict]]:
        return self.reasons(blocking=False)


# ---------------------------------------------------------------- chunk frames

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")
_SUFFIXES = ("ingly", "edly", "ing", "ed", "ly")


def _stem(word: str) -> str:
    """A crude English stem (plural, -ing/-ed/-ly, final e): "feedings" and "feeding" meet at
    "feed", "doubled" and "double" at "doubl". Enough to match a paraphrase's words."""
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def content_stems(text: str) -> set[str]:
    """Crude stems of the text's content words (stopwords left out), for support scores.
    Each distinct word is stemmed once: a page repeats most of its words."""
    words = {t.lower() for t in _TOKEN.findall(text)} - STOPWORDS
    return {_stem(w) for w in words}


def support_score(answer: str, page_stems: set[str]) -> float:
    """Share of the answer's content words found in the page text (0 for an answer without
    any). A cheap test of "stated in the article": a paraphrase keeps most content words, an
    answer from outside knowledge keeps few."""
    words = [_stem(w) for w in (t.lower() for t in _TOKEN.findall(answer)) if w not in STOPWORDS]
    if not words:
        return 0.0
    return round(sum(w in page_stems for w in words) / len(words), 4)


def question_key(question: str) -> str:
    """A question as compared for repeats: case, spacing and punctuation ignored."""
    return " ".join(re.findall(r"\w+", question.lower()))


def frames(items: list, embed_dim: int) -> dict:
    """pandas frames of the suites: documents, questions (question/answer pairs), vectors."""
    import pandas as pd

    documents, questions, vectors = [], [], []
    for item in items:
        queue_id, page, llm = item.lease.id, item.page or {}, item.llm_result or {}
        text = page.get("text") or ""
        summary = (llm.get("summary") or "").strip()
        qa = llm.get("qa") or []
        documents.append(
            {
                "queue_id": queue_id,
                "url": item.lease.url,
                "text_words": len(text.split()),
                "language": page.get("language"),
                "summary": summary,
                "summary_words": len(summary.split()),
                "questions": len(qa),
            }
        )
        stems = content_stems(text)
        for position, pair in enumerate(qa):
            question, answer = (pair.get("question") or "").strip(), (pair.get("answer") or "")
            questions.append(
                {
                    "queue_id": queue_id,
                    "position": position,
                    "question": question,
                    "question_key": question_key(question),
                    "answer": answer.strip(),
                    "answer_support": support_score(answer, stems),
                }
            )
        matrix = item.vectors
        if matrix is not None:
            matrix = np.asarray(matrix, dtype=np.float64)
            kinds = ["summary"] + ["question"] * len(qa)
            kinds += ["chunk"] * (len(matrix) - len(kinds))
            finite = np.isfinite(matrix).all(axis=1)
            norms = np.linalg.norm(np.where(np.isfinite(matrix), matrix, 0.0), axis=1)
            for position, (kind, ok, norm) in enumerate(zip(kinds, finite, norms, strict=True)):
                vectors.append(
                    {
                        "queue_id": queue_id,
                        "kind": kind,
                        "position": position,
                        "dim": int(matrix.shape[1]),
                        "finite": bool(ok),
                        "norm": float(norm),
                    }
                )
    columns = {
        "documents": ["queue_id", "url", "text_words", "language", "summary", "summary_words",
                      "questions"],
        "questions": ["queue_id", "position", "question", "question_key", "answer",
                      "answer_support"],
        "vectors": ["queue_id", "kind", "position", "dim", "finite", "norm"],
    }  # fmt: skip
    rows = {"documents": documents, "questions": questions, "vectors": vectors}
    return {name: pd.DataFrame(rows[name], columns=columns[name]) for name in CHUNK_SUITES}


def validate_items(items: list, settings: Settings) -> Verdict:
    """Run the chunk suites over the work items' results (items without model results, the
    unchanged pages of a refresh, are not in `items`)."""
    verdict = Verdict()
    if not items:
        return verdict
    context = ephemeral_context()
    source = context.data_sources.add_pandas("chunk")
    parameters = {"embed_dim": settings.embed_dim}
    ids = [item.lease.id for item in items]
    for name, frame in frames(items, settings.embed_dim).items():
        if frame.empty:
            continue
        batch = (
            source.add_dataframe_asset(name)
            .add_batch_definition_whole_dataframe("chunk")
            .get_batch(batch_parameters={"dataframe": frame})
        )
        result = _validate_batch(batch, name, parameters)
        verdict.validations.append(
            Validation(name, bool(result.success), outcomes_of(name, result, ids),
                       _plain(result.to_json_dict()))
        )  # fmt: skip
    return verdict


# ---------------------------------------------------------------- results in PostgreSQL


def record(
    conn: psycopg.Connection,
    run_id: str,
    map_index: int,
    verdict: Verdict,
    *,
    replace: bool = True,
) -> None:
    """Write the validations of one chunk (or of one wave of it, or of the run's tables) in
    one transaction; with `replace`, in place of what (run_id, map_index) had (a retry)."""
    with conn.transaction():
        if replace:
            conn.execute(SQL.delete_results, (run_id, map_index))
            conn.execute(SQL.delete_validations, (run_id, map_index))
        with conn.cursor() as cur:
            cur.executemany(
                SQL.insert_result,
                [
                    (
                        run_id,
                        map_index,
                        o.suite,
                        o.expectation,
                        o.column,
                        o.blocking,
                        o.success,
                        Jsonb(o.observed),
                        sorted(o.failing),
                        Jsonb(o.kwargs),
                    )
                    for v in verdict.validations
                    for o in v.outcomes
                ],
            )
            cur.executemany(
                SQL.insert_validation,
                [
                    (run_id, map_index, v.suite, v.success, Jsonb(v.result))
                    for v in verdict.validations
                ],
            )


# ---------------------------------------------------------------- the run's tables


def sqlalchemy_url(dsn: str, scope: int) -> str:
    """A SQLAlchemy URL (psycopg 3 driver) for a libpq URL or key=value conninfo: every
    parameter goes in the query string, which the driver passes to psycopg.connect. Its
    sessions resolve unqualified names in schema blogqa (GX deprecates a table asset's
    schema_name) and see validation scope `scope` in blogqa.quality_run_documents."""
    from urllib.parse import urlencode

    from psycopg.conninfo import conninfo_to_dict

    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    extra = f"-c search_path=blogqa,public -c blogqa.quality_scope={int(scope)}"
    params["options"] = f"{params.get('options', '')} {extra}".strip()
    return "postgresql+psycopg:///?" + urlencode(params)


def validate_tables(settings: Settings, run_id: str, queue_ids: list[int]) -> Verdict:
    """The table-level suite over the documents this run loaded, read by GX through a SQL
    data source (the view blogqa.quality_run_documents, which shows the connection's scope),
    recorded with map_index -1. Returns the verdict; `blocking_failures` says whether it
    failed."""
    from blogqa import db

    dsn = db.database_dsn(settings)
    with db.connect(settings) as conn:
        with conn.transaction():
            scope = conn.execute(SQL.next_scope).fetchone()[0]
            loaded = conn.execute(SQL.fill_scope, (scope, queue_ids)).rowcount
        verdict = Verdict()
        try:
            if loaded:
                context = ephemeral_context()
                with warnings.catch_warnings():  # "a PostgresDatasource may be more appropriate"
                    warnings.simplefilter("ignore")
                    source = context.data_sources.add_sql(
                        "blogqa", connection_string=sqlalchemy_url(dsn, scope)
                    )
                    asset = source.add_table_asset(
                        "run_documents", table_name="quality_run_documents"
                    )
                batch = asset.add_batch_definition_whole_table("scope").get_batch()
                result = _validate_batch(batch, TABLE_SUITE, {"embed_dim": settings.embed_dim})
                verdict.validations.append(
                    Validation(TABLE_SUITE, bool(result.success),
                               outcomes_of(TABLE_SUITE, result, queue_ids),
                               _plain(result.to_json_dict()))
                )  # fmt: skip
                source.get_engine().dispose()
        finally:
            conn.execute(SQL.drop_scope, (scope,))
        record(conn, run_id, TABLE_MAP_INDEX, verdict)
    log.info("stage=quality run=%s table-level validation of %d documents", run_id, loaded)
    return verdict


def blocking_failures(verdict: Verdict) -> list[Outcome]:
    return [o for v in verdict.validations for o in v.outcomes if o.blocking and not o.success]


# ---------------------------------------------------------------- Data Docs


def project_dir(settings: Settings) -> Path:
    """The file data context of the Data Docs."""
    return settings.home / "quality"


def _uncommitted(settings: Settings) -> Path:
    return project_dir(settings) / "gx" / "uncommitted"


def docs_dir(settings: Settings) -> Path:
    """The Data Docs site, served at /quality/ by `blogqa serve` and the plugin."""
    return _uncommitted(settings) / "data_docs" / DOCS_SITE


def results_dir(settings: Settings) -> Path:
    """The file store of the validation results the Data Docs are built from."""
    return _uncommitted(settings) / "validations"


def build_docs(settings: Settings, run_id: str | None = None) -> Path:
    """Put the stored validation results (of `run_id`, or of the latest runs) into the file
    data context under $BLOGQA_HOME/quality and build their Data Docs pages and the site's
    index; returns the index.html.

    With `run_id` (the DAG's validate_tables task, every run) only that run's pages are
    rendered, as GX's incremental build does: a full rebuild renders every result in the
    store, so its cost grew with each run kept (0.2 s with 6 results, 1.6 s with 183, on this
    machine), and a nightly schedule keeps them all. Without it, the results of the latest
    BLOGQA_QUALITY_DOCS_RUNS runs in PostgreSQL are rendered again (`blogqa quality --docs`:
    the way to rebuild a site, on any machine with the database, such as the api-server's).
    A run without results leaves the site as it is.

    Either way the site then keeps the latest BLOGQA_QUALITY_DOCS_RUNS runs (and `run_id`):
    GX's index reads every result kept, so an unbounded site made the end of every run
    slower with each night (2.6 ms per result). Older results stay in PostgreSQL
    (blogqa.quality_results, `blogqa quality --run`); their pages go with them."""
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResultSchema,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    from blogqa import db

    gx()
    keep = QualitySettings.load().docs_runs
    project = project_dir(settings)
    project.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = gx().get_context(mode="file", project_root_dir=str(project))
        _quiet(context)
        schema = ExpectationSuiteValidationResultSchema()
        with db.connect(settings) as conn:
            latest = [run for (run,) in conn.execute(SQL.latest_validation_runs, (keep,))]
            wanted = latest if run_id is None else [run_id]
            rows = conn.execute(SQL.validations_of_runs, (wanted,)).fetchall()
        keys = []
        for run, map_index, suite, result, created_at in rows:
            batch = "tables" if map_index == TABLE_MAP_INDEX else f"chunk-{map_index}"
            key = ValidationResultIdentifier(
                expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite),
                run_id=RunIdentifier(run_name=run, run_time=created_at.astimezone(dt.UTC)),
                batch_identifier=batch,
            )
            context.validation_results_store.store_validation_results(schema.load(result), key)
            keys.append(key)
        if run_id is not None and not keys:  # (an empty list would make GX render every result)
            log.info("stage=quality run=%s has no validations: Data Docs left as they are", run_id)
            return docs_dir(settings) / "index.html"
        dropped = prune_docs(context.validation_results_store, {*latest, *wanted})
        # the index build drops the pages of the results pruned (GX: skip_and_clean_missing)
        context.build_data_docs(resource_identifiers=keys if run_id is not None else None)
    if dropped:
        # GX removes the files but not their folders (its rrmdir never finds one empty)
        for folder in (results_dir(settings), docs_dir(settings) / "validations"):
            _remove_empty_folders(folder)
    index = docs_dir(settings) / "index.html"
    log.info(
        "stage=quality Data Docs of %d validations at %s (%d older results dropped)",
        len(rows),
        index,
        dropped,
    )
    return index


def prune_docs(store, runs: set[str]) -> int:
    """Remove from a GX validation results store the results of every run not in `runs`;
    the number removed."""
    gone = [key for key in store.list_keys() if key.run_id.run_name not in runs]
    for key in gone:
        store.remove_key(key)
    return len(gone)


def _remove_empty_folders(root: Path) -> None:
    for folder, _, _ in os.walk(root, topdown=False):
        if folder != str(root):
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(folder)


# ---------------------------------------------------------------- summaries


def summary(conn: psycopg.Connection, run_id: str | None = None) -> dict | None:
    """A run's quality results (the latest run's by default): per expectation, how many
    chunks it passed and failed and which queue ids failed it; None when there are none."""
    if run_id is None:
        row = conn.execute(SQL.latest_run).fetchone()
        if row is None:
            return None
        run_id = row[0]
    rows = conn.execute(SQL.results_of_run, (run_id,)).fetchall()
    if not rows:
        return None
    merged: dict[tuple, dict] = {}
    for map_index, suite, expectation, column, blocking, success, observed, _, ids in rows:
        level = "table" if map_index == TABLE_MAP_INDEX else "chunk"
        entry = merged.setdefault(
            (level, suite, expectation, column),
            {
                "level": level,
                "suite": suite,
                "expectation": expectation,
                "column": column,
                "blocking": blocking,
                "passed": 0,
                "failed": 0,
                "failing_ids": [],
            },
        )
        entry["passed" if success else "failed"] += 1
        entry["failing_ids"] += list(ids)
    statuses = dict(
        conn.execute(
            SQL.quarantined_by_status,
            (run_id,),
        ).fetchall()
    )
    return {"run_id": run_id, "expectations": list(merged.values()), "quarantined": statuses}
