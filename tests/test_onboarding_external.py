"""Onboarding by claim behind an external broker (docs/onboarding.md#behind-an-external-broker):
real Mosquitto with its dynamic security plugin, Mosquitto with password files (where claims
cannot work, and the CLI says so), and a real 3-node NATS cluster; paho-mqtt as a plain device and
the agent."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from .conftest import ROOT, henge_cli, wait_until
from .test_external import Fleet, external_fleet, wait_status
from .test_onboarding import plain_claim


def request_for(claim: dict[str, Any], device: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {"device": device, "secret": secret, "claim": claim["id"], "claim_secret": claim["secret"]} | extra


async def device_config(port: int, device: str, secret: str, timeout: float = 20.0) -> dict[str, Any]:
    """The config the broker serves the device, connected as itself (retried while the broker
    learns the identity, as a device's own backoff would)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", port, identifier=device, username=device, password=secret,
                                          timeout=5) as client:
                    await client.subscribe(f"henge/devices/{device}/config", qos=1)
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        return dict(json.loads(message.payload))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def accepted(port: int, user: str, password: str, timeout: float = 30.0, attempts: int = 0) -> None:
    """Until the broker accepts this user's CONNECT (as a device's backoff would try again), or
    within ``attempts`` tries."""
    async with asyncio.timeout(timeout):
        tried = 0
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", port, identifier=secrets.token_urlsafe(16), username=user,
                                          password=password, timeout=5):
                    return
            except aiomqtt.MqttError:
                tried += 1
                if tried == attempts:
                    raise
                await asyncio.sleep(0.2)


async def refused_at_connect(port: int, user: str, password: str) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port, identifier=secrets.token_urlsafe(16), username=user,
                                  password=password, timeout=5):
            pass


async def test_devices_claim_behind_mosquitto_with_dynamic_security(tmp_path: Path) -> None:
    """The claim's user reaches Mosquitto at once; a plain 3.1.1 device claims with its claim
    credential in the request and a secret of its own, then connects as itself and gets its
    layers' config; no claimer can read other claimers' answers; refusals are answered; a revoked
    claim is refused by the broker itself."""
    async with external_fleet(tmp_path, {}, identities="dynamic-security") as (fleet, _, _):
        svc = fleet.service
        await svc.set_layer("berlin", {"ntp": "ptb.de"}, labels={"site": "berlin"})
        claim = await svc.create_claim("batch-m", {"site": "berlin"}, 3, 3600,
                                       broker=f"mqtt://127.0.0.1:{fleet.device_port}")
        assert claim["broker"] == {"applied": True, "how": "dynamic-security", "detail": ""}
        user = f"claim:{claim['id']}"
        own = secrets.token_urlsafe(24)
        answer = await asyncio.to_thread(plain_claim, fleet.device_port, user, claim["secret"],
                                         request_for(claim, "cam-1", own, serial="SN-1"))
        assert answer == {"ok": True, "device": "cam-1", "labels": {"serial": "SN-1", "site": "berlin"}}
        assert "secret" not in answer  # the device chose it: no answer carries one here
        assert (await device_config(fleet.device_port, "cam-1", own))["config"] == {"ntp": "ptb.de"}

        # A device whose answer was lost asks again with the same nonce and secret: answered again, no use
        # counted; the same nonce with another secret (someone who saw the nonce in an answer): refused.
        kept, second = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
        first = await asyncio.to_thread(plain_claim, fleet.device_port, user, claim["secret"],
                                        request_for(claim, "cam-2", second), nonce=kept)
        again = await asyncio.to_thread(plain_claim, fleet.device_port, user, claim["secret"],
                                        request_for(claim, "cam-2", second), nonce=kept)
        assert first["ok"] and again["ok"] and again["device"] == "cam-2"
        stolen = await asyncio.to_thread(plain_claim, fleet.device_port, user, claim["secret"],
                                         request_for(claim, "cam-2", secrets.token_urlsafe(24)), nonce=kept)
        assert stolen["ok"] is False and stolen["code"] == "replay"
        assert [(c["used"], c["left"]) for c in await svc.list_claims()] == [(2, 1)]

        # Refusals, answered on the response topic.
        no_secret = await asyncio.to_thread(plain_claim, fleet.device_port, user, claim["secret"],
                                            {"device": "cam-3", "claim": claim["id"],
                                             "claim_secret": claim["secret"]})
        assert no_secret["ok"] is False and no_secret["code"] == "invalid" and "own secret" in no_secret["message"]
        wrong = await asyncio.to_thread(plain_claim, fleet.device_port, user, claim["secret"],
                                        request_for(claim, "cam-3", own) | {"claim_secret": "x" * 32})
        assert wrong["ok"] is False and wrong["code"] == "bad_credentials"
        taken = await asyncio.to_thread(plain_claim, fleet.device_port, user, claim["secret"],
                                        request_for(claim, "cam-1", secrets.token_urlsafe(24)))
        assert taken["ok"] is False and taken["code"] == "duplicate_device"
        assert not svc.store.has_device("cam-3")

        # A claimer can neither read every answer nor write anyone's answer nor a device's topics.
        async with aiomqtt.Client("127.0.0.1", fleet.device_port, identifier=secrets.token_urlsafe(16),
                                  username=user, password=claim["secret"], timeout=5) as snoop:
            for wide in ("henge/claim/+/response", "$share/g/henge/claim/+/response", "henge/claim/#", "henge/#",
                         "#", "henge/claim/+/+", "+/claim/+/response"):
                granted = await snoop.subscribe(wide, qos=1)
                assert [getattr(g, "value", g) for g in granted] == [128], wide  # refused
            await snoop.publish("henge/devices/cam-1/config", b'{"version": 99}', qos=1)
        assert (await device_config(fleet.device_port, "cam-1", own))["version"] == 1

        # Revoked: the broker itself refuses the claim's user (and closes its connections).
        async with aiomqtt.Client("127.0.0.1", fleet.device_port, identifier=secrets.token_urlsafe(16),
                                  username=user, password=claim["secret"], timeout=5) as live:
            result = await svc.revoke_claim(claim["id"])
            assert result["broker"]["applied"] is True
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(5):
                    async for _ in live.messages:
                        pass
        await refused_at_connect(fleet.device_port, user, claim["secret"])


