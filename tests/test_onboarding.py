"""Onboarding by claim (docs/onboarding.md): a batch of devices shares a claim credential and each
gets an identity of its own on first contact, with paho-mqtt as a plain device (5.0 and 3.1.1),
raw MQTT 5 for the reason codes, the agent (`henge agent --claim`), and the CLI."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from henge_mqtt import codec
from henge_mqtt.errors import UnknownClaim

from .conftest import ROOT, Running, henge_cli, wait_status, wait_until
from .test_mqtt5 import Client5


def nonce() -> str:
    return secrets.token_urlsafe(16)


async def claim_with_raw5(running: Running, credential: dict[str, Any], request: dict[str, Any],
                          nonce_: str | None = None) -> tuple[int, dict[str, Any] | None]:
    """A raw 5.0 client: (PUBACK reason code, the answer on the response topic, or None)."""
    who = nonce_ or nonce()
    client, connack = await Client5.connect(running.port, who, f"claim:{credential['claim']}", credential["secret"])
    assert connack.code == 0, connack
    topics = running.service.topics
    await client.send(codec.Subscribe(1, ((topics.claim_response(who), 1),)))
    assert (await client.read_until(codec.Suback)).codes == (1,)
    await client.send(codec.Publish(topics.claim_request(who), json.dumps(request).encode(), 1, packet_id=2))
    ack = answer = None
    while ack is None or answer is None:  # the answer may come before the PUBACK (a refusal) or after
        packet = await client.read(timeout=5)
        if isinstance(packet, codec.Puback):
            ack = packet
        elif isinstance(packet, codec.Publish):
            answer = packet
            if answer.qos:
                await client.send(codec.Puback(answer.packet_id))
    client.raw.close()
    await wait_until(lambda: f"claim:{who}" not in running.broker.conns, what="the claiming connection closed")
    return int(ack.reason), json.loads(answer.payload)


async def test_a_device_claims_its_identity_gets_its_layers_and_connects_as_itself(running: Running) -> None:
    svc = running.service
    await svc.set_layer("berlin", {"ntp": "ptb.de"}, labels={"site": "berlin"})
    claim = await svc.create_claim("batch-1", {"site": "berlin"}, 2, 3600)
    credential = claim["credential"]
    assert credential == {"claim": claim["id"], "secret": claim["secret"], "broker": f"mqtt://127.0.0.1:{running.port}",
                          "topic_prefix": "henge"}
    code, answer = await claim_with_raw5(running, credential, {"device": "cam-17", "serial": "SN-0017"})
    assert code == 0 and answer is not None and answer["ok"] is True
    assert answer["device"] == "cam-17" and answer["labels"] == {"site": "berlin", "serial": "SN-0017"}
    # The device now exists with the claim's labels and its layers' first version, and connects as itself.
    assert (await svc.get_version("cam-17")).config == {"ntp": "ptb.de"}
    _own, connack = await Client5.connect(running.port, "cam-17", "cam-17", answer["secret"])
    assert connack.code == 0
    await wait_status(running, "cam-17", lambda r: r["online"])
    [info] = await svc.list_claims()
    assert (info["used"], info["left"], info["state"]) == (1, 1, "active")
    audit = await svc.audit("cam-17")
    assert audit[0]["action"] == "device.claim" and audit[0]["actor"] == "claim:batch-1"
    assert "secret" not in json.dumps(audit)
    # The last use, then the claim is used up: refused at CONNECT (5.0: 0x87 with the reason).
    code, answer = await claim_with_raw5(running, credential, {"serial": "SN-0018"})
    assert code == 0 and answer == answer | {"ok": True, "device": "SN-0018"}
    _, connack = await Client5.connect(running.port, nonce(), f"claim:{claim['id']}", claim["secret"])
    assert connack.code == codec.NOT_AUTHORIZED_5
    assert "used up" in (connack.props or {}).get(codec.REASON_STRING, "")
    assert (await svc.list_claims())[0]["state"] == "used_up"


async def test_refusals_replays_and_nothing_half_created(running: Running) -> None:
    svc = running.service
    await running.add("taken", {"v": 1})
    claim = await svc.create_claim("batch", {}, 10, 3600)
    credential = claim["credential"]
    # A wrong secret, a client id that is no nonce: refused at CONNECT.
    _, connack = await Client5.connect(running.port, nonce(), f"claim:{claim['id']}", "wrong")
    assert connack.code == codec.BAD_USER_NAME_OR_PASSWORD
    _, connack = await Client5.connect(running.port, "short", f"claim:{claim['id']}", claim["secret"])
    assert connack.code == codec.NOT_AUTHORIZED_5
    # An id that exists, a bad request: refused with a reason code and a readable answer; nothing stored.
    code, answer = await claim_with_raw5(running, credential, {"device": "taken"})
    assert code == codec.NOT_AUTHORIZED_5 and answer == {"ok": False, "code": "duplicate_device",
                                                        "message": "device 'taken' already exists"}
    for bad in ({"device": "no/slash"}, {"device": 7}, {"name": "x"}, {}):
        code, answer = await claim_with_raw5(running, credential, bad)
        assert code == codec.PAYLOAD_FORMAT_INVALID and answer is not None and answer["code"] == "invalid", bad
    # A nonce that claimed cannot claim another device; once its device connected, not even connect.
    used = nonce()
    code, answer = await claim_with_raw5(running, credential, {"device": "d1"}, used)
    assert code == 0 and answer is not None and answer["ok"]
    code, again = await claim_with_raw5(running, credential, {"device": "d2"}, used)
    assert code == codec.NOT_AUTHORIZED_5 and again is not None and again["code"] == "replay"
    _device, _ = await Client5.connect(running.port, "d1", "d1", answer["secret"])
    await wait_status(running, "d1", lambda r: r["online"])
    _, connack = await Client5.connect(running.port, used, f"claim:{claim['id']}", claim["secret"])
    assert connack.code == codec.NOT_AUTHORIZED_5 and "claimed before" in (connack.props or {})[codec.REASON_STRING]
    assert [c["used"] for c in await svc.list_claims()] == [1]
    assert {d.id for d in await svc.list_devices()} == {"taken", "d1"}
    # Another connection with a nonce that is connected cannot read its answer: refused.
    first, _ = await Client5.connect(running.port, "n" * 20, f"claim:{claim['id']}", claim["secret"])
    _, connack = await Client5.connect(running.port, "n" * 20, f"claim:{claim['id']}", claim["secret"])
    assert connack.code == codec.NOT_AUTHORIZED_5
    # A claiming client may touch nothing but its own request and response topics.
    await first.send(codec.Subscribe(3, (("henge/claim/+/response", 1), ("henge/devices/d1/config", 1))))
    assert (await first.read_until(codec.Suback)).codes == (codec.NOT_AUTHORIZED_5, codec.NOT_AUTHORIZED_5)
    await first.send(codec.Publish("henge/devices/d1/report", b'{"version": 1, "status": "applied"}', 1,
                                   packet_id=4))
    assert (await first.read_until(codec.Puback)).reason == codec.NOT_AUTHORIZED_5
    # Expired: refused at CONNECT (the time passing is what this checks).
    brief = await svc.create_claim("brief", {}, 5, 0.3)
    await asyncio.sleep(0.4)
    _, connack = await Client5.connect(running.port, nonce(), f"claim:{brief['id']}", brief["secret"])
    assert connack.code == codec.NOT_AUTHORIZED_5 and "expired" in (connack.props or {})[codec.REASON_STRING]
    assert {c["name"]: c["state"] for c in await svc.list_claims()}["brief"] == "expired"
    # Revoked: refused at once.
    await svc.revoke_claim("batch")
    _, connack = await Client5.connect(running.port, nonce(), f"claim:{claim['id']}", claim["secret"])
    assert connack.code == codec.NOT_AUTHORIZED_5 and "revoked" in (connack.props or {})[codec.REASON_STRING]
    with pytest.raises(UnknownClaim):
        await svc.revoke_claim("nope")


async def test_a_flood_of_claims_is_rate_limited_and_costs_nothing_else(start_service: Any) -> None:
    async with start_service(claim_rate=1.0, claim_burst=3) as running:
        claim = await running.service.create_claim("batch", {}, 100, 3600)
        codes = []
        for _ in range(6):
            _, connack = await Client5.connect(running.port, nonce(), f"claim:{claim['id']}", claim["secret"])
            codes.append(connack.code)
        assert codes[:3] == [0, 0, 0] and set(codes[3:]) == {codec.CONNECTION_RATE_EXCEEDED}
        assert running.service.counters["claims_rate_limited"] == 3
        # Guessing costs no turn of the batch's: a wrong secret is refused as such, even now.
        _, connack = await Client5.connect(running.port, nonce(), f"claim:{claim['id']}", "guess")
        assert connack.code == codec.BAD_USER_NAME_OR_PASSWORD


async def test_paho_devices_claim_in_both_protocol_versions(running: Running) -> None:
    claim = await running.service.create_claim("paho", {"batch": "p"}, 2, 3600)
    for protocol, device in ((paho.MQTTv5, "paho-5"), (paho.MQTTv311, "paho-311")):
        answer = await asyncio.to_thread(plain_claim, running.port, f"claim:{claim['id']}", claim["secret"],
                                         {"device": device}, protocol=protocol)
        assert answer["ok"] is True and answer["device"] == device and answer["labels"] == {"batch": "p"}
        assert (await running.service.get_device(device)).labels == {"batch": "p"}


def plain_claim(port: int, user: str, password: str, request: dict[str, Any], *, nonce: str | None = None,
                protocol: int = paho.MQTTv311, timeout: float = 20.0) -> dict[str, Any]:
    """A plain paho-mqtt device claiming: connect as the claim, subscribe to its response topic,
    publish its request, return the answer."""
    who = nonce or secrets.token_urlsafe(16)
    got: list[bytes] = []
    subscribed, answered = threading.Event(), threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=who, protocol=protocol)
    client.username_pw_set(user, password)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: (got.append(m.payload), answered.set())
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe(f"henge/claim/{who}/response", qos=1)
        assert subscribed.wait(timeout), "no SUBACK"
        client.publish(f"henge/claim/{who}/request", json.dumps(request), qos=1)
        assert answered.wait(timeout), "no answer"
    finally:
        client.loop_stop()
        client.disconnect()
    return dict(json.loads(got[0]))


async def test_the_agent_claims_on_first_start_and_keeps_its_identity(running: Running, tmp_path: Path) -> None:
    svc = running.service
    await svc.set_layer("berlin", {"ntp": "ptb.de"}, labels={"site": "berlin"})
    data = str(running.data_dir)
    claim_file = tmp_path / "batch.claim"
    made = await asyncio.to_thread(henge_cli, "claim", "create", "batch-7", "--uses", "1", "--expires", "1h",
                                   "--label", "site=berlin", "--out", str(claim_file), "--data", data)
    assert made.returncode == 0, made.stderr
    assert "claim batch-7" in made.stdout and "1 devices" in made.stdout and claim_file.stat().st_mode & 0o777 == 0o600
    again = await asyncio.to_thread(henge_cli, "claim", "create", "other", "--uses", "1", "--expires", "1h",
                                    "--out", str(claim_file), "--data", data)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    secret_file, target = tmp_path / "cam-1.secret", tmp_path / "cam-1.json"

    async def agent(device: str, secret: Path) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "henge_mqtt", "agent", "--claim", str(claim_file), "--device", device,
            "--serial", f"SN-{device}", "--secret-file", str(secret), "--write", str(tmp_path / f"{device}.json"),
            "--state", str(tmp_path / f"{device}.state"), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT)

    proc = await agent("cam-1", secret_file)
    try:
        await wait_until(lambda: svc.store.has_device("cam-1"), timeout=20, what="the claimed device")
        await wait_status(running, "cam-1", lambda r: r["online"] and r["sync"] == "in_sync", timeout=20)
        assert json.loads(target.read_text()) == {"ntp": "ptb.de"}
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert not (tmp_path / "cam-1.secret.claim-nonce").exists()  # kept only until the answer came
        assert (await svc.get_device("cam-1")).labels == {"site": "berlin", "serial": "SN-cam-1"}
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    # A second start uses its own identity (the claim is used up by now, and not needed).
    proc = await agent("cam-1", secret_file)
    try:
        await wait_status(running, "cam-1", lambda r: r["online"], timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    # Another device with the used-up claim: one line, exit 1, nothing written.
    other = await agent("cam-2", tmp_path / "cam-2.secret")
    _, err = await asyncio.wait_for(other.communicate(), 30)
    assert other.returncode == 1, err
    assert err.decode().strip().splitlines()[-1].startswith("error: the claim was refused: claim batch-7 is used up")
    assert b"Traceback" not in err and not (tmp_path / "cam-2.secret").exists()
    listed = await asyncio.to_thread(henge_cli, "claim", "list", "--json", "--data", data)
    assert [(c["name"], c["used"], c["state"]) for c in json.loads(listed.stdout)] == [("batch-7", 1, "used_up")]
    revoked = await asyncio.to_thread(henge_cli, "claim", "revoke", "batch-7", "--data", data)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout


async def test_a_lost_answer_is_asked_again_with_the_same_nonce_until_the_device_connects(running: Running) -> None:
    """The answer with the secret can be lost with the claiming connection; the device (which keeps
    its nonce) asks again and gets a new secret, until it has connected as itself once. Nobody
    else can: another nonce asking for the id gets duplicate_device."""
    svc = running.service
    claim = await svc.create_claim("batch", {}, 1, 3600)  # its one use: the lost answer's device
    credential = claim["credential"]
    kept = nonce()
    lost, _ = await Client5.connect(running.port, kept, f"claim:{claim['id']}", claim["secret"])
    await lost.send(codec.Publish(svc.topics.claim_request(kept), b'{"device": "cam-9"}', 1, packet_id=1))
    await lost.read_until(codec.Puback)
    await wait_until(lambda: svc.store.has_device("cam-9"), what="the claimed device")
    lost.raw.close()  # never subscribed: the answer is gone
    await wait_until(lambda: f"claim:{kept}" not in running.broker.conns, what="the lost connection closed")
    code, answer = await claim_with_raw5(running, credential, {"device": "cam-9"}, kept)
    assert code == 0 and answer is not None and answer["ok"] and answer["device"] == "cam-9"
    # Anyone else with the claim: it is used up (and the id taken), so refused at CONNECT already.
    _, connack = await Client5.connect(running.port, nonce(), f"claim:{claim['id']}", claim["secret"])
    assert connack.code == codec.NOT_AUTHORIZED_5 and "used up" in (connack.props or {})[codec.REASON_STRING]
    assert [c["used"] for c in await svc.list_claims()] == [1]  # asking again used nothing
    _own, connack = await Client5.connect(running.port, "cam-9", "cam-9", answer["secret"])
    assert connack.code == 0
    await wait_status(running, "cam-9", lambda r: r["online"])
    _, connack = await Client5.connect(running.port, kept, f"claim:{claim['id']}", claim["secret"])
    assert connack.code == codec.NOT_AUTHORIZED_5  # connected as itself once: the nonce is spent
    assert [e["action"] for e in await svc.audit("cam-9")] == ["device.claim", "device.reclaim"]


async def test_concurrent_claims_never_overspend_nor_refuse_a_use_that_is_left(running: Running) -> None:
    """Requests arriving while others commit (a batch powering on over a few seconds): every use is
    given, none twice."""
    claim = await running.service.create_claim("batch", {}, 150, 3600)

    async def later(i: int) -> str:
        await asyncio.sleep(i * 0.003)
        try:
            _, answer = await claim_with_raw5(running, claim["credential"], {"device": f"d{i}"})
        except AssertionError as refused:  # once all are used: refused at CONNECT already
            assert "used up" in str(refused), refused
            return "used_up"
        assert answer is not None
        return "ok" if answer["ok"] else str(answer["code"])

    results = await asyncio.gather(*(later(i) for i in range(160)))
    assert sorted(results) == ["ok"] * 150 + ["used_up"] * 10
    assert [c["used"] for c in await running.service.list_claims()] == [150]
    assert len(await running.service.list_devices()) == 150
