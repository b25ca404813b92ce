"""The store's one thread: every call runs there in order, datasette's habit; the loop only awaits.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, ParamSpec, TypeVar

if TYPE_CHECKING:
    from .store import Store



P = ParamSpec("P")


T = TypeVar("T")


class StoreWorker:
    """The store's one thread: calls run there in the order they were made; the loop only awaits.

    ``has_device``/``verify_device``/``verify_admin`` read in-memory dicts and may be called from
    the loop directly; everything else goes through :meth:`run`.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="henge-store")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.submit(fn, *args, **kwargs)

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Queued now, in order with every other call (a fleet push stores its next chunk while
        the loop publishes the last); the future is the call's result."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
