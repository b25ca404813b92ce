"""The pure session table: unit cases plus a hypothesis state machine over arbitrary interleavings."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, rule

from henge_mqtt.sessions import (
    Close,
    Emit,
    PresenceChange,
    PublishWill,
    SaveEpoch,
    SessionSettings,
    SessionTable,
    take_token,
)


def kinds(actions: tuple[object, ...], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def test_takeover_closes_old_without_will_and_stays_online() -> None:
    t = SessionTable()
    first = t.connect("d", 100.0, "10.0.0.1:1", 60)
    second = t.connect("d", 101.0, "10.0.0.2:1", 60)
    assert first.accepted and second.accepted and second.epoch == first.epoch + 1
    closes = kinds(second.actions, Close)
    assert closes == [Close("d", first.epoch, "takeover", publish_will=False)]
    presence = kinds(second.actions, PresenceChange)
    assert presence[-1].online and presence[-1].reason == "takeover" and presence[-1].epoch == second.epoch
    # the old connection's disconnect and will arrive late: nothing happens
    assert t.disconnect("d", first.epoch, 102.0, "connection_lost") == ()
    assert t.is_current("d", second.epoch)


def test_takeover_will_publish_setting() -> None:
    t = SessionTable(SessionSettings(takeover_will="publish"))
    first = t.connect("d", 1.0, None, 60)
    second = t.connect("d", 2.0, None, 60)
    assert Close("d", first.epoch, "takeover", publish_will=True) in second.actions


def test_abnormal_end_publishes_will_and_goes_offline() -> None:
    t = SessionTable()
    r = t.connect("d", 1.0, "a", 10)
    actions = t.disconnect("d", r.epoch, 16.0, "keepalive_timeout")
    assert kinds(actions, PublishWill) == [PublishWill("d", r.epoch)]  # (by type: a SaveEpoch is an equal tuple)
    assert kinds(actions, PresenceChange)[0].reason == "keepalive_timeout"
    assert not t.view("d", 16.0).online
    # a clean DISCONNECT: no will
    r2 = t.connect("d", 20.0, "a", 10)
    assert kinds(t.disconnect("d", r2.epoch, 21.0, "client_disconnect"), PublishWill) == []


def test_epochs_survive_restart_through_seed() -> None:
    t = SessionTable()
    t.seed("d", 41)
    assert t.connect("d", 1.0, None, 60).epoch == 42
    t.seed("d", 3)  # never lowers
    assert t.connect("d", 2.0, None, 60).epoch == 43


def test_ping_pong_is_a_conflict_but_silent_drops_are_not() -> None:
    t = SessionTable()
    now = 1000.0
    for _ in range(3):  # reconnect after the old connection went silent past its keep-alive
        t.connect("quiet", now, "10.0.0.1:1", 5)
        now += 30
    assert not t.view("quiet", now).conflict

    emitted: list[Emit] = []
    for i in range(5):
        r = t.connect("twin", now + i, f"10.0.0.{1 + i % 2}:1", 60)
        emitted += kinds(r.actions, Emit)
    view = t.view("twin", now + 5)
    assert view.conflict and set(view.conflict_remotes) == {"10.0.0.1:1", "10.0.0.2:1"}
    assert [e.type for e in emitted].count("conflict") == 1
    assert view.online  # policy "flag": keep serving the newest
    # quiet period clears it
    cleared = t.tick(now + 5 + 601)
    assert [e.type for e in kinds(cleared, Emit)] == ["conflict_cleared"]
    assert not t.view("twin", now + 700).conflict


def test_quarantine_refuses_with_doubling_cooldown() -> None:
    t = SessionTable(SessionSettings(conflict_policy="quarantine", quarantine_initial=10, quarantine_max=25))
    now = 0.0
    results = [t.connect("d", now + i * 0.1, "r", 60) for i in range(5)]
    assert [r.accepted for r in results] == [True, True, True, True, False]
    assert results[-1].refusal == "quarantined"
    assert not t.view("d", 1).online
    assert t.connect("d", 5.0, "r", 60).refusal == "quarantined"
    start = 11.0  # after the 10 s cooldown
    again = [t.connect("d", start + i * 0.1, "r", 60) for i in range(5)]
    assert again[-1].refusal == "quarantined"
    assert t.view("d", start + 1).quarantined_until == start + 0.4 + 20  # doubled
    third_start = start + 0.4 + 21
    third = [t.connect("d", third_start + i * 0.1, "r", 60) for i in range(5)]
    assert t.view("d", third_start + 1).quarantined_until == third_start + 0.4 + 25  # capped
    assert third[-1].refusal == "quarantined"
    assert t.clear_conflict("d") and t.connect("d", third_start + 1, "r", 60).accepted


def test_connect_rate_limit_token_bucket() -> None:
    t = SessionTable(SessionSettings(connect_burst=3, connect_rate=1, conflict_takeovers=100))
    results = [t.connect("d", 0.0, None, 60) for _ in range(5)]
    assert [r.accepted for r in results] == [True, True, True, False, False]
    assert results[3].refusal == "rate_limited"
    assert t.connect("d", 1.0, None, 60).accepted  # one token refilled


def test_kick_and_shutdown() -> None:
    t = SessionTable()
    r = t.connect("d", 1.0, None, 60)
    actions = t.kick("d", 2.0)
    assert Close("d", r.epoch, "kicked", publish_will=False) in actions
    assert t.kick("d", 3.0) == ()
    r2 = t.connect("d", 4.0, None, 60)
    shutdown = t.shutdown(5.0)
    assert Close("d", r2.epoch, "server_shutdown", publish_will=False) in shutdown
    assert kinds(shutdown, PresenceChange)[0].reason == "server_shutdown"


# ---- the state machine ---------------------------------------------------------------------------

DEVICES = ("a", "b", "c")
REASONS = ("client_disconnect", "connection_lost", "keepalive_timeout", "protocol_error")


class SessionMachine(RuleBasedStateMachine):
    """Connections appear, vanish, go silent and report late, in any order, for a few devices."""

    connections = Bundle("connections")

    @initialize(policy=st.sampled_from(["flag", "quarantine"]), will=st.sampled_from(["suppress", "publish"]))
    def setup(self, policy: str, will: str) -> None:
        self.table = SessionTable(SessionSettings(conflict_policy=policy, takeover_will=will,  # type: ignore[arg-type]
                                                  quarantine_initial=5, connect_burst=5, connect_rate=1))
        self.now = 1000.0
        self.live: dict[str, int | None] = dict.fromkeys(DEVICES)
        self.epochs: dict[str, list[int]] = {d: [] for d in DEVICES}
        self.presence: dict[str, PresenceChange] = {}
        self.saved: dict[str, int] = dict.fromkeys(DEVICES, 0)

    def _apply(self, actions: tuple[object, ...]) -> None:
        for action in actions:
            if isinstance(action, Close):
                assert self.live[action.device] == action.epoch, "only the current connection is closed"
                if self.live[action.device] == action.epoch:
                    self.live[action.device] = None
            elif isinstance(action, PresenceChange):
                self.presence[action.device] = action
            elif isinstance(action, SaveEpoch):
                assert action.epoch > self.saved[action.device], "epochs strictly increase"
                self.saved[action.device] = action.epoch
            elif isinstance(action, PublishWill):
                assert self.live[action.device] == action.epoch, "only the current connection's will"

    @rule(target=connections, device=st.sampled_from(DEVICES), dt=st.floats(0, 30),
          remote=st.sampled_from(["10.0.0.1:1", "10.0.0.2:1", None]), keepalive=st.sampled_from([5.0, 60.0]))
    def connect(self, device: str, dt: float, remote: str | None, keepalive: float):  # type: ignore[no-untyped-def]
        self.now += dt
        before = self.table.current_epoch(device)
        result = self.table.connect(device, self.now, remote, keepalive)
        self._apply(result.actions)
        if not result.accepted:
            # a refused CONNECT closes nothing, unless its quarantine decision did
            assert self.table.current_epoch(device) in (before, None)
            return multiple()
        assert not self.epochs[device] or result.epoch > max(self.epochs[device])
        assert self.live[device] is None, "the old connection was closed by the takeover"
        self.epochs[device].append(result.epoch)
        self.live[device] = result.epoch
        return (device, result.epoch)

    @rule(conn=connections, reason=st.sampled_from(REASONS), dt=st.floats(0, 10))
    def disconnect(self, conn: tuple[str, int], reason: str, dt: float) -> None:
        device, epoch = conn
        self.now += dt
        stale = not self.table.is_current(device, epoch)
        before = self.table.view(device, self.now)
        actions = self.table.disconnect(device, epoch, self.now, reason)
        if stale:
            assert actions == (), "an older epoch's event changes nothing"
            assert self.table.view(device, self.now) == before
        self._apply(actions)
        if not stale:
            self.live[device] = None

    @rule(conn=connections, dt=st.floats(0, 10))
    def heard(self, conn: tuple[str, int], dt: float) -> None:
        self.now += dt
        self.table.heard(conn[0], conn[1], self.now)

    @rule(device=st.sampled_from(DEVICES))
    def kick(self, device: str) -> None:
        self._apply(self.table.kick(device, self.now))
        self.live[device] = None

    @rule(dt=st.floats(0, 700))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._apply(self.table.tick(self.now))

    @rule(device=st.sampled_from(DEVICES))
    def clear(self, device: str) -> None:
        self._apply(self.table.clear_conflict(device))

    @invariant()
    def one_current_connection_matching_presence(self) -> None:
        if not hasattr(self, "table"):
            return
        for device in DEVICES:
            current = self.table.current_epoch(device)
            assert current == self.live[device]
            view = self.table.view(device, self.now)
            # the fleet's counts read presence without a view: the same answer, always
            assert self.table.presence(device, self.now) == (view.state, view.conflict)
            if device in self.presence:
                p = self.presence[device]
                assert p.online == view.online
                assert p.epoch == (max(self.epochs[device] + [self.saved[device]]))
                if view.online:
                    assert p.epoch == current


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


@given(rate=st.floats(0.01, 1000), burst=st.floats(1, 100),
       gaps=st.lists(st.floats(0, 5), min_size=1, max_size=60))
def test_take_token_is_the_token_bucket_it_replaced(rate: float, burst: float, gaps: list[float]) -> None:
    """``take_token`` keeps a token bucket as one number (the time it is full again): it allows
    exactly what a bucket of ``burst`` tokens refilled at ``rate`` a second allows, packet by packet
    (the reference below is the TokenBucket object it replaced), up to rounding at the boundary."""
    tokens, at, full_at, now = burst, 0.0, 0.0, 1000.0
    for gap in gaps:
        now += gap
        tokens, at = min(burst, tokens + max(0.0, now - at) * rate), max(at, now)
        left = tokens - 1.0
        taken, full_at = take_token(full_at, now, rate, burst)
        if abs(left) > 1e-6:  # not at the very edge of a token, where rounding may go either way
            assert taken == (left >= 0), (tokens, full_at, now)
        tokens = max(0.0, tokens - 1.0) if taken else max(tokens, 0.0)


def test_take_token_survives_a_clock_stepping_back() -> None:
    """The connect rate runs on the wall clock: a step back leaves the bucket empty, not in debt."""
    full_at = 0.0
    for _ in range(3):
        taken, full_at = take_token(full_at, 1000.0, 1.0, 3.0)
        assert taken
    taken, full_at = take_token(full_at, 1000.0, 1.0, 3.0)
    assert not taken  # empty
    taken, full_at = take_token(full_at, 400.0, 1.0, 3.0)
    assert not taken  # ten minutes back: still empty, no worse
    assert take_token(full_at, 401.0, 1.0, 3.0)[0]  # a second later one token is back
