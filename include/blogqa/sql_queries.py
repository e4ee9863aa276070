"""Named SQL queries kept in .sql files, not in Python strings.

The queries of module `blogqa.<path>` live in `queries/<path>.sql` (package data, so a wheel
carries them): `blogqa.queue` in `queries/queue.sql`, `blogqa.api.queries` in
`queries/api/queries.sql`. A module loads its file once, at import:

    SQL = sql_queries.load(__name__)
    conn.execute(SQL.claim, {"owner": owner, ...})

A file is a series of blocks, each opened by a `-- name: <query_name>` line and running to
the next one. Comment lines (`--` first on the line) are documentation and are not sent to
the server, so they may mention parameters freely. The text is otherwise sent as written,
with psycopg's placeholders (`%s`, `%(name)s`) for every value: nothing is formatted into it.

A block may include another block with `{{name}}` (same file) or `{{module.name}}` (the
file of `blogqa.module`), for fragments several statements share, such as the bounded
append to a queue row's error history. Includes are expanded when the file is read.

Queries that depend on identifiers or on which filters a caller gave are built in code with
psycopg.sql (or from fixed fragments); they say so where they are.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from blogqa.errors import BlogqaError

PACKAGE = "blogqa"
FOLDER = "queries"

_NAME_LINE = re.compile(r"^--\s*name:\s*(?P<name>\S+)\s*$")
_VALID_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_INCLUDE = re.compile(r"\{\{\s*(?P<ref>[a-z_][a-z0-9_.]*)\s*\}\}")
_MAX_INCLUDE_DEPTH = 5


class QueryFileError(BlogqaError):
    """A query file is missing, malformed, or lacks a query a module asks for."""


class Queries:
    """The named queries of one file; `queries.claim` is the text of block `claim`."""

    def __init__(self, module: str, path: str, queries: dict[str, str]) -> None:
        self._module = module
        self._path = path
        self._queries = queries

    @property
    def path(self) -> str:
        """The file, relative to the package (for messages)."""
        return self._path

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._queries)

    def __getattr__(self, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, name: str) -> str:
        try:
            return self._queries[name]
        except KeyError:
            raise QueryFileError(
                f"no query named {name!r} in {self._path} (asked for by {self._module});"
                f" it has: {', '.join(self._queries) or 'none'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._queries

    def __repr__(self) -> str:
        return f"<Queries {self._path}: {', '.join(self._queries)}>"


def _relative(module: str) -> str:
    """`blogqa.api.queries` -> `api/queries` (a bare `queue` is taken as `blogqa.queue`)."""
    parts = module.split(".")
    if parts[0] == PACKAGE:
        parts = parts[1:]
    if not parts or not all(_VALID_NAME.match(p) for p in parts):
        raise QueryFileError(f"{module!r} does not name a module of package {PACKAGE}")
    return "/".join(parts)


def parse(text: str, path: str) -> dict[str, str]:
    """The blocks of a query file by name, comment lines removed, includes not expanded."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _NAME_LINE.match(line.strip())
        if match:
            name = match.group("name")
            if not _VALID_NAME.match(name):
                raise QueryFileError(f"{path}:{number}: {name!r} is not a valid query name")
            if name in blocks:
                raise QueryFileError(f"{path}:{number}: query {name!r} is defined twice")
            current = blocks[name] = []
        elif line.strip().startswith("--") or (current is None and not line.strip()):
            continue
        elif current is None:
            raise QueryFileError(f"{path}:{number}: SQL before the first `-- name:` line")
        else:
            current.append(line.rstrip())
    found = {}
    for name, lines in blocks.items():
        body = "\n".join(lines).strip()
        if not body:
            raise QueryFileError(f"{path}: query {name!r} is empty")
        found[name] = body
    return found


@functools.cache
def _raw(relative: str) -> tuple[str, dict[str, str]]:
    path = f"{FOLDER}/{relative}.sql"
    file = resources.files(PACKAGE).joinpath(*path.split("/"))
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QueryFileError(f"query file {path} not found in package {PACKAGE}") from None
    return path, parse(text, path)


def _expand(relative: str, name: str, depth: int = 0) -> str:
    path, blocks = _raw(relative)
    if name not in blocks:
        raise QueryFileError(f"no query named {name!r} in {path}")
    if depth > _MAX_INCLUDE_DEPTH:
        raise QueryFileError(f"{path}: includes nested too deep at {name!r} (a cycle?)")

    def include(match: re.Match) -> str:
        ref = match.group("ref")
        where, _, target = ref.rpartition(".")
        try:
            return _expand(_relative(where) if where else relative, target, depth + 1)
        except QueryFileError as exc:
            raise QueryFileError(f"{path}: query {name!r} includes {{{{{ref}}}}}: {exc}") from None

    return _INCLUDE.sub(include, blocks[name])


@functools.cache
def load(module: str) -> Queries:
    """The queries of `module` (its `__name__`), read and parsed once per process.

    Raises QueryFileError naming the file when it is missing or malformed, and naming the
    file and the query when a module asks for a name the file lacks."""
    relative = _relative(module)
    path, blocks = _raw(relative)
    return Queries(module, path, {name: _expand(relative, name) for name in blocks})
