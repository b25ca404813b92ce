"""Owned background tasks: every task the broker layers and the service start without awaiting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    """Tasks nobody awaits still have an owner: tracked, cancelled on close, failures logged."""

    def __init__(self, logger: logging.Logger, event: str) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = logger
        self._event = event

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.debug("%s error=%r", self._event, task.exception())

    async def cancel_all(self, timeout: float) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def __len__(self) -> int:
        return len(self._tasks)
