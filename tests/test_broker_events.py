"""Presence from a broker's connection events (``henge_mqtt.broker_events``): pure, so a hypothesis
state machine drives it through every order the events of a cluster can arrive in."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from henge_mqtt.broker_events import BrokerConnection, ConnectionTracker, Ended
from henge_mqtt.sessions import Emit, PresenceChange, SessionSettings, SessionTable

DEVICES = ["d1", "d2", "d3"]


def table() -> SessionTable:
    # as the external broker makes it: the broker owns takeover, henge refuses nothing
    return SessionTable(replace(SessionSettings(), conflict_policy="flag", connect_burst=math.inf,
                                connect_rate=math.inf))


def conn(key: str, device: str, client_id: str | None = None, started: str = "") -> BrokerConnection:
    return BrokerConnection(key, device, client_id or device, "10.0.0.1:1", started)


def presence(actions: list[object]) -> list[tuple[bool, str]]:
    return [(a.online, a.reason) for a in actions if isinstance(a, PresenceChange)]


def test_a_takeover_reported_in_either_order_never_shows_the_device_offline() -> None:
    for new_first in (True, False):
        t = ConnectionTracker(table())
        t.connected(conn("A/1", "d1", started="1"), 1.0)
        if new_first:
            assert presence(t.connected(conn("B/7", "d1", started="2"), 2.0)) == [(True, "takeover")]
            assert t.disconnected("A/1", 2.1, "takeover") == []  # stale
        else:
            assert presence(t.disconnected("A/1", 2.0, "takeover")) == [(False, "takeover")]
            assert presence(t.connected(conn("B/7", "d1", started="2"), 2.1)) == [(True, "connected")]
        assert t.table.is_current("d1", t.table.current_epoch("d1") or 0)


def test_a_deferred_takeover_end_is_stale_once_the_newer_connection_came() -> None:
    t = ConnectionTracker(table())
    t.connected(conn("A/1", "d1"), 1.0)
    ended = t.end("A/1")  # NATS said "Duplicate Client ID": the newer one is on its way
    assert isinstance(ended, Ended)
    t.connected(conn("B/2", "d1"), 1.5)
    assert t.settle(ended, 3.0, "takeover") == []
    assert t.table.online_devices() == ["d1"]


def test_the_end_of_the_current_connection_hands_over_to_one_still_live() -> None:
    """Events crossed between nodes: the older connection's start arrived last and became current;
    when it ends, the newer one (still live) becomes current: a takeover, never an offline."""
    t = ConnectionTracker(table())
    t.connected(conn("B/2", "d1", started="2"), 1.0)
    t.connected(conn("A/1", "d1", started="1"), 1.1)  # reported late: current now, though older
    assert presence(t.disconnected("A/1", 1.2, "takeover")) == [(True, "takeover")]
    assert t.table.online_devices() == ["d1"]
    assert presence(t.disconnected("B/2", 2.0, "connection_closed")) == [(False, "connection_closed")]


def test_a_client_id_that_is_not_the_user_is_flagged_and_counts_for_the_user() -> None:
    t = ConnectionTracker(table())
    actions = t.connected(conn("A/1", "d1", client_id="d2"), 1.0)
    flagged = [a for a in actions if isinstance(a, Emit) and a.type == "identity_mismatch"]
    assert flagged and flagged[0].device == "d1" and dict(flagged[0].data)["client_id"] == "d2"
    assert t.table.online_devices() == ["d1"] and t.mismatches == 1


def test_the_admin_and_unknown_users_are_not_devices() -> None:
    t = ConnectionTracker(table(), known=lambda user: user in DEVICES)
    assert t.connected(BrokerConnection("A/1", "henge-admin", "henge-service"), 1.0) == []
    assert t.connected(BrokerConnection("A/2", None, "anon"), 1.0) == []
    assert t.table.online_devices() == []


def test_a_snapshot_ends_what_a_lost_node_never_reported_and_never_revives_an_end() -> None:
    t = ConnectionTracker(table())
    t.connected(conn("A/1", "d1"), 1.0)
    t.connected(conn("B/1", "d2"), 1.0)
    mark = t.mark()
    t.disconnected("B/1", 1.5, "connection_closed")  # after the request, before the answer
    # node A was killed (no events); B's answer was made before B/1 ended
    actions = t.snapshot([conn("B/1", "d2")], mark, 2.0)
    assert presence(actions) == [(False, "connection_lost")]
    assert t.table.online_devices() == []
    # a connection the events missed (henge was not listening) is learned from the next snapshot
    assert presence(t.snapshot([conn("C/9", "d3")], t.mark(), 3.0)) == [(True, "connected")]


class TrackerMachine(RuleBasedStateMachine):
    """The broker's truth (which connections live) against what the tracker makes of events that
    arrive late, early, twice or never; after the deferred ends settle and a snapshot, presence is
    the truth."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = ConnectionTracker(table())
        self.truth: dict[str, str] = {}  # live key -> device
        self.unreported: list[tuple[str, str]] = []  # started connections whose CONNECT is still in flight
        self.deferred: list[Ended] = []
        self.next_key = 0
        self.now = 0.0

    def tick(self) -> float:
        self.now += 0.1
        return self.now

    @rule(device=st.sampled_from(DEVICES), reported=st.booleans())
    def connect(self, device: str, reported: bool) -> None:
        self.next_key += 1
        key = f"N{self.next_key % 3}/{self.next_key}"
        self.truth[key] = device
        if reported:
            self.tracker.connected(conn(key, device, started=f"{self.next_key:06d}"), self.tick())
        else:
            self.unreported.append((key, device))

    @precondition(lambda self: self.unreported)
    @rule(data=st.data())
    def late_connect_event(self, data: st.DataObject) -> None:
        key, device = self.unreported.pop(data.draw(st.integers(0, len(self.unreported) - 1)))
        self.tracker.connected(conn(key, device, started=key.split("/")[1].zfill(6)), self.tick())

    @precondition(lambda self: self.truth)
    @rule(data=st.data(), how=st.sampled_from(["now", "deferred", "lost", "twice"]))
    def end(self, data: st.DataObject, how: str) -> None:
        key = data.draw(st.sampled_from(sorted(self.truth)))
        del self.truth[key]
        if how == "now":
            self.tracker.disconnected(key, self.tick(), "connection_closed")
        elif how == "twice":
            self.tracker.disconnected(key, self.tick(), "connection_closed")
            assert self.tracker.disconnected(key, self.tick(), "connection_closed") == []
        elif how == "deferred":
            ended = self.tracker.end(key)
            if ended is not None:
                self.deferred.append(ended)
        # "lost": the node died, nothing is reported

    @precondition(lambda self: self.deferred)
    @rule()
    def settle(self) -> None:
        for ended in self.deferred:
            self.tracker.settle(ended, self.tick(), "takeover")
        self.deferred.clear()

    @rule()
    def snapshot(self) -> None:
        """Every node answers with what lives; CONNECT events still in flight are thereby known."""
        mark = self.tracker.mark()
        self.tracker.snapshot([conn(k, d, started=k.split("/")[1].zfill(6)) for k, d in self.truth.items()],
                              mark, self.tick())
        self.unreported = [(k, d) for k, d in self.unreported if k not in self.truth]
        for ended in self.deferred:
            self.tracker.settle(ended, self.tick(), "takeover")
        self.deferred.clear()
        assert set(self.tracker.table.online_devices()) == set(self.truth.values())

    @invariant()
    def a_device_with_a_reported_live_connection_is_online(self) -> None:
        reported = set(self.truth) - {k for k, _ in self.unreported}
        online = set(self.tracker.table.online_devices())
        assert {self.truth[k] for k in reported} <= online
        if not self.deferred and not self.unreported:
            # and nothing else, except devices whose end was never reported (a lost node)
            assert len(self.tracker) >= len(reported)


TestTrackerMachine = TrackerMachine.TestCase
TestTrackerMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
