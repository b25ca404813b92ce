"""The rollout planner and its decisions (henge_mqtt/rollouts.py): properties and a state machine."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from henge_mqtt.rollout_plan import Policy, WaveCount, check_waves, decide, order, parse_max_rejected, plan

device_ids = st.lists(st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True), max_size=300, unique=True)
wave_marks = st.lists(st.floats(0.01, 99.99), max_size=6).map(lambda ws: [*sorted(set(ws)), 100.0])


@given(device_ids, wave_marks, st.text(min_size=1, max_size=8))
@settings(max_examples=300)
def test_waves_partition_the_devices_in_a_stable_order(devices: list[str], marks: list[float], rid: str) -> None:
    waves = plan(rid, devices, waves=marks)
    flat = [d for wave in waves for d in wave]
    assert sorted(flat) == sorted(devices)  # every device, exactly once
    assert all(waves)  # no empty wave
    assert flat == order(rid, devices)  # waves are consecutive slices of one stable order
    assert plan(rid, list(reversed(devices)), waves=marks) == waves  # the input order does not matter
    if devices:
        # Each cumulative mark is reached: after the wave for mark p, at least ceil(n*p/100) devices.
        n, done = len(devices), 0
        sizes = [len(w) for w in waves]
        assert sizes[0] >= 1
        for wave in waves:
            done += len(wave)
        assert done == n
        assert len(waves) <= len(marks)
        first_cut = min(n, max(1, math.ceil(n * marks[0] / 100)))
        assert sizes[0] == first_cut or len(waves) == 1


@given(device_ids, st.integers(1, 50), st.text(min_size=1, max_size=8))
def test_wave_size_gives_full_waves_but_the_last(devices: list[str], size: int, rid: str) -> None:
    waves = plan(rid, devices, wave_size=size)
    assert [len(w) for w in waves[:-1]] == [size] * (len(waves) - 1)
    assert sum(map(len, waves)) == len(devices)


def test_another_rollout_picks_other_canaries() -> None:
    devices = [f"d{i:04d}" for i in range(1000)]
    first = plan("r-1", devices, waves=[1, 100])[0]
    second = plan("r-2", devices, waves=[1, 100])[0]
    assert len(first) == len(second) == 10 and first != second
    assert plan("r-1", devices, waves=[1, 100])[0] == first


@pytest.mark.parametrize("bad", [[], [50], [10, 5, 100], [0, 100], [50, 150]])
def test_bad_waves_are_refused(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        check_waves(bad)


def test_max_rejected_parses_devices_and_percent() -> None:
    assert parse_max_rejected("3") == (3.0, False)
    assert parse_max_rejected("5%") == (5.0, True)
    for bad in ("x", "-1", "150%"):
        with pytest.raises(ValueError):
            parse_max_rejected(bad)


counts = st.builds(lambda t, o, a, r: WaveCount(t, min(o, t), min(a, t), min(a, o, t), min(r, t - min(a, t))),
                   st.integers(0, 200), st.integers(0, 200), st.integers(0, 200), st.integers(0, 200))
policies = st.builds(Policy, st.integers(0, 10).map(float), st.booleans(), st.floats(0, 100), st.floats(0.1, 100),
                     st.just(0.0))


@given(counts, policies, st.floats(0, 200))
def test_a_decision_follows_the_policy(count: WaveCount, policy: Policy, elapsed: float) -> None:
    decision, why = decide(count, policy, started=0.0, now=elapsed)
    too_many = count.rejected > policy.rejected_limit(count.targeted)
    enough = count.applied_online >= math.ceil(count.online_at_start * policy.min_applied / 100)
    if too_many:
        assert decision == "halt" and "rejected" in why
    elif enough:
        assert decision == "pass"
    elif elapsed >= policy.wave_timeout:
        assert decision == "halt" and "timed out" in why
    else:
        assert decision == "wait"


class RolloutMachine(RuleBasedStateMachine):
    """A rollout driven by the planner and `decide`, with devices reporting in any order and time
    passing: a device is published at most once, waves go out in order, a halt stops everything,
    and a rollout only completes when every wave passed."""

    @initialize(devices=st.lists(st.integers(0, 999), min_size=1, max_size=60, unique=True),
                marks=wave_marks, policy=policies,
                online=st.sets(st.integers(0, 999)))
    def setup(self, devices: list[int], marks: list[float], policy: Policy, online: set[int]) -> None:
        self.ids = [f"d{i}" for i in devices]
        self.waves = plan("r-test", self.ids, waves=marks)
        self.policy = policy
        self.online = {f"d{i}" for i in online}
        self.wave, self.now, self.started = 0, 0.0, 0.0
        self.state = "running"
        self.published: list[str] = []
        self.reports: dict[str, str] = {}
        self.publish_wave()

    def publish_wave(self) -> None:
        self.published += self.waves[self.wave]
        self.started = self.now

    def count(self) -> WaveCount:
        wave = self.waves[self.wave]
        at_start = [d for d in wave if d in self.online]
        return WaveCount(len(wave), len(at_start), sum(self.reports.get(d) == "applied" for d in wave),
                         sum(self.reports.get(d) == "applied" for d in at_start),
                         sum(self.reports.get(d) == "rejected" for d in wave))

    @rule(data=st.data(), status=st.sampled_from(["applied", "rejected"]))  # late reports too
    def a_device_reports(self, data: st.DataObject, status: str) -> None:
        candidates = [d for d in self.published if d not in self.reports]
        if candidates:
            self.reports[data.draw(st.sampled_from(candidates))] = status

    @precondition(lambda self: self.state == "running")
    @rule(seconds=st.floats(0, 50))
    def time_passes_and_the_runner_looks(self, seconds: float) -> None:
        self.now += seconds
        decision, _ = decide(self.count(), self.policy, started=self.started, now=self.now)
        if decision == "halt":
            self.state = "halted"
        elif decision == "pass":
            count = self.count()  # a wave passes only within its rejection limit and with enough applied
            assert count.rejected <= self.policy.rejected_limit(count.targeted)
            assert count.applied_online >= math.ceil(count.online_at_start * self.policy.min_applied / 100)
            if self.wave + 1 == len(self.waves):
                self.state = "completed"
            else:
                self.wave += 1
                self.publish_wave()

    @invariant()
    def each_device_published_once_and_waves_in_order(self) -> None:
        assert len(self.published) == len(set(self.published))
        assert self.published == [d for wave in self.waves[: self.wave + 1] for d in wave]

    @invariant()
    def completed_means_every_device_was_published(self) -> None:
        if self.state == "completed":
            assert sorted(self.published) == sorted(self.ids) and self.wave == len(self.waves) - 1


TestRolloutMachine = RolloutMachine.TestCase
TestRolloutMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
