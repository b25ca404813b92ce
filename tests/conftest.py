"""Fixtures that start the real service (embedded broker on port 0, SQLite in tmp_path), and waits."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from henge_mqtt.server import EmbeddedBroker
from henge_mqtt.service import HengeService
from henge_mqtt.settings import SessionConfig, Settings

from . import mqtt_raw

ROOT = Path(__file__).resolve().parent.parent

# Every `henge serve` a test starts binds only ports it chose: the HTTP API on a free port unless the test
# says otherwise (`.ci/run` holds 1883 and 8080 with another process while the suite runs).
os.environ["HENGE_HTTP"] = "127.0.0.1:0"


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    sessions = overrides.pop("sessions", None)
    settings = Settings(data_dir=data_dir, **overrides).with_listener("127.0.0.1", 0)
    if sessions is not None:
        settings = settings.model_copy(update={"sessions": SessionConfig(**sessions)})
    return settings


@dataclass
class Running:
    service: HengeService
    data_dir: Path

    @property
    def port(self) -> int:
        return self.service.address[1]

    async def add(self, device: str, config: dict[str, Any] | None = None) -> str:
        secret = await self.service.add_device(device)
        if config is not None:
            await self.service.push(device, config)
        return secret

    @property
    def broker(self) -> EmbeddedBroker:
        broker = self.service.broker
        assert isinstance(broker, EmbeddedBroker)
        return broker

    def retained(self, topic: str) -> bytes | None:
        found = self.broker.retained.get(topic)
        return found[0] if found else None

    def device_client(self, device: str, secret: str, **kwargs: Any) -> aiomqtt.Client:
        kwargs.setdefault("timeout", 5)
        return aiomqtt.Client("127.0.0.1", self.port, identifier=device, username=device, password=secret, **kwargs)

    def admin_client(self, **kwargs: Any) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", self.port, identifier=f"henge-admin-test-{id(kwargs)}",
                              username=self.service.settings.admin_name, password=self.service.admin_secret,
                              timeout=5, **kwargs)


@pytest.fixture(autouse=True)
async def close_raw_clients() -> AsyncIterator[None]:
    """Every raw peer a test opened is closed before its event loop goes."""
    yield
    while mqtt_raw.OPEN:
        mqtt_raw.OPEN.pop().close()
    await asyncio.sleep(0)  # let the transports finish closing


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Service tests run on SQLite; a module marked ``both_stores`` runs each on PostgreSQL too."""
    if "store_backend" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_stores") is not None
        metafunc.parametrize("store_backend", ["sqlite", "postgresql"] if both else ["sqlite"], indirect=True)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(store_backend: str, request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the data dir), or a fresh PostgreSQL database."""
    return str(request.getfixturevalue("pg_url")) if store_backend == "postgresql" else None


@pytest.fixture
async def running(tmp_path: Path, store_url: str | None) -> AsyncIterator[Running]:
    async with HengeService(make_settings(tmp_path / "data", store=store_url)) as service:
        yield Running(service, tmp_path / "data")


@pytest.fixture
def start_service(tmp_path: Path,
                  store_url: str | None) -> Callable[..., contextlib.AbstractAsyncContextManager[Running]]:
    """Start a service with custom settings: ``async with start_service(sessions={...}) as r``."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Running]:
        data_dir = overrides.pop("data_dir", tmp_path / "data")
        overrides.setdefault("store", store_url)
        async with HengeService(make_settings(data_dir, **overrides)) as service:
            yield Running(service, data_dir)

    return start


async def next_message(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            return message
    raise AssertionError("message stream ended")


async def no_message(client: aiomqtt.Client, wait: float = 0.5) -> None:
    with contextlib.suppress(TimeoutError):
        message = await next_message(client, wait)
        raise AssertionError(f"unexpected message on {message.topic}: {message.payload!r}")


def payload_json(message: aiomqtt.Message) -> Any:
    assert isinstance(message.payload, bytes | bytearray)
    return json.loads(message.payload)


def henge_cli(*args: str, input: str | None = None, timeout: float = 30, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run the real ``henge`` command as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "henge_mqtt", *args],
        input=input, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` (sync, or returning an awaitable) until true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


async def wait_status(running: Any, device: str, check: Callable[[dict[str, Any]], Any], timeout: float = 10.0
                      ) -> dict[str, Any]:
    """Wait until ``check`` holds for the device's status row; return that row."""
    found: dict[str, Any] = {}

    async def holds() -> bool:
        row = (await running.service.status(device))[0]
        found.update(row)
        return bool(check(row))

    await wait_until(holds, timeout, f"status of {device}")
    return found


async def reporting_device(running: Any, device: str, secret: str, *, reject: str | None = None
                           ) -> asyncio.Task[None]:
    """A real MQTT device (aiomqtt) that subscribes to its config and reports every version it gets:
    applied, or rejected with ``reject`` as its error. Cancel the task to disconnect it."""
    ready = asyncio.Event()

    async def run() -> None:
        async with running.device_client(device, secret) as c:
            await c.subscribe(running.service.topics.config(device), qos=1)
            ready.set()
            while True:
                snapshot = payload_json(await next_message(c, timeout=60))
                report: dict[str, Any] = {"version": snapshot["version"], "status": "rejected" if reject else "applied"}
                if reject:
                    report["error"] = reject
                await c.publish(running.service.topics.report(device), json.dumps(report), qos=1)

    task = asyncio.create_task(run())
    await asyncio.wait_for(ready.wait(), 5)
    return task


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One PostgreSQL cluster for the whole run; each test takes a fresh database from it."""
    from .pg import Cluster

    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(postgres: Any) -> str:
    return str(postgres.new_database())


if os.environ.get("HENGE_TEST_LOOP") == "uvloop":  # the whole suite on uvloop, as `henge serve` runs by default

    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
