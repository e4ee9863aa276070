"""Score trafilatura option sets and blogqa's extract_article on the ground-truth corpus.

Usage: python bench/extraction_quality.py [--corpus ../shared/corpus/aeb-dev]

Prints precision/recall/F1 (4-token shingles, see blogqa.extraction_score) and ms/page for
each option set, then the speed of extract_article, and writes bench/results/extraction.json.
The measured figures back the choice of blogqa.extract.EXTRACTION_OPTIONS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trafilatura
from trafilatura.deduplication import LRUCache

from blogqa.extract import EXTRACTION_OPTIONS, NothingExtractedError, extract_article
from blogqa.extraction_score import corpus_f1, load_corpus

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = "../shared/corpus/aeb-dev"  # relative to the project root
RESULTS = ROOT / "bench" / "results" / "extraction.json"
TIMING_REPEATS = 3

# bare_extraction option sets tried (with_metadata=True, as extract_article calls it)
CANDIDATES: dict[str, dict[str, Any]] = {
    "bare defaults (comments kept apart)": {},
    "include_comments=False": {"include_comments": False},
    "favor_recall": {"favor_recall": True},
    "favor_precision": {"favor_precision": True},
    "include_tables=False": {"include_tables": False},
    "fast": {"fast": True},
    "deduplicate (per-page cache)": {"deduplicate": "per-page"},
    "no comments + favor_recall": {"include_comments": False, "favor_recall": True},
    "no comments + favor_precision": {"include_comments": False, "favor_precision": True},
    "no comments + include_tables=False": {"include_comments": False, "include_tables": False},
    "no comments + fast": {"include_comments": False, "fast": True},
    "no comments + deduplicate": {"include_comments": False, "deduplicate": "per-page"},
}


def bare_text(html: str, options: dict[str, Any]) -> str | None:
    kwargs = dict(options)
    if kwargs.get("deduplicate") == "per-page":
        kwargs["deduplicate"] = LRUCache(maxsize=4096)  # not trafilatura's process-wide cache
    document = trafilatura.bare_extraction(html, with_metadata=True, **kwargs)
    return document.text if document is not None else None


def article_text(html: str) -> str | None:
    try:
        return extract_article(html).text
    except NothingExtractedError:
        return None


def run(pages: list[tuple[str, str, str]], extract: Callable[[str], str | None]) -> dict[str, Any]:
    start = time.perf_counter()
    texts = [extract(html) for _, html, _ in pages]
    elapsed = time.perf_counter() - start
    scores = corpus_f1(zip(texts, (expected for _, _, expected in pages), strict=True))
    scores["empty_pages"] = sum(1 for text in texts if not text)
    scores["ms_per_page"] = 1000 * elapsed / len(pages)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        help=f"corpus folder, relative to the project root unless absolute (default {DEFAULT_CORPUS})",
    )
    args = parser.parse_args(argv)
    corpus = ROOT / args.corpus  # an absolute --corpus replaces ROOT
    if not (corpus / "ground-truth.json").is_file():
        sys.exit(f"Corpus not found at {args.corpus} (no ground-truth.json there); pass --corpus.")
    pages = load_corpus(corpus)
    print(f"{len(pages)} pages from {args.corpus}, trafilatura {trafilatura.__version__}\n")

    extractors: dict[str, tuple[dict[str, Any], Callable[[str], str | None]]] = {
        "trafilatura.extract defaults": ({}, trafilatura.extract),
        **{
            name: (options, lambda html, options=options: bare_text(html, options))
            for name, options in CANDIDATES.items()
        },
        "extract_article (EXTRACTION_OPTIONS)": (dict(EXTRACTION_OPTIONS), article_text),
    }
    rows = []
    print(f"{'option set':42} {'P':>6} {'R':>6} {'F1':>6} {'empty':>5} {'ms/page':>8}")
    for name, (options, extract) in extractors.items():
        row = {"name": name, "options": options, **run(pages, extract)}
        rows.append(row)
        print(
            f"{name:42} {row['precision']:6.4f} {row['recall']:6.4f} {row['f1']:6.4f}"
            f" {row['empty_pages']:5d} {row['ms_per_page']:8.1f}"
        )

    timings = [run(pages, article_text)["ms_per_page"] for _ in range(TIMING_REPEATS)]
    ms_per_page = min(timings)
    print(f"\nextract_article: {ms_per_page:.1f} ms/page (best of {TIMING_REPEATS} passes)")

    results = {
        "corpus": args.corpus,
        "pages": len(pages),
        "trafilatura": trafilatura.__version__,
        "chosen_options": dict(EXTRACTION_OPTIONS),
        "extract_article_ms_per_page": round(ms_per_page, 2),
        "option_sets": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows
        ],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tmp.replace(RESULTS)
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
