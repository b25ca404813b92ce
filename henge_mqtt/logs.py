"""Log lines a peer can cause, bounded: shared by the server core, the service and the CLI."""

from __future__ import annotations

import logging
import time


class LogLimiter:
    """At most ``rate`` lines per second per event name; the rest are counted and summarized.

    A hostile client can cause a log line per packet; this keeps the log to a few lines a second
    whatever it sends, and says how many were dropped.
    """

    def __init__(self, logger: logging.Logger, rate: float = 5.0) -> None:
        self.logger = logger
        self.rate = rate
        self._state: dict[str, list[float]] = {}  # event -> [tokens, last time, suppressed]

    def log(self, level: int, event: str, fmt: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        state = self._state.get(event)
        if state is None:
            state = self._state[event] = [self.rate, now, 0.0]
        state[0] = min(self.rate, state[0] + (now - state[1]) * self.rate)
        state[1] = now
        if state[0] < 1.0:
            state[2] += 1
            return
        state[0] -= 1.0
        suppressed = int(state[2])
        state[2] = 0
        if suppressed:
            self.logger.log(level, "%s (%d similar lines suppressed) " + fmt, event, suppressed, *args)
        else:
            self.logger.log(level, "%s " + fmt, event, *args)
