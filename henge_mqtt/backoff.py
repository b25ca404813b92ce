"""Reconnect backoff shared by the device agent and the external-broker client."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter, bounded by ``cap``.

    ``attempt`` counts failures in a row; a connection that lasted is a success and resets it.
    A connection that is closed right after it was accepted (another client with our identity, or
    quarantine) counts as ``penalty`` failures so the two devices stop fighting quickly.
    """

    base: float = 1.0
    cap: float = 60.0
    penalty: int = 3
    rand: Callable[[], float] = random.random
    attempt: int = 0

    def ceiling(self) -> float:
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 30))

    def next_delay(self) -> float:
        delay = self.rand() * self.ceiling()
        self.attempt += 1
        return delay

    def failed_hard(self) -> float:
        self.attempt += self.penalty - 1
        return self.next_delay()

    def reset(self) -> None:
        self.attempt = 0
