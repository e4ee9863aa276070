"""The named-query files (include/blogqa/queries/) and their loader: every query a module
asks for exists in its file, every query in a file is used, and a malformed file or a
missing name fails with a message naming the file and the query."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from blogqa import sql_queries
from blogqa.sql_queries import QueryFileError
from tests.conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "include" / "blogqa"
LOADS = re.compile(r"^SQL = sql_queries\.load\(__name__\)", re.MULTILINE)
OWN_USE = re.compile(r"(?<![\w.])SQL\.([a-z_][a-z0-9_]*)")
OTHER_USE = re.compile(r"\b([a-z_]+)\.SQL\.([a-z_][a-z0-9_]*)")
INCLUDE = re.compile(r"\{\{\s*([a-z_][a-z0-9_.]*)\s*\}\}")


def _module(path) -> str:
    return "blogqa." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _loading_modules() -> dict[str, str]:
    """Module name -> source, for every module that loads a query file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if LOADS.search(text):
            found[_module(path)] = text
    return found


def _query_files() -> list[str]:
    folder = resources.files("blogqa") / "queries"
    names = []
    for sub in (folder, folder / "api"):
        names += [
            ("api." if sub.name == "api" else "") + p.name.removesuffix(".sql")
            for p in sub.iterdir()
            if p.name.endswith(".sql")
        ]
    return sorted(names)


def test_every_query_a_module_uses_is_in_its_file():
    modules = _loading_modules()
    assert {
        "blogqa.queue", "blogqa.search", "blogqa.api.queries", "blogqa.store", "blogqa.quality",
        "blogqa.db",
    } <= set(modules)  # fmt: skip
    missing = []
    for module, text in modules.items():
        queries = sql_queries.load(module)
        missing += [f"{module}: {n}" for n in OWN_USE.findall(text) if n not in queries]
    for path in PACKAGE.rglob("*.py"):
        for alias, name in OTHER_USE.findall(path.read_text()):
            owner = next(m for m in (f"blogqa.{alias}", f"blogqa.api.{alias}") if m in modules)
            if name not in sql_queries.load(owner):
                missing.append(f"{_module(path)}: {alias}.SQL.{name}")
    assert missing == []


def test_every_query_file_belongs_to_a_module_and_every_query_is_used():
    modules = _loading_modules()
    assert sorted(m.removeprefix("blogqa.") for m in modules) == _query_files()
    used: set[tuple[str, str]] = set()
    sources = {_module(p): p.read_text() for p in PACKAGE.rglob("*.py")}
    for module, text in sources.items():
        if module in modules:
            used |= {(module, n) for n in OWN_USE.findall(text)}
        for alias, name in OTHER_USE.findall(text):
            used |= {(m, name) for m in (f"blogqa.{alias}", f"blogqa.api.{alias}")}
    for module in modules:
        path = sql_queries.load(module).path
        raw = (resources.files("blogqa") / path).read_text()
        for ref in INCLUDE.findall(raw):
            where, _, name = ref.rpartition(".")
            used.add((f"blogqa.{where}" if where else module, name))
    unused = [
        f"{module}: {name}"
        for module in modules
        for name in sql_queries.load(module).names
        if (module, name) not in used
    ]
    assert unused == []


def test_includes_are_expanded_and_comments_not_sent():
    queue = sql_queries.load("blogqa.queue")
    assert "{{" not in queue.fail and queue.history_append in queue.fail
    assert queue.done_set in queue.mark_done
    assert not any(line.lstrip().startswith("--") for line in queue.fail.splitlines())
    admin = sql_queries.load("blogqa.queue_admin")
    assert queue.history_append in admin.cancel


def test_a_missing_query_names_the_file_and_the_query():
    queue = sql_queries.load("blogqa.queue")
    with pytest.raises(QueryFileError, match=r"no query named 'clam' in queries/queue\.sql"):
        queue.clam  # noqa: B018
    with pytest.raises(QueryFileError, match=r"queries/nowhere\.sql not found"):
        sql_queries.load("blogqa.nowhere")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SELECT 1", r"f\.sql:1: SQL before the first `-- name:` line"),
        ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2", r"f\.sql:3: query 'a' is defined twice"),
        ("-- name: Bad-Name\nSELECT 1", r"f\.sql:1: 'Bad-Name' is not a valid query name"),
        ("-- name: a\n-- only a comment\n", r"f\.sql: query 'a' is empty"),
    ],
)
def test_malformed_files_are_refused_with_their_line(text, message):
    with pytest.raises(QueryFileError, match=message):
        sql_queries.parse(text, "f.sql")


def test_parse_keeps_blocks_in_order_without_comment_lines():
    text = (
        "-- about a\n-- name: a\nSELECT %(x)s -- kept\n-- dropped %(y)s\n\n-- name: b\nSELECT 2\n"
    )
    assert sql_queries.parse(text, "f.sql") == {"a": "SELECT %(x)s -- kept", "b": "SELECT 2"}