async def test_the_agent_claims_behind_mosquitto_and_broker_config_keeps_claims(tmp_path: Path) -> None:
    """`henge agent --claim` behind Mosquitto: it claims, writes its secret, connects as itself; the
    CLI says the broker has the claim; `broker-config mosquitto` writes claims into the plugin's
    state, so a broker configured afresh still lets the batch claim."""
    async with external_fleet(tmp_path, {}, identities="dynamic-security") as (fleet, broker, _):
        data = str(fleet.data_dir)
        claim_file = tmp_path / "batch.claim"
        made = await asyncio.to_thread(henge_cli, "claim", "create", "batch-a", "--uses", "5", "--expires", "1h",
                                       "--label", "site=lab", "--device-broker",
                                       f"mqtt://127.0.0.1:{fleet.device_port}", "--out", str(claim_file),
                                       "--data", data)
        assert made.returncode == 0, made.stderr
        assert "broker: updated at once (Mosquitto dynamic security)" in made.stdout and made.stderr == ""
        await fleet.service.set_layer("lab", {"mode": "lab"}, labels={"site": "lab"})
        secret_file = tmp_path / "cam-a.secret"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "henge_mqtt", "agent", "--claim", str(claim_file), "--device", "cam-a",
            "--secret-file", str(secret_file), "--write", str(tmp_path / "cam-a.json"),
            "--state", str(tmp_path / "cam-a.state"), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        try:
            await wait_until(lambda: fleet.service.store.has_device("cam-a"), timeout=30, what="the claimed device")
            await wait_status(fleet, "cam-a", lambda r: r["online"] and r["sync"] == "in_sync", timeout=30)
            assert json.loads((tmp_path / "cam-a.json").read_text()) == {"mode": "lab"}
            assert secret_file.stat().st_mode & 0o777 == 0o600
            assert not (tmp_path / "cam-a.secret.claim-nonce").exists()
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)
        # The broker configured afresh from the store (stopped, broker-config, started): the claim is there.
        broker.stop()
        await wait_until(lambda: not fleet.service.broker.connected.is_set(),  # type: ignore[attr-defined]
                         what="henge seeing the broker gone")
        admin = fleet.service.settings.external_broker
        assert admin is not None
        written = await asyncio.to_thread(
            henge_cli, "broker-config", "mosquitto", "--data", data, "--out", str(broker.conf_dir), "--user", "root",
            "--device-listener", f"127.0.0.1:{fleet.device_port}", "--admin-listener", admin.removeprefix("mqtt://"))
        assert written.returncode == 0, written.stderr
        assert "1 claims" in written.stdout
        broker.start(fleet.device_port)
        credential = json.loads(claim_file.read_text())
        claim = {"id": credential["claim"], "secret": credential["secret"]}
        await fleet.service.broker.wait_connected(10)  # type: ignore[attr-defined]
        answer = await asyncio.to_thread(plain_claim, fleet.device_port, f"claim:{claim['id']}", claim["secret"],
                                         request_for(claim, "cam-b", secrets.token_urlsafe(24)))
        assert answer["ok"] is True and answer["labels"] == {"site": "lab"}


