"""A series of pipeline_throughput.py runs of one commit, summarized: the spread, not one draw.

Usage: python bench/throughput_series.py RESULTS.json [RESULTS.json ...] [--output SERIES.md]

On a 2-core machine one run per configuration does not settle a 5 % difference: the same
pages took 188-221 s in the minimal program over five runs (bench/README.md, thirteenth
round). Run the bench several times on one commit, each run with its own home and output,
for example

    for i in 1 2 3 4 5; do
        python bench/pipeline_throughput.py --modes minimal local celery --n 500 2000 \\
            --no-force-pass --empty-runs 1 --code-rev HEAD \\
            --output bench/results/series/run-$i.json
    done
    python bench/throughput_series.py bench/results/series/run-*.json \\
        --output bench/results/series/series.md

and this prints (and writes, with --output) per executor and N the median, lowest and
highest ratio to the minimal program of the same run, and in how many runs issue 11's
target (<= 1.2) was met; per executor the per-URL change from N = 500 to 2000, the slowest
empty run and the chat calls per new document. Each ratio is taken within its own run, the
minimal program and the executors minutes apart, so that a slower hour of the machine
weighs on both sides. Results of different code (another fingerprint of the pipeline's code
files) are refused: a series is of one commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline_throughput import (
    EMPTY_RUN_SECONDS,
    FLAT_WITHIN,
    TARGET_RATIO,
    TARGET_SIZES,
    mode_label,
    per_url_change,
    run_ratio,
)


class SeriesError(Exception):
    """The result files do not make one series (another commit, a failed run)."""


@dataclass
class Spread:
    """Values of one figure over the runs of a series."""

    values: list[float]
    digits: int = 2

    def __str__(self) -> str:
        median, low, high = statistics.median(self.values), min(self.values), max(self.values)
        return f"{median:.{self.digits}f} ({low:.{self.digits}f}-{high:.{self.digits}f})"


def load(paths: list[Path]) -> list[dict]:
    """The reports, checked to be complete runs of one measured code, with their sizes as
    numbers again (JSON made them strings), as pipeline_throughput.py holds them."""
    reports = []
    for path in paths:
        report = json.loads(path.read_text())
        if report.get("error"):
            raise SeriesError(f"{path} is a failed run ({report['error']}): leave it out")
        report["minimal"] = _by_size(report["minimal"])
        for result in report["executors"].values():
            result["runs"] = _by_size(result.get("runs", {}))
        reports.append(report)
    # the fingerprint of the pipeline's code files each run measured (bench/common.py): the
    # label alone ("snapshot of the working tree") would pass different code as one
    codes = {report["code_fingerprint_at_start"] for report in reports}
    if len(codes) != 1:
        raise SeriesError(
            f"the runs measured different code (fingerprints {', '.join(sorted(codes))}): "
            "a series is of one commit (pass the same --code-rev to every run)"
        )
    return reports


def _by_size(runs: dict) -> dict[int, dict]:
    return {int(n): run for n, run in runs.items()}


def _mode_runs(report: dict, mode: str) -> dict[int, dict]:
    """The mode's runs by N (new pages and forced), empty when the run has no such mode."""
    return report["executors"].get(mode, {}).get("runs", {})


def _new_runs(report: dict, mode: str) -> dict[int, dict]:
    """The mode's new-pages runs by N."""
    return {n: run["new"] for n, run in _mode_runs(report, mode).items()}


def ratios(reports: list[dict], mode: str, n: int) -> list[float]:
    """The mode's wall time over the minimal program's, within each run that has both."""
    found = (run_ratio(report, mode, n) for report in reports)
    return [ratio for ratio in found if ratio is not None]


def _figure(runs: list[dict], key: str) -> str:
    """One figure of several runs as its spread ("-" when no run recorded it)."""
    values = [run[key] for run in runs if run.get(key) is not None]
    return str(Spread(values, 1)) if values else "-"


