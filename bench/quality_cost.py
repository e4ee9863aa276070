"""Cost of the quality gate's validate task against a 100-URL chunk's wall time.

Usage: python bench/quality_cost.py [--docs 100] [--repeats 5] [--chunk-seconds S]

Builds `--docs` realistic work items (the synthetic articles of bench/servers.py extracted,
a summary and five question/answer pairs from their sentences, ~300-token retrieval chunks,
unit vectors of dimension 1536; as bench/stage_costs.py makes them), saves them as the
earlier stages would, and times the validate task's body, `pipeline.validate_chunk` (renew
the leases, read the work items, build the frames, run the three suites with Great
Expectations, record the results, hand the refs on), the way a task process meets it:
  - import: `import great_expectations` (paid once per task process: Airflow starts one per
    task instance, unless the process that forks the tasks imported it first);
  - first: the first validation of the process (GX's lazy set-up);
  - warm: the following validations (median of --repeats).
The chunk's wall time is the sum of the process.* tasks of the N=100 run (chunk size 100) in
bench/results/pipeline_throughput.json (crawl, summarize, embed, load; 0.8 s chat latency),
or --chunk-seconds. Target: validate <= 5 % of it.

Runs in its own BLOGQA_HOME (.blogqa/bench-quality/, removed afterwards) and writes
bench/results/quality_cost.json. Wall-clock timings on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from blogqa import db, embedded, pipeline, store
from blogqa.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # run as a script: the sibling modules below

from common import code_fingerprint, load_average, machine_facts
from servers import article_pages
from stage_costs import work_items

RESULTS = ROOT / "bench" / "results" / "quality_cost.json"
THROUGHPUT = ROOT / "bench" / "results" / "pipeline_throughput.json"
HOMES = ROOT / ".blogqa" / "bench-quality"
TARGET_SHARE = 0.05


def chunk_seconds_from_throughput() -> tuple[float, str] | None:
    """Sum of the process.* tasks of the N=100 run with chunk size 100, if recorded."""
    try:
        report = json.loads(THROUGHPUT.read_text())
        [run] = [r for r in report["runs"] if r["n"] == 100]
        tasks = run["pipeline"]["airflow"]["tasks"]
    except (OSError, KeyError, ValueError):
        return None
    chunk = [v for k, v in tasks.items() if k.startswith("process.") and v["instances"] == 1]
    if not chunk or report["parameters"].get("chunk_size") != 100:
        return None
    return round(sum(v["seconds"] for v in chunk), 2), f"{THROUGHPUT.name} ({report['timestamp']})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-seconds", type=float, help="a 100-URL chunk's wall time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import_started = time.perf_counter()
    from blogqa import quality

    quality.preload()
    import_seconds = time.perf_counter() - import_started

    home = HOMES / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    settings = dataclasses.replace(
        load_settings(), home=home, database_url=None, embed_dim=1536, lease_seconds=3600
    )
    report: dict = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "code_fingerprint": code_fingerprint(),
        "parameters": {k: v for k, v in vars(args).items() if k != "output"},
    }
    try:
        with db.connect(settings) as conn:
            items = work_items(
                conn, settings, article_pages(args.docs, seed=args.seed), np.random.default_rng(0)
            )
            store.save_pages(conn, [(item.lease, item.page, False) for item in items])
            store.save_llm_results(conn, [(item.lease, item.llm_result) for item in items])
            store.save_vectors(conn, [(item.lease, item.chunks, item.vectors) for item in items])
        refs = [item.lease.ref() for item in items]
        timings = []
        for attempt in range(1 + args.repeats):
            started = time.perf_counter()
            passed = pipeline.validate_chunk(refs, "bench__quality", 0, settings)
            timings.append(time.perf_counter() - started)
            if len(passed) != len(refs):
                raise RuntimeError(f"{len(refs) - len(passed)} bench documents quarantined")
            print(f"validate_chunk #{attempt}: {timings[-1]:.3f} s")
        with db.connect(settings) as conn:
            rows = conn.execute(
                "SELECT suite, count(*) FROM blogqa.quality_results GROUP BY suite"
            ).fetchall()
    finally:
        embedded.release(settings)
        with contextlib.suppress(OSError):
            shutil.rmtree(home)

    vectors = sum(len(item.vectors) for item in items)
    questions = sum(len(item.llm_result["qa"]) for item in items)
    warm = statistics.median(timings[1:]) if len(timings) > 1 else timings[0]
    chunk = (args.chunk_seconds, "--chunk-seconds") if args.chunk_seconds else None
    chunk = chunk or chunk_seconds_from_throughput()
    report["validate"] = {
        "documents": len(items),
        "questions": questions,
        "vectors": vectors,
        "expectations_per_suite": dict(rows),
        "import_seconds": round(import_seconds, 2),
        "first_seconds": round(timings[0], 3),
        "warm_seconds_median": round(warm, 3),
        "warm_seconds": [round(t, 3) for t in timings[1:]],
    }
    if chunk:
        seconds, source = chunk
        cold = import_seconds + timings[0]
        report["chunk"] = {"seconds": seconds, "source": source}
        report["share"] = {
            "warm": round(warm / seconds, 4),
            "cold_with_import": round(cold / seconds, 4),
            "target": TARGET_SHARE,
            "warm_met": warm / seconds <= TARGET_SHARE,
            "cold_met": cold / seconds <= TARGET_SHARE,
        }
    report["machine"]["load_average_at_end"] = load_average()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: report[k] for k in ("validate", "chunk", "share") if k in report}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
