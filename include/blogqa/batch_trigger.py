"""Waiting for an OpenAI batch in Airflow's triggerer (BLOGQA_LLM_MODE=batch).

A batch can take up to 24 hours. A task that waited for it in a worker would hold a worker
slot (and a `blogqa_llm` pool slot) all that time; a deferred task holds neither, and this
trigger, one coroutine among many in the triggerer, polls the batch until it has ended.
It touches no database: it reads the endpoint settings from the environment (OPENAI_*,
BLOGQA_*) like every other component, and its serialized arguments carry no credentials.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)

CLASSPATH = "blogqa.batch_trigger.BatchTrigger"


class BatchTrigger(BaseTrigger):
    """Polls batch `batch_id` every `poll_seconds` until it is terminal (completed, failed,
    expired, cancelled), then fires one event: {"batch_id", "status"}, plus "error" when
    polling itself failed for a reason retrying cannot fix (credentials, unknown batch).

    Transient polling errors (connection, 429, 5xx) are logged and polled through: a blip
    in the endpoint must not fail a task whose paid batch is still running."""

    def __init__(self, batch_id: str, poll_seconds: float = 60.0) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.poll_seconds = float(poll_seconds)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """What the triggerer stores to rebuild this trigger: class path and arguments."""
        return CLASSPATH, {"batch_id": self.batch_id, "poll_seconds": self.poll_seconds}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the batch is terminal; yield exactly one event."""
        from blogqa.config import load_settings
        from blogqa.llm import openai_client

        client = openai_client(load_settings())
        try:
            yield TriggerEvent(await self._poll(client))
        finally:
            await client.close()

    async def _poll(self, client) -> dict:
        """The event's payload once the batch has ended (or cannot be polled at all)."""
        import openai

        from blogqa.batch import TERMINAL_STATUSES, batch_status

        while True:
            try:
                status = await batch_status(client, self.batch_id)
            except (
                openai.APIConnectionError,
                openai.RateLimitError,
                openai.InternalServerError,
            ) as exc:
                log.warning(
                    "stage=summarize batch=%s poll failed, retrying: %s", self.batch_id, exc
                )
            except openai.OpenAIError as exc:
                log.error("stage=summarize batch=%s cannot be polled: %s", self.batch_id, exc)
                return {"batch_id": self.batch_id, "status": "error", "error": str(exc)}
            else:
                log.info("stage=summarize batch=%s status=%s", self.batch_id, status)
                if status in TERMINAL_STATUSES:
                    return {"batch_id": self.batch_id, "status": status}
            await asyncio.sleep(self.poll_seconds)