def summary(reports: list[dict]) -> list[str]:
    """The series as markdown lines."""
    modes = [m for m in ("local", "celery", "run") if any(m in r["executors"] for r in reports)]
    sizes = sorted({n for r in reports for n in r["minimal"]})
    first, last = reports[0]["timestamp"], reports[-1]["timestamp"]
    lines = [
        f"# Pipeline throughput, a series of {len(reports)} run(s) ({first} to {last})",
        "",
        (
            f"Measured code: {', '.join(sorted({r['measured_code'] for r in reports}))} "
            f"(fingerprint {reports[0]['code_fingerprint_at_start']}). Each ratio is the run's "
            "wall time over the minimal program's in the same run: median (lowest-highest), and "
            f"the runs in which the scheduler's target (<= {TARGET_RATIO}) was met."
        ),
        "",
        (
            "| N | minimal: wall s | machine CPU s | executor | wall s | machine CPU s "
            "| ÷ minimal | target met |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        minimal = [report["minimal"][n] for report in reports if n in report["minimal"]]
        for mode in modes:
            found = ratios(reports, mode, n)
            if not found:
                continue
            runs = [r[n] for r in (_new_runs(report, mode) for report in reports) if n in r]
            met = sum(ratio <= TARGET_RATIO for ratio in found)
            judged = f"{met} of {len(found)}" if mode != "run" and n in TARGET_SIZES else "-"
            lines.append(
                f"| {n} | {_figure(minimal, 'seconds')} | {_figure(minimal, 'machine_cpu_seconds')} "
                f"| {mode_label(mode)} | {_figure(runs, 'seconds')} | "
                f"{_figure(runs, 'machine_cpu_seconds')} | {Spread(found)} | {judged} |"
            )
    lines += [
        "",
        (
            "| executor | per-URL change N = 500 → 2000 | flat within 20 % | slowest empty run s "
            "| chat calls per new document |"
        ),
        "|---|---|---|---|---|",
    ]
    for mode in modes:
        found = (per_url_change(_mode_runs(r, mode)) for r in reports)
        changes = [change for change in found if change is not None]
        empties = [
            e["seconds"]
            for r in reports
            for e in r["executors"].get(mode, {}).get("empty_runs", [])
        ]
        calls = {
            round(run["chat_calls_per_document"], 3)
            for r in reports
            for run in _new_runs(r, mode).values()
        }
        flat = sum(abs(c) <= FLAT_WITHIN for c in changes)
        lines.append(
            f"| {mode_label(mode)} | "
            + (
                f"{statistics.median(changes):+.1%} ({min(changes):+.1%} to {max(changes):+.1%})"
                if changes
                else "-"
            )
            + f" | {flat} of {len(changes)} | "
            + (f"{max(empties):.1f} (limit {EMPTY_RUN_SECONDS:.0f})" if empties else "-")
            + f" | {', '.join(map(str, sorted(calls))) or '-'} |"
        )
    return lines + ["", *per_run(reports, modes, sizes)]


def _other_cpu(report: dict) -> float:
    """The most CPU that processes outside the bench used during one of the run's measured
    runs (the bench's "other"): a check that nothing else ran on the machine."""
    runs = [*report["minimal"].values()]
    for mode in report["executors"]:
        runs += _new_runs(report, mode).values()
    return max((run.get("component_cpu_seconds", {}).get("other", 0.0) for run in runs), default=0)


def _two_places(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def per_run(reports: list[dict], modes: list[str], sizes: list[int]) -> list[str]:
    """One row per run: its start, the order its modes ran in, and each ratio."""
    cells = [(mode, n) for mode in modes if mode != "run" for n in sizes]
    lines = [
        "| run started | modes in order | "
        + " | ".join(f"{mode_label(mode)} N = {n}" for mode, n in cells)
        + " | most CPU s of other processes in one measured run |",
        "|---|---|" + "---|" * (len(cells) + 1),
    ]
    for report in reports:
        found = [_two_places(run_ratio(report, mode, n)) for mode, n in cells]
        lines.append(
            f"| {report['timestamp']} | {', '.join(report['parameters']['modes'])} | "
            + " | ".join(found)
            + f" | {_other_cpu(report):.1f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="pipeline_throughput JSON files")
    parser.add_argument("--output", type=Path, help="also write the summary here (markdown)")
    args = parser.parse_args()
    try:
        reports = sorted(load(args.results), key=lambda r: r["timestamp"])
    except SeriesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = "\n".join(summary(reports)) + "\n"
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