async def test_a_claim_behind_mosquitto_password_files_says_why_it_cannot_work(tmp_path: Path) -> None:
    """A password file cannot hold a claim's user name: the claim is stored (dynamic security
    configured later has it) and the CLI says, in one line on stderr, what would make it work."""
    async with external_fleet(tmp_path, {}, identities="password-file") as (fleet, _, _):
        result = await asyncio.to_thread(henge_cli, "claim", "create", "batch-p", "--uses", "1", "--expires", "1h",
                                         "--data", str(fleet.data_dir))
        assert result.returncode == 0, result.stderr
        assert result.stderr.startswith("warning: the broker does not know this yet: the broker does not run "
                                        "Mosquitto's dynamic security for henge, and a password file cannot hold a "
                                        "claim's user name")
        assert len(result.stderr.splitlines()) == 1
        out = fleet.data_dir.parent / "pw"
        written = await asyncio.to_thread(henge_cli, "broker-config", "mosquitto", "--identities", "password-file",
                                          "--data", str(fleet.data_dir), "--out", str(out), "--user", "root")
        assert written.returncode == 0 and "claim" not in (out / "passwd").read_text()
        assert written.stderr.startswith("warning: 1 claims are not in the password file")


@pytest.mark.xdist_group("nats")
async def test_devices_claim_through_a_nats_cluster(tmp_path: Path) -> None:
    """On a 3-node NATS cluster (MQTT 3.1.1): the claim's user is in the accounts file, every node
    reloaded, before `create_claim` answers; devices claim through any node, the cluster learns each
    new identity before its answer; a burst of claims shares reloads; revoked, the claim is refused."""
    from .nats_cluster import nats_service

    async with nats_service(tmp_path, []) as (svc, cluster, _):
        fleet = Fleet("nats", svc, cluster.mqtt_ports[1], tmp_path / "data")
        await svc.set_layer("berlin", {"ntp": "ptb.de"}, labels={"site": "berlin"})
        claim = await svc.create_claim("batch-n", {"site": "berlin"}, 10, 3600)
        assert claim["broker"] == {"applied": True, "how": "nats-accounts", "detail": ""}
        # Where devices connect: the device listener broker-config wrote (not henge's own connection).
        assert claim["credential"]["broker"] == f"mqtt://127.0.0.1:{cluster.mqtt_ports[0]}"
        user = f"claim:{claim['id']}"
        for port in cluster.mqtt_ports:  # "applied": every node has re-read the accounts file, none is late
            await accepted(port, user, claim["secret"], attempts=1)
        chosen = {f"cam-{i}": secrets.token_urlsafe(24) for i in range(6)}
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(len(chosen)) as devices:  # (not the loop's default threads: the service's)
            answers = await asyncio.gather(*(
                loop.run_in_executor(devices, functools.partial(
                    plain_claim, cluster.mqtt_ports[i % 3], user, claim["secret"], request_for(claim, device, secret),
                    timeout=60))
                for i, (device, secret) in enumerate(chosen.items())))
        assert sorted(a["device"] for a in answers if a["ok"]) == sorted(chosen), answers
        for i, (device, secret) in enumerate(chosen.items()):
            config = await device_config(cluster.mqtt_ports[(i + 1) % 3], device, secret, timeout=60)
            assert config["config"] == {"ntp": "ptb.de"}
        async with aiomqtt.Client("127.0.0.1", cluster.mqtt_ports[2], identifier="cam-0", username="cam-0",
                                  password=chosen["cam-0"], timeout=5):  # a plain client: presence from the cluster
            await wait_status(fleet, "cam-0", lambda r: r["online"])
        result = await svc.revoke_claim(claim["id"])
        assert result["broker"]["applied"] is True
        await wait_until(lambda: user not in (cluster.conf / "accounts.conf").read_text(), what="the user gone")
        await refused_at_connect(cluster.mqtt_ports[2], user, claim["secret"])


async def test_identity_sync_is_the_store_with_the_embedded_broker(running: Any) -> None:
    """Embedded, a claim needs nothing from a broker: the answer says so (how: store)."""
    claim = await running.service.create_claim("embedded", {}, 1, 60)
    assert claim["broker"] == {"applied": True, "how": "store", "detail": ""}


async def test_a_flood_of_requests_behind_a_broker_is_bounded_by_the_claim_rate(tmp_path: Path) -> None:
    """Any claim holder can publish requests there, with wrong credentials too: each takes its turn
    of the rate before anything else is done, so a flood costs henge a bounded amount and is told
    to come back later."""
    async with external_fleet(tmp_path, {}, identities="dynamic-security") as (fleet, _, _):
        svc = fleet.service
        claim = await svc.create_claim("batch-f", {}, 5, 3600)
        svc.onboarding.rate, svc.onboarding.burst = 0.01, 2  # two turns, then one a hundred seconds
        user = f"claim:{claim['id']}"
        answers = [await asyncio.to_thread(plain_claim, fleet.device_port, user, claim["secret"],
                                           request_for(claim, f"cam-{i}", secrets.token_urlsafe(24))
                                           | {"claim_secret": "wrong-" * 6})
                   for i in range(3)]
        assert [a["code"] for a in answers] == ["bad_credentials", "bad_credentials", "rate_limited"]
        assert svc.events.counters["claims_rate_limited"] >= 1 and not svc.store.has_device("cam-0")
