"""The blocking admin client (``henge_mqtt.admin_call``), which the CLI's one-shot commands run on
(so that they start without asyncio): a long call keeps its connection with pings, a call that ticks
gets its time again at every tick, and it fails in the asyncio client's words.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from henge_mqtt.admin_call import AdminCall
from henge_mqtt.client import AdminClient
from henge_mqtt.endpoint import Endpoint
from henge_mqtt.errors import AuthenticationFailed, RemoteError, ServiceUnavailable

from .conftest import Running, next_message
from .ports import free_port


async def test_a_call_longer_than_the_keepalive_keeps_its_connection(running: Running) -> None:
    """The service cuts a client silent for 1.5 x its keep-alive; a blocking call that waits 3 s with
    a keep-alive of 1 s pings meanwhile, so the answer it gets is the op's own (the device did not
    report in time), not a lost connection."""
    await running.add("d1", {"a": 1})
    endpoint = Endpoint.from_data_dir(running.data_dir)

    def call() -> tuple[str, float]:
        with AdminCall(endpoint, timeout=5, keepalive=1) as admin:
            started = time.monotonic()
            with pytest.raises(RemoteError) as failed:
                admin.call("wait", wait=3, device="d1", version=1, timeout=3)
            waited = time.monotonic() - started
            assert admin.call("get", device="d1")["version"] == 1  # still connected after it
            return failed.value.code, waited

    code, waited = await asyncio.to_thread(call)
    assert code == "timeout" and waited >= 3


async def test_each_progress_tick_gives_a_call_its_time_again(running: Running) -> None:
    """A fleet push that waits 2 s for a report that never comes, asked with 1.5 s in all (timeout 1
    plus wait 0.5): the progress ticks (every 0.25 s) renew the deadline, so the answer arrives, and
    the last tick counts what the answer says."""
    secret = await running.add("silent", {"a": 1})
    async with running.device_client("silent", secret) as device:
        await device.subscribe("henge/devices/silent/config", qos=1)
        await next_message(device)  # online, holding version 1; it never reports
        endpoint = Endpoint.from_data_dir(running.data_dir)
        ticks: list[dict[str, Any]] = []

        def call() -> Any:
            with AdminCall(endpoint, timeout=1) as admin:
                return admin.call("push_many", wait=0.5, progress=ticks.append, all=True, labels={},
                                  config={"a": 2}, message="", delivery_timeout=1, force=False, where=None,
                                  report_timeout=2)

        result = await asyncio.to_thread(call)
    assert result["devices"] == 1 and result["pending"] == 1
    counted = [t for t in ticks if "pending" in t]
    assert counted and counted[-1]["pending"] == result["pending"] == 1


async def test_both_admin_clients_fail_in_the_same_words(running: Running) -> None:
    """Wrong credentials, and no service at all: the blocking client says what the asyncio one says."""
    good = Endpoint.from_data_dir(running.data_dir)
    wrong = good._replace(secret="not-the-secret", socket=None)
    said: list[str] = []
    for endpoint, error in ((wrong, AuthenticationFailed), (good._replace(port=free_port(), socket=None),
                                                            ServiceUnavailable)):
        with pytest.raises(error) as blocking:
            await asyncio.to_thread(lambda e=endpoint: AdminCall(e, timeout=5).__enter__())  # type: ignore[misc]
        with pytest.raises(error) as on_asyncio:
            async with AdminClient(endpoint, timeout=5):
                pass
        said += [str(blocking.value), str(on_asyncio.value)]
    assert said[0] == said[1] == (f"the service at 127.0.0.1:{good.port} refused the admin credentials for "
                                  f"{good.username!r}")
    prefix = f"cannot reach the service at 127.0.0.1:{said[2].split(':')[1].split(' ')[0]} (is `henge serve` running?)"
    assert said[2].startswith(prefix) and said[3].startswith(prefix)
