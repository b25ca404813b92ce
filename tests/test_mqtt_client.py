"""henge's own MQTT client (external mode's connection), against a real broker (henge's embedded one)."""

from __future__ import annotations

import asyncio

import pytest

from henge_mqtt.mqtt_client import MqttClient, MqttClientError

from .conftest import Running, next_message


async def admin(running: Running, got: list[tuple[str, bytes]], **kwargs: object) -> MqttClient:
    svc = running.service
    return await MqttClient.connect("127.0.0.1", running.port, client_id="henge-admin-client-test",
                                    username=svc.settings.admin_name, password=svc.admin_secret,
                                    on_message=lambda t, p: got.append((t, p)), **kwargs)  # type: ignore[arg-type]


async def test_publishes_beyond_the_in_flight_window_all_arrive_in_order(running: Running) -> None:
    secret = await running.add("dev1")
    got: list[tuple[str, bytes]] = []
    client = await admin(running, got, max_inflight=8)
    try:
        async with running.device_client("dev1", secret) as device:
            await device.subscribe("henge/devices/dev1/config", qos=1)
            futures = [client.publish("henge/devices/dev1/config", str(i).encode(), qos=1) for i in range(40)]
            await asyncio.wait_for(asyncio.gather(*futures), 10)
            received = [int((await next_message(device)).payload) for _ in range(40)]  # type: ignore[arg-type]
            assert received == list(range(40))
        await client.subscribe([("henge/devices/+/report", 1)])
        async with running.device_client("dev1", secret) as device:
            await device.publish("henge/devices/dev1/report", b'{"version": 1, "status": "applied"}', qos=1)

            async def heard() -> None:
                while not got:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(heard(), 5)
        assert got[0][0] == "henge/devices/dev1/report"
    finally:
        client.close()


async def test_a_refusal_and_a_lost_connection_are_clear_errors(running: Running) -> None:
    with pytest.raises(MqttClientError, match="bad user name or password"):
        await MqttClient.connect("127.0.0.1", running.port, client_id="x", username="henge-admin", password="wrong",
                                 on_message=lambda t, p: None)
    got: list[tuple[str, bytes]] = []
    client = await admin(running, got)
    await running.service.stop()  # the broker goes away with messages in flight
    await asyncio.wait_for(client.closed, 5)
    failed = client.publish("henge/x", b"1", qos=1)
    with pytest.raises(MqttClientError, match="not connected"):
        await failed
