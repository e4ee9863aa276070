"""Shingle-based scoring of article extraction against a ground-truth corpus.

The rule follows the corpus README (article-extraction-benchmark style): lower-cased
``\\w+`` tokens, 4-token shingles counted with multiplicity, per-page precision and
recall averaged over pages, F1 from the averaged P and R; an empty extraction scores 0.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SHINGLE_SIZE = 4
_TOKEN_RE = re.compile(r"\w+")


def shingles(text: str | None, size: int = SHINGLE_SIZE) -> Counter[tuple[str, ...]]:
    """Multiset of ``size``-token shingles of the lower-cased ``\\w+`` tokens of ``text``."""
    tokens = _TOKEN_RE.findall((text or "").lower())
    return Counter(tuple(tokens[i : i + size]) for i in range(len(tokens) - size + 1))


def score_page(extracted: str | None, expected: str) -> tuple[float, float]:
    """Return (precision, recall) of ``extracted`` against ``expected`` for one page."""
    got, want = shingles(extracted), shingles(expected)
    if not got or not want:
        return 0.0, 0.0
    shared = sum((got & want).values())
    return shared / sum(got.values()), shared / sum(want.values())


def corpus_f1(pairs: Iterable[tuple[str | None, str]]) -> dict[str, float]:
    """Score (extracted, expected) pairs: mean precision and recall over pages, and F1."""
    scores = [score_page(extracted, expected) for extracted, expected in pairs]
    if not scores:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "pages": 0}
    precision = sum(p for p, _ in scores) / len(scores)
    recall = sum(r for _, r in scores) / len(scores)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "pages": len(scores)}


def load_corpus(path: str | Path) -> list[tuple[str, str, str]]:
    """Load ``(id, html, expected_text)`` for each page of a corpus folder.

    The folder holds ``ground-truth.json`` ({id: {"url", "articleBody"}}) and
    ``html/<id>.html.gz`` (UTF-8, gzip-compressed).
    """
    root = Path(path)
    truth = json.loads((root / "ground-truth.json").read_text(encoding="utf-8"))
    pages = []
    for page_id in sorted(truth):
        raw = gzip.decompress((root / "html" / f"{page_id}.html.gz").read_bytes())
        pages.append((page_id, raw.decode("utf-8"), truth[page_id]["articleBody"]))
    return pages
