"""TLS listener with real TLS clients: server certificate, mutual TLS with CN = device id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from henge_mqtt.certs import make_dev_certs
from henge_mqtt.errors import ValidationFailed
from henge_mqtt.service import HengeService
from henge_mqtt.settings import ListenerConfig, Settings

from . import mqtt_raw as raw
from .conftest import henge_cli, next_message, payload_json


@contextlib.asynccontextmanager
async def tls_service(tmp_path: Path, **henge: Any) -> AsyncIterator[tuple[HengeService, int, Path]]:
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["dev1", "dev2"])
    listeners = {
        "default": {"type": "tcp", "bind": "127.0.0.1:0"},
        "tls": {"type": "tcp", "bind": "127.0.0.1:0", "ssl": True, "certfile": str(certs / "server.pem"),
                "keyfile": str(certs / "server.key"), "cafile": str(certs / "ca.pem")},
    }
    settings = Settings(data_dir=tmp_path / "data", listeners=listeners, **henge)
    async with HengeService(settings) as service:
        tls_port = service.broker.addresses()[1][1]
        yield service, tls_port, certs


def context(certs: Path, device: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if device:
        ctx.load_cert_chain(str(certs / f"{device}.pem"), str(certs / f"{device}.key"))
    return ctx


async def claim_over_tls(port: int, claim_id: str, ctx: ssl.SSLContext, asked: str,
                         password: str | None = None, nonce: str = "nonce-0123456789abcdef") -> dict[str, Any]:
    """Claim ``asked`` with claim ``claim_id`` over TLS with the certificate in ``ctx``: the answer."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=nonce, username=f"claim:{claim_id}",
                              password=password, tls_context=ctx, timeout=5) as client:
        await client.subscribe(f"henge/claim/{nonce}/response", qos=1)
        await client.publish(f"henge/claim/{nonce}/request", json.dumps({"device": asked}), qos=1)
        return dict(payload_json(await next_message(client)))


def factory_context(certs: Path, factory: Path, device: str) -> ssl.SSLContext:
    """Trusting the server's certificate (``certs``), with a certificate a claim CA signed."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(factory / f"{device}.pem"), str(factory / f"{device}.key"))
    return ctx


# Client certificates end in the service itself (0) and in listener processes (docs/scaling.md),
# which hand each verified certificate to the core with its connection.
PROCESSES = pytest.mark.parametrize("processes", [0, 2], ids=["in-process", "listener-processes"])


async def assert_config_over_tls(port: int, certs: Path, secret: str) -> None:
    """dev1 (whose config is ``{"tls": true}``) gets it over TLS with its password, through aiomqtt
    and through ``mosquitto_sub``."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="dev1", username="dev1", password=secret,
                              tls_context=context(certs), timeout=5) as client:
        await client.subscribe("henge/devices/dev1/config", qos=1)
        assert payload_json(await next_message(client))["config"] == {"tls": True}
    result = await asyncio.to_thread(subprocess.run, [
        "mosquitto_sub", "-h", "localhost", "-p", str(port), "--cafile", str(certs / "ca.pem"),
        "-i", "dev1", "-u", "dev1", "-P", secret, "-t", "henge/devices/dev1/config", "-C", "1", "-W", "10",
    ], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert '"tls":true' in result.stdout


async def test_tls_with_password_aiomqtt_and_mosquitto_sub(tmp_path: Path) -> None:
    async with tls_service(tmp_path) as (service, port, certs):
        secret = await service.add_device("dev1")
        await service.push("dev1", {"tls": True})
        await assert_config_over_tls(port, certs, secret)


async def test_plaintext_to_tls_port_fails(tmp_path: Path) -> None:
    async with tls_service(tmp_path) as (service, port, _):
        secret = await service.add_device("dev1")
        client = await raw.RawClient.open(port)
        await client.send(raw.connect("dev1", "dev1", secret))
        with pytest.raises((EOFError, TimeoutError, ConnectionError)):
            await client.connack(timeout=3)
        client.close()


@PROCESSES
async def test_mutual_tls_cn_must_equal_device_id(tmp_path: Path, processes: int) -> None:
    async with tls_service(tmp_path, tls_client_auth="optional", tls_cert_replaces_password=True,
                           listener_processes=processes) as (service, port, certs):
        await service.add_device("dev1", {"v": "1"})
        await service.add_device("dev2")
        await service.push("dev1", {"mtls": 1})
        # its own certificate, no password: accepted
        async with aiomqtt.Client("127.0.0.1", port, identifier="dev1", tls_context=context(certs, "dev1"),
                                  timeout=5) as client:
            await client.subscribe("henge/devices/dev1/config", qos=1)
            assert payload_json(await next_message(client))["config"] == {"mtls": 1}
        # dev2's certificate claiming to be dev1: refused, whatever the password
        with pytest.raises(aiomqtt.MqttCodeError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="dev1", tls_context=context(certs, "dev2"),
                                      timeout=5):
                pass
        # no certificate and no password: refused
        with pytest.raises(aiomqtt.MqttCodeError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="dev1", tls_context=context(certs), timeout=5):
                pass


@PROCESSES
async def test_required_client_certificates(tmp_path: Path, processes: int) -> None:
    async with tls_service(tmp_path, tls_client_auth="required", listener_processes=processes) as (
            service, port, certs):
        secret = await service.add_device("dev1")
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="dev1", username="dev1", password=secret,
                                      tls_context=context(certs), timeout=5):
                pass
        async with aiomqtt.Client("127.0.0.1", port, identifier="dev1", username="dev1", password=secret,
                                  tls_context=context(certs, "dev1"), timeout=5):
            assert (await service.status("dev1"))[0]["online"]


