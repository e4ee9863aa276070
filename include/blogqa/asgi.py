"""An ASGI app built on its first request, for the Airflow plugin.

Airflow imports every plugin module in every task process (the task runner looks for
listeners when a task ends), so whatever the plugin module imports at the top is paid by every
task instance: building the results API there meant importing FastAPI, the templates, the
model clients and their dependencies in each task, for an app that only the api-server serves.
The plugin hands Airflow this wrapper instead; the api-server mounts it like any ASGI app, and
the real app is built (and its modules imported) when the first request reaches it.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class LazyApp:
    """Calls `module:function(**kwargs)` once, on first use, and forwards every ASGI call to
    the app it returns. Building is synchronous (no await between the check and the
    assignment), so concurrent first requests on one event loop build it once."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        self.target = target
        self.kwargs = kwargs
        self._app: Any = None

    @property
    def app(self) -> Any:
        """The real app, built now if it was not yet."""
        if self._app is None:
            module, _, function = self.target.partition(":")
            self._app = getattr(importlib.import_module(module), function)(**self.kwargs)
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    def __repr__(self) -> str:
        return f"LazyApp({self.target!r})"
