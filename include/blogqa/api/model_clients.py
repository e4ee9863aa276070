"""The API's model clients: one AsyncOpenAI per event loop, reused by every request.

A new AsyncOpenAI builds its own httpx pool and TLS context and opens a new connection, which
per search or answer costs more CPU than the rest of the request and under load uses up a
core. One client per process serves every request instead, on kept-alive connections.

Per event loop, not per process: an httpx pool belongs to the loop that opened its
connections, and a process may run more than one loop over its life (tests, a TestClient per
app). The chat client and the embedding client share one HTTP pool; they differ only in their
timeout (`with_options` copies the client around the same pool). The app's lifespan closes the
pool on shutdown; a sub-application mounted by Airflow gets no lifespan events, so there it
lives as long as the api-server process.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from blogqa.config import Settings
from blogqa.llm import openai_client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopClients:
    """The clients of one event loop: chat (llm timeout) and embeddings (embed timeout)."""

    loop: asyncio.AbstractEventLoop
    chat: object  # AsyncOpenAI
    embed: object  # AsyncOpenAI sharing chat's HTTP pool


class ModelClients:
    """Lazily made, reused AsyncOpenAI clients, one set per running event loop."""

    def __init__(self) -> None:
        self._by_loop: dict[int, LoopClients] = {}

    def for_settings(self, settings: Settings) -> LoopClients | None:
        """The current loop's clients, made on first use; None for the offline provider
        (it calls no endpoint)."""
        if settings.offline:
            return None
        loop = asyncio.get_running_loop()
        found = self._by_loop.get(id(loop))
        if found is not None and found.loop is loop:
            return found
        self._forget_closed_loops()
        chat = openai_client(settings)
        embed = chat.with_options(timeout=settings.embed_timeout)
        made = LoopClients(loop, chat, embed)
        self._by_loop[id(loop)] = made
        log.info("model clients made for this event loop (stage api, url %s)", chat.base_url)
        return made

    def chat(self, settings: Settings):
        clients = self.for_settings(settings)
        return clients.chat if clients else None

    def embed(self, settings: Settings):
        clients = self.for_settings(settings)
        return clients.embed if clients else None

    def _forget_closed_loops(self) -> None:
        for key, clients in list(self._by_loop.items()):
            if clients.loop.is_closed():
                del self._by_loop[key]

    async def aclose(self) -> None:
        """Close the current loop's clients (their shared HTTP pool). Clients of other,
        already closed loops are dropped: their connections went with their loop."""
        loop = asyncio.get_running_loop()
        clients = self._by_loop.pop(id(loop), None)
        self._forget_closed_loops()
        if clients is not None and clients.loop is loop:
            await clients.chat.close()

    def __len__(self) -> int:
        return len(self._by_loop)
