"""Reproduce, against stock amqtt 0.12.1, each defect henge's broker layer exists to fix.

Each test here asserts the *stock* misbehaviour; if an amqtt upgrade fixes one, its test fails and
tells us a workaround may be obsolete. The matching fixes are asserted in test_sessions_e2e.py and
test_core_e2e.py against henge's broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import amqtt
import pytest
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin

from . import mqtt_raw as raw


class PasswordIsGood(BaseAuthPlugin):
    """Stock-broker auth for the tests: the password 'good' is right, anything else wrong."""

    async def authenticate(self, *, session: Any) -> bool | None:
        return bool(session.password == "good")


@contextlib.asynccontextmanager
async def stock_broker(auth: str = "anonymous") -> AsyncIterator[int]:
    plugins: dict[str, Any] = (
        {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        if auth == "anonymous"
        else {f"{__name__}.PasswordIsGood": {}}
    )
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}, "plugins": plugins})
    await broker.start()
    try:
        yield broker._servers["default"].instance.sockets[0].getsockname()[1]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 5)


async def connected(port: int, client_id: str, **kwargs: Any) -> raw.RawClient:
    client = await raw.RawClient.open(port)
    await client.send(raw.connect(client_id, **kwargs))
    assert await client.connack() == 0
    return client


def test_amqtt_version_is_pinned() -> None:
    assert amqtt.__version__ == "0.12.1"


async def test_stock_clean_session_takeover_leaves_old_connection_open() -> None:
    async with stock_broker() as port:
        old = await connected(port, "dev1", username="dev1", password="x")
        new = await connected(port, "dev1", username="dev1", password="x")
        assert not await old.closed_within(1.0), "stock amqtt now closes the old connection"
        old.close()
        new.close()


async def test_stock_persistent_takeover_publishes_the_new_connections_will() -> None:
    """clean_session=0 on both: the old one is closed, but the *new* one's will goes out, as if it were gone."""
    async with stock_broker() as port:
        watcher = await connected(port, "watcher", username="watcher", password="x")
        await watcher.send(raw.subscribe(1, "wills/#", qos=0))
        await watcher.read_packet()  # SUBACK
        old = await connected(port, "dev1", username="dev1", password="x", clean=False, will=("wills/old", b"OLD"))
        new = await raw.RawClient.open(port)
        await new.send(raw.connect("dev1", "dev1", "x", clean=False, will=("wills/new", b"NEW")))
        assert await new.connack() == 0
        assert await old.closed_within(2.0)
        wills = []
        with contextlib.suppress(TimeoutError, EOFError):
            while True:
                kind, body = await watcher.read_packet(1.5)
                if kind == 3:
                    wills.append(body)
        assert any(b.endswith(b"NEW") for b in wills), "stock amqtt no longer publishes the new connection's will"
        for c in (watcher, new):
            c.close()


async def test_stock_sends_other_clients_retained_messages_on_connect() -> None:
    async with stock_broker() as port:
        owner = await connected(port, "owner", username="owner", password="x")
        await owner.send(raw.subscribe(1, "private/owner", qos=0))
        await owner.read_packet()  # SUBACK
        publisher = await connected(port, "pub", username="pub", password="x")
        await publisher.send(raw.publish("private/owner", b"secret", retain=True))
        await asyncio.sleep(0.2)
        stranger = await connected(port, "stranger", username="stranger", password="x")
        kind, body = await stranger.read_packet(2.0)  # it never subscribed to anything
        assert kind == 3 and body.endswith(b"secret")
        for c in (owner, publisher, stranger):
            c.close()


async def test_stock_does_not_enforce_keepalive() -> None:
    async with stock_broker() as port:
        silent = await connected(port, "zombie", username="zombie", password="x", keepalive=1)
        assert not await silent.closed_within(3.0), "stock amqtt now enforces keep-alive"
        silent.close()


async def test_stock_wrong_password_kicks_persistent_victim() -> None:
    async with stock_broker(auth="password") as port:
        victim = await connected(port, "victim", username="victim", password="good", clean=False)
        attacker = await raw.RawClient.open(port)
        await attacker.send(raw.connect("victim", username="victim", password="wrong", clean=False))
        assert await attacker.connack() == 5
        assert await victim.closed_within(2.0), "stock amqtt no longer lets a failed CONNECT kick the victim"
        attacker.close()


@pytest.mark.parametrize("n", [60])
async def test_stock_concurrent_connects_with_retained_fail(n: int) -> None:
    """Concurrent CONNECTs while subscriptions exist: stock amqtt drops many of them."""
    async with stock_broker() as port:
        subs = []
        for i in range(20):
            c = await connected(port, f"s{i}", username=f"s{i}", password="x")
            await c.send(raw.subscribe(1, f"t/{i}", qos=0))
            await c.read_packet()
            subs.append(c)
        pub = await connected(port, "pub", username="pub", password="x")
        for i in range(20):
            await pub.send(raw.publish(f"t/{i}", b"r", retain=True))
        await asyncio.sleep(0.2)

        async def one(i: int) -> bool:
            try:
                c = await raw.RawClient.open(port)
                await c.send(raw.connect(f"c{i}", username=f"c{i}", password="x"))
                ok = await c.connack(3.0) == 0
                await c.send(raw.subscribe(1, f"new/{i}", qos=0))  # grows the subscription dict
                kind, _ = await c.read_packet(3.0)
                ok = ok and kind == 9
                # a healthy broker keeps it open
                alive = not await c.closed_within(0.5)
                c.close()
                return ok and alive
            except (EOFError, TimeoutError, ConnectionError):
                return False

        results = await asyncio.gather(*(one(i) for i in range(n)))
        assert not all(results), "stock amqtt handled every concurrent connect"
        for c in [*subs, pub]:
            c.close()