def test_certs_dev_command(tmp_path: Path) -> None:
    from .conftest import henge_cli

    result = henge_cli("certs", "dev", "--out", str(tmp_path / "c"), "--device", "d1")
    assert result.returncode == 0, result.stderr
    assert "production certificates come from your own PKI" in result.stderr
    for name in ("ca.pem", "server.pem", "server.key", "d1.pem", "d1.key"):
        assert (tmp_path / "c" / name).exists()
    assert oct((tmp_path / "c" / "d1.key").stat().st_mode & 0o777) == "0o600"
    bad = henge_cli("certs", "dev", "--out", str(tmp_path / "c2"), "--device", "a/b")
    assert bad.returncode == 2 and "invalid device id" in bad.stderr


async def test_remote_admin_over_mqtts_with_contexts(tmp_path: Path) -> None:
    """The CLI from elsewhere: mqtts:// with a CA, credentials from the environment or a context."""
    import asyncio
    import json

    import yaml

    from .conftest import henge_cli

    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], [])
    listeners = {"default": ListenerConfig(bind="127.0.0.1:0"),
                 "tls": ListenerConfig(bind="127.0.0.1:0", ssl=True, certfile=certs / "server.pem",
                                       keyfile=certs / "server.key")}
    settings = Settings(data_dir=tmp_path / "data", listeners=listeners)
    async with HengeService(settings) as service:
        await service.add_device("remote-1", {"site": "far"})
        tls_port = service.broker.addresses()[1][1]
        url = f"mqtts://127.0.0.1:{tls_port}"
        env = {"HENGE_BROKER": url, "HENGE_ADMIN_SECRET": service.admin_secret, "HENGE_CA": str(certs / "ca.pem"),
               "HENGE_CONFIG": str(tmp_path / "none.yaml")}
        by_env = await asyncio.to_thread(henge_cli, "status", "--json", env=env)
        assert by_env.returncode == 0, by_env.stderr
        assert json.loads(by_env.stdout)[0]["device"] == "remote-1"
        untrusted = await asyncio.to_thread(henge_cli, "status", env={**env, "HENGE_CA": ""})
        assert untrusted.returncode == 1 and "Traceback" not in untrusted.stderr  # the dev CA is not trusted

        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"current": "gw", "contexts": {
            "gw": {"broker": url, "secret": service.admin_secret, "ca": str(certs / "ca.pem")},
            "local": {"data": str(tmp_path / "data")}}}))
        for context_env in ({}, {"HENGE_CONTEXT": "local"}):
            by_context = await asyncio.to_thread(henge_cli, "status", "--json",
                                                 env={"HENGE_CONFIG": str(config), **context_env})
            assert by_context.returncode == 0, by_context.stderr
            assert json.loads(by_context.stdout)[0]["device"] == "remote-1"
        missing = await asyncio.to_thread(henge_cli, "status", env={"HENGE_CONFIG": str(config),
                                                                    "HENGE_CONTEXT": "nope"})
        assert missing.returncode == 1 and "no context 'nope'" in missing.stderr


