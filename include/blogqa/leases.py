"""Keep a chunk's leases alive while a stage works on it.

Stages renew their leases when they start, but one stage can outlast a lease (a slow model,
a long Crawl-delay). Without renewal another worker would reclaim the rows and both would
do the work. The keeper renews every third of BLOGQA_LEASE_SECONDS on its own connection, and
learns on the way which rows are no longer ours (cancelled by an operator, or taken over), so
the stage stops spending effort on them. Each beat also renews the rest of the run's claim
(`queue.renew_claim`): the chunks waiting meanwhile for a pool slot cannot renew their own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Self

import psycopg

from blogqa import db, queue
from blogqa.config import Settings
from blogqa.queue import Lease

log = logging.getLogger(__name__)


class LeaseLostError(RuntimeError):
    """The queue row is no longer ours (expired, cancelled or re-claimed): discard the work."""


class LeaseKeeper:
    """Async context manager renewing `leases` in the background until the block ends."""

    def __init__(self, settings: Settings, leases: list[Lease]) -> None:
        self.settings = settings
        self.leases = list(leases)
        self.held = {lease.id for lease in leases}
        self.interval = max(settings.lease_seconds / 3, 1.0)
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Self:
        if self.leases:
            self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def let_go(self, lease: Lease) -> None:
        """Stop renewing `lease`: its row went on to a stage that holds it itself."""
        self.leases = [held for held in self.leases if held.id != lease.id]

    def ensure_held(self, lease: Lease) -> None:
        """Raise LeaseLostError before starting work on a row we no longer own."""
        if lease.id not in self.held:
            raise LeaseLostError(f"lease on {lease.url} was lost; not processing it further")

    async def renew_once(self, conn: psycopg.AsyncConnection) -> None:
        mine = [lease for lease in self.leases if lease.id in self.held]
        seconds = self.settings.lease_seconds
        cur = await conn.execute(
            queue.SQL.renew, queue.lease_params([lease.ref() for lease in mine], seconds)
        )
        renewed = {row[0] for row in await cur.fetchall()}
        for lease in mine:
            if lease.id not in renewed:
                log.warning("url=%s stage=lease lease lost (cancelled or taken over)", lease.url)
        self.held = renewed
        held = [lease.ref() for lease in mine if lease.id in renewed]
        if held:
            await conn.execute(queue.SQL.renew_claim, queue.lease_params(held, seconds))

    async def _run(self) -> None:
        dsn = db.database_dsn(self.settings)
        while True:
            await asyncio.sleep(self.interval)
            try:
                async with await psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, application_name="blogqa-lease"
                ) as conn:
                    await self.renew_once(conn)
            except psycopg.Error as exc:  # the next stage's writes are fenced anyway
                log.warning("stage=lease could not renew %d leases: %s", len(self.held), exc)
