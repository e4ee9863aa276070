"""A chunk's summaries handed on to embed, validate and load while its other summaries are
still being made (BLOGQA_ENRICH_WAVES per chunk).

Why: with one wave (the default) the enrich task runs its stages one after another over the
whole chunk. On a run of one round of chunks (every pool slot's task starting at about the
same time) every task is then in its model calls at once, with nothing to write, and then
every task loads at once, with the model idle: on the 2-core bench machine one core idled for
about 7 s of a 50 s run (bench/README.md, fifteenth round). The minimal program streams each
page through to its insert; waves do the same within one task, with no more task processes:
the summarize stage runs in a thread of the task, and the task's own thread takes the
documents whose summaries are saved, in waves, through the later stages. That pays when the
model is what a run waits for; where the loads already fill the CPU it only adds the waves'
own costs (bench/README.md, sixteenth round).

A wave is whatever has arrived when the later stages are free, but at least `min_wave`
documents (fewer only for the last one; the chunk's size ÷ BLOGQA_ENRICH_WAVES): while they
are busy, the summaries keep arriving and wait for the next wave. Every wave costs a
validation and a few statements per stage whatever its size, so the waves are few and large.
Each stage stays resumable and fenced as before; a wave is just a smaller set of the
chunk's refs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

Refs = list[dict]


class Arrivals:
    """Queue ids whose summaries are saved, handed from the summarize thread to the waves."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._ids: list[int] = []
        self._ended = False

    def add(self, ids: Iterable[int]) -> None:
        with self._ready:
            self._ids.extend(ids)
            self._ready.notify_all()

    def end(self, _: Future | None = None) -> None:
        """No more arrivals (the summarize stage returned or raised)."""
        with self._ready:
            self._ended = True
            self._ready.notify_all()

    def take(self, at_least: int) -> list[int] | None:
        """Every id arrived so far once there are `at_least` of them or no more will come;
        None when none are left."""
        with self._ready:
            self._ready.wait_for(lambda: len(self._ids) >= at_least or self._ended)
            taken, self._ids = self._ids, []
        return taken or None


def run(
    refs: Refs,
    summarize: Callable[[Refs, Callable[[Iterable[int]], None]], Refs],
    finish: Callable[[Refs], Any],
    min_wave: int,
) -> list[Any]:
    """`finish` (embed, validate, load) each wave of `refs` whose summaries `summarize` has
    saved; returns what each call of `finish` returned, in order.

    `summarize(refs, on_saved)` runs in a thread of its own and calls `on_saved(ids)` as
    summaries are committed (and for refs that need none); it returns the refs that go on.
    Those it returned and no wave took (none, unless it passed refs on without calling
    `on_saved`) are the last wave. An error of `summarize` is raised after the waves of what
    it saved have finished, so a failing task still loads what it paid for; an error of
    `finish` is raised once the summarize thread has ended (it saves what arrives meanwhile).
    """
    by_id = {int(ref["id"]): ref for ref in refs}
    arrivals = Arrivals()
    taken: set[int] = set()
    results = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="summarize") as thread:
        summarizing = thread.submit(summarize, refs, arrivals.add)
        summarizing.add_done_callback(arrivals.end)
        while (ids := arrivals.take(min_wave)) is not None:
            wave = [by_id[i] for i in ids if i not in taken]
            taken.update(ids)
            if wave:
                results.append(finish(wave))
        survivors = summarizing.result()
    rest = [ref for ref in survivors if int(ref["id"]) not in taken]
    if rest:
        results.append(finish(rest))
    return results
