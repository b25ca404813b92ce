"""Staged rollouts, the pure part: who is in which wave, and when a wave passes or halts.

No I/O and no clock of its own (times are arguments), so it is tested exhaustively with
hypothesis (``tests/test_rollout_planner.py``); the service's runner (``service/rollouts.py``)
stores what this decides and acts on it.

Wave membership is a stable hash of the rollout id and the device id: the same canaries when a
rollout resumes after a crash, and reproducible in tests, yet a different sample per rollout.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Literal

Decision = Literal["wait", "pass", "halt"]


def order(rollout_id: str, devices: list[str]) -> list[str]:
    """The devices in the rollout's stable pseudo-random order."""
    return sorted(set(devices), key=lambda d: (hashlib.sha256(f"{rollout_id}\0{d}".encode()).digest(), d))


def plan(rollout_id: str, devices: list[str], *, waves: list[float] | None = None,
         wave_size: int | None = None) -> list[list[str]]:
    """Split ``devices`` into waves: ``waves`` are cumulative percentages ending at 100 (1,10,50,100),
    or ``wave_size`` devices per wave. Every device is in exactly one wave; no wave is empty."""
    ordered = order(rollout_id, devices)
    n = len(ordered)
    if n == 0:
        return []
    if wave_size is not None:
        if wave_size < 1:
            raise ValueError("a wave holds at least one device")
        return [ordered[i:i + wave_size] for i in range(0, n, wave_size)]
    marks = check_waves(waves or [100.0])
    cuts: list[int] = []
    for percent in marks:
        cut = min(n, max(1, math.ceil(n * percent / 100)))
        if not cuts or cut > cuts[-1]:
            cuts.append(cut)
    cuts[-1] = n
    result, start = [], 0
    for cut in cuts:
        result.append(ordered[start:cut])
        start = cut
    return result


def check_waves(waves: list[float]) -> list[float]:
    if not waves:
        raise ValueError("give at least one wave")
    if any(not 0 < w <= 100 for w in waves) or any(b <= a for a, b in itertools.pairwise(waves)):
        raise ValueError("waves are cumulative percentages, rising, each above 0 and at most 100 (1,10,50,100)")
    if waves[-1] != 100:
        raise ValueError("the last wave must reach 100 (percent of the devices)")
    return waves


@dataclass(frozen=True, slots=True)
class Policy:
    max_rejected: float = 1  # devices; with ``rejected_percent``, a percentage of the wave
    rejected_percent: bool = False
    min_applied: float = 90.0  # percent of the wave's devices that were online when it went out
    wave_timeout: float = 300.0
    pause: float = 0.0

    def rejected_limit(self, wave_size: int) -> float:
        return self.max_rejected * wave_size / 100 if self.rejected_percent else self.max_rejected


def parse_max_rejected(text: str) -> tuple[float, bool]:
    """``3`` (devices) or ``5%`` (of each wave)."""
    percent = text.endswith("%")
    try:
        value = float(text[:-1] if percent else text)
    except ValueError:
        raise ValueError(f"--max-rejected wants a number of devices or a percentage (3 or 5%), not {text!r}") from None
    if value < 0 or (percent and value > 100):
        raise ValueError(f"--max-rejected out of range: {text!r}")
    return value, percent


@dataclass(frozen=True, slots=True)
class WaveCount:
    targeted: int
    online_at_start: int
    applied: int
    applied_online: int  # of those online at the start
    rejected: int


def decide(count: WaveCount, policy: Policy, *, started: float, now: float) -> tuple[Decision, str]:
    """Whether a wave halts (too many rejections, or it timed out short of ``min_applied``), passes,
    or waits. Rejections are counted over the whole wave; ``min_applied`` over the devices that
    were online when it went out (a wave with none online passes: they get it when they connect)."""
    limit = policy.rejected_limit(count.targeted)
    if count.rejected > limit:
        return "halt", f"{count.rejected} rejected, more than the limit of {limit:g}"
    need = math.ceil(count.online_at_start * policy.min_applied / 100)
    if count.applied_online >= need:
        return "pass", f"{count.applied_online} of {count.online_at_start} online devices applied (need {need})"
    if now - started >= policy.wave_timeout:
        return "halt", (f"wave timed out after {policy.wave_timeout:g} s: {count.applied_online} of "
                        f"{count.online_at_start} online devices applied, {need} needed")
    return "wait", ""
