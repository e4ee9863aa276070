"""The operators' view: one server-rendered HTML page with a small inline SVG chart.

Airflow shows it in an iframe (the plugin's `external_views`: a "blogqa" entry in the
navigation and a tab on the DAG); `blogqa serve` serves it too. No JavaScript, no build step,
no request to anything but the page itself: the figures are read from the database when the
page is requested (operations.overview) and rendered with Jinja2 (autoescaped).

Every figure carries a `data-figure` attribute naming it, so a test (or a scraper) can read
the page's numbers without parsing its layout.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from blogqa.api.airflow_auth import DAG_ID
from blogqa.api.operations import Overview

TEMPLATES = Path(__file__).resolve().parent / "templates"
CHART_WIDTH, CHART_HEIGHT, BAR_GAP = 560, 160, 6

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _age(seconds: float | None) -> str:
    """A duration as people read it: 42 s, 7 min, 3.5 h, 2.0 d."""
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "–"


def _usd(value: Decimal | float | None) -> str:
    return "–" if value is None else f"{float(value):.6f}"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


_env.filters.update(age=_age, when=_when, usd=_usd, rate=_rate)


def run_chart(runs: list[dict]) -> dict:
    """Bars of the recent runs (oldest left): URLs done and dead per run, to scale."""
    shown = list(reversed(runs))
    tallest = max([r["done"] + r["dead"] for r in shown] + [1])
    width = (CHART_WIDTH - BAR_GAP * (len(shown) + 1)) / max(len(shown), 1)
    bars = []
    for i, run in enumerate(shown):
        done_h = CHART_HEIGHT * run["done"] / tallest
        dead_h = CHART_HEIGHT * run["dead"] / tallest
        x = BAR_GAP + i * (width + BAR_GAP)
        bars.append(
            {
                "x": round(x, 1),
                "width": round(width, 1),
                "done_y": round(CHART_HEIGHT - done_h, 1),
                "done_h": round(done_h, 1),
                "dead_y": round(CHART_HEIGHT - done_h - dead_h, 1),
                "dead_h": round(dead_h, 1),
                "run": run,
            }
        )
    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "bars": bars, "tallest": tallest}


def render(overview: Overview, *, dag_id: str | None = None) -> str:
    """The page. `dag_id`: the DAG whose tab shows it (Airflow passes {DAG_ID}); another
    DAG's tab says the view is about blogqa's DAG."""
    return _env.get_template("operations.html").render(
        o=overview,
        chart=run_chart(overview.runs),
        dag_id=dag_id,
        blogqa_dag=DAG_ID,
        other_dag=dag_id is not None and dag_id != DAG_ID,
    )
