"""The stall watchdog of `pipeline._each_bounded` (crawl and summarize): a stage in which no
item finishes for BLOGQA_STAGE_STALL_SECONDS fails at once instead of hanging."""

from __future__ import annotations

import asyncio
import time

import pytest

from blogqa import pipeline
from blogqa.config import load_settings
from blogqa.errors import ConfigError, PageError, StageStalledError


def each_bounded(work, items, *, limit=2, stall_seconds=0.5):
    return asyncio.run(
        pipeline._each_bounded(work, items, limit, stage="crawl", stall_seconds=stall_seconds)
    )


def test_a_stage_with_nothing_finishing_fails_within_the_stall_seconds():
    cancelled = []

    async def work(item):
        if item == "stuck":
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.append(item)
        return item

    started = time.monotonic()
    with pytest.raises(StageStalledError, match=r"stage crawl: no item finished in 0.5s.*2 of 3"):
        each_bounded(work, ["a", "stuck", "b"])
    assert time.monotonic() - started < 1.5
    assert cancelled == ["stuck"]  # nothing is left running behind the failed stage


def test_steady_progress_never_trips_the_watchdog():
    """The clock restarts with every finished item, however long the whole stage takes."""

    async def work(item):
        await asyncio.sleep(0.1)
        return item

    # 8 items of 0.1 s one at a time outlast the 0.5 s stall time; none stalls for it
    assert each_bounded(work, list(range(8)), limit=1, stall_seconds=0.5) == list(range(8))


def test_page_errors_stay_in_place_and_other_errors_stop_the_stage():
    error = PageError("gone", stage="crawl", permanent=True)

    async def work(item):
        if item == "bad":
            raise error
        if item == "broken":
            raise RuntimeError("database down")
        await asyncio.sleep(0.01)
        return item

    assert each_bounded(work, ["a", "bad", "b"]) == ["a", error, "b"]
    with pytest.raises(RuntimeError, match="database down"):
        each_bounded(work, ["a", "broken", "b"])


def test_stall_seconds_must_outlast_the_per_item_timeouts(monkeypatch):
    monkeypatch.setenv("BLOGQA_STAGE_STALL_SECONDS", "45")
    with pytest.raises(ConfigError, match="45 must be more than BLOGQA_LLM_TIMEOUT_SECONDS=60"):
        load_settings()
    monkeypatch.setenv("BLOGQA_LLM_TIMEOUT_SECONDS", "40")
    assert load_settings().stage_stall_seconds == 45
    monkeypatch.setenv("BLOGQA_STAGE_STALL_SECONDS", "soon")
    with pytest.raises(ConfigError, match="not a number"):
        load_settings()