@pytest.mark.parametrize("processes", [0, 1], ids=["in-process", "listener-process"])
async def test_a_certificate_from_a_claim_ca_claims_its_cn_and_nothing_else(tmp_path: Path, processes: int) -> None:
    """The mTLS claim (docs/onboarding.md): a factory puts a certificate signed by a claim CA on each
    device; over TLS it claims the id its certificate names, without the claim secret; the
    certificate is good for claiming only, never as a device's own. With a listener process, the
    claim CA made while it runs reaches it (a TRUST frame on its link)."""
    factory = tmp_path / "factory"
    make_dev_certs(factory, ["localhost"], ["SN-1", "SN-2", "dev1"], ca_name="factory claim CA")
    async with tls_service(tmp_path, tls_client_auth="optional", tls_cert_replaces_password=True,
                           listener_processes=processes) as (service, port, certs):
        await service.set_layer("factory", {"from": "factory"}, labels={"batch": "f1"})
        pem = (factory / "ca.pem").read_text()
        claim = await service.create_claim("factory", {"batch": "f1"}, 10, 3600, ca=pem)
        assert (await service.list_claims())[0]["ca"] == "CN=factory claim CA, O=henge-mqtt dev"

        def device_context(device: str) -> ssl.SSLContext:
            return factory_context(certs, factory, device)

        async def claim_as(device: str, asked: str, password: str | None = None) -> dict[str, Any]:
            return await claim_over_tls(port, claim["id"], device_context(device), asked, password,
                                        nonce="n" + device.replace("-", "") + "0123456789abcdef")

        answer = await claim_as("SN-1", "SN-1")
        assert answer["ok"] is True and answer["device"] == "SN-1" and answer["labels"] == {"batch": "f1"}
        assert (await service.get_version("SN-1")).config == {"from": "factory"}
        refused = await claim_as("SN-2", "SN-1-twin")
        assert refused["ok"] is False and refused["code"] == "invalid" and "its CN ('SN-2')" in refused["message"]
        # As a device's own certificate it counts as none: no password-less login for SN-1 with it,
        # even with tls_cert_replaces_password; with its secret, SN-1 connects.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="SN-1", username="SN-1",
                                      tls_context=device_context("SN-1"), timeout=5):
                pass
        async with aiomqtt.Client("127.0.0.1", port, identifier="SN-1", username="SN-1", password=answer["secret"],
                                  tls_context=device_context("SN-1"), timeout=5):
            pass
        # A device CA's certificate with the same CN is not a claim CA's: it needs the claim secret.
        await service.add_device("dev1")
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="n" * 20, username=f"claim:{claim['id']}",
                                      tls_context=context(certs, "dev1"), timeout=5):
                pass
        # A second claim CA with the name of one the listeners trust is refused: its certificates could
        # not be told apart.
        with pytest.raises(ValidationFailed, match="already has this name"):
            await service.create_claim("again", {}, 1, 3600, ca=pem)
        with pytest.raises(ValidationFailed, match=r"give one CA certificate \(CA:TRUE\), not 0"):
            await service.create_claim("bad", {}, 1, 3600, ca=(factory / "SN-1.pem").read_text())
        with pytest.raises(ValidationFailed, match="not a PEM certificate"):
            await service.create_claim("bad", {}, 1, 3600, ca="garbage")
        assert [c["name"] for c in await service.list_claims()] == ["factory"]  # nothing stored for those


async def test_a_claim_ca_needs_a_listener_that_asks_for_certificates(tmp_path: Path) -> None:
    async with tls_service(tmp_path) as (service, _, certs):
        with pytest.raises(ValidationFailed, match="tls_client_auth"):
            await service.create_claim("x", {}, 1, 3600, ca=(certs / "ca.pem").read_text())


@PROCESSES
async def test_claim_cas_are_trusted_again_after_a_restart_and_set_from_the_cli(tmp_path: Path,
                                                                               processes: int) -> None:
    factory = tmp_path / "factory"
    make_dev_certs(factory, ["localhost"], ["SN-7"], ca_name="factory 2 claim CA")
    async with tls_service(tmp_path, tls_client_auth="optional") as (service, _, _):
        made = await asyncio.to_thread(henge_cli, "claim", "create", "f2", "--uses", "5", "--expires", "1d", "--ca",
                                       str(factory / "ca.pem"), "--json", "--data", str(tmp_path / "data"))
        assert made.returncode == 0, made.stderr
        claim_id = json.loads(made.stdout)["id"]
    # Started again (with listener processes: they start trusting what the core's listeners trust).
    async with tls_service(tmp_path, tls_client_auth="optional", listener_processes=processes) as (
            service, port, certs):
        answer = await claim_over_tls(port, claim_id, factory_context(certs, factory, "SN-7"), "SN-7")
        assert answer["ok"] is True
        assert service.store.has_device("SN-7")
