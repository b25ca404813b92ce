"""The HTTP API (docs/http.md) on a real service, with real HTTP and MQTT clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from henge_mqtt.http import HttpServer
from henge_mqtt.http.stream import ITEM_BYTES, EventHub
from henge_mqtt.models import Event

from .conftest import ROOT, Running, reporting_device, wait_until


@contextlib.asynccontextmanager
async def web(running: Running) -> AsyncIterator[tuple[HttpServer, dict[str, str]]]:
    async with HttpServer(running.service, "127.0.0.1", 0) as server:
        tokens = {role: (await running.service.create_token(f"t-{role}", role))["token"]
                  for role in ("viewer", "operator", "admin")}
        yield server, tokens


def client(server: HttpServer, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=server.url.rstrip("/"), headers=headers, timeout=10)


ROLE_OF_SAMPLE = {"viewer": 0, "operator": 1, "admin": 2}


async def test_every_route_declares_a_role_and_refuses_everyone_else(running: Running) -> None:
    await running.add("dev1", {"a": 1})
    async with web(running) as (server, tokens), client(server) as anon:
        doc = (await anon.get("/api/v1/openapi.json")).json()
        operations = [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]
        assert len(operations) >= 25
        for path, method, op in operations:
            role = op.get("x-henge-role")
            assert role in ROLE_OF_SAMPLE, f"{method.upper()} {path} declares no role"
            url = path.replace("{device}", "dev1").replace("{version}", "1").replace("{token}", "nope")
            for token, expected in [(None, 401), ("henge_00000000_forged", 401)] + [
                    (tokens[lower], 403) for lower, rank in ROLE_OF_SAMPLE.items() if rank < ROLE_OF_SAMPLE[role]]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                r = await anon.request(method, url, headers=headers, content=b"{}")
                assert r.status_code == expected, (method, path, token and token[:12], r.text)
                assert r.headers["content-type"] == "application/problem+json"
                problem = r.json()
                assert problem["status"] == expected and problem["code"] in ("authentication_failed", "forbidden")
        assert "bearer" in doc["components"]["securitySchemes"]
        # Nothing was changed by any refused request.
        assert (await running.service.get_version("dev1")).version == 1
        assert (await running.service.list_tokens())[0]["name"] == "t-admin"


async def test_config_etag_if_none_match_and_if_match(running: Running) -> None:
    await running.add("dev1", {"a": 1})
    async with web(running) as (server, tokens), client(server, tokens["operator"]) as c:
        r = await c.get("/api/v1/devices/dev1/config")
        assert r.status_code == 200 and r.headers["etag"] == '"1"' and r.json()["config"] == {"a": 1}
        assert (await c.get("/api/v1/devices/dev1/config", headers={"If-None-Match": '"1"'})).status_code == 304
        stale = await c.put("/api/v1/devices/dev1/config", json={"a": 2}, headers={"If-Match": '"7"'})
        assert stale.status_code == 412
        assert stale.json().items() >= {"code": "version_conflict", "expected": 7, "current": 1}.items()
        assert len(await running.service.history("dev1")) == 1  # nothing stored
        ok = await c.put("/api/v1/devices/dev1/config", json={"a": 2}, headers={"If-Match": '"1"'})
        assert ok.status_code == 200 and ok.headers["etag"] == '"2"' and ok.json()["actor"] == "token:t-operator"
        same = await c.put("/api/v1/devices/dev1/config", json={"a": 2})
        assert same.json()["unchanged"] is True and same.json()["version"] == 2
        patched = await c.patch("/api/v1/devices/dev1/config", content=b'{"b": {"c": 1}}',
                                headers={"Content-Type": "application/merge-patch+json"})
        assert patched.status_code == 200, patched.text
        assert (await c.get("/api/v1/devices/dev1/config")).json()["config"] == {"a": 2, "b": {"c": 1}}
        versions = (await c.get("/api/v1/devices/dev1/versions")).json()
        assert [v["version"] for v in versions] == [1, 2, 3] and "config" not in versions[0]
        diff = (await c.get("/api/v1/devices/dev1/diff", params={"a": 1, "b": 3})).json()
        assert '-  "a": 1' in diff["diff"] and diff["a"] == {"a": 1}
        back = await c.post("/api/v1/devices/dev1/rollback", json={"version": 1})
        assert back.status_code == 200 and back.json()["version"] == 4
        assert (await running.service.get_version("dev1")).config == {"a": 1}
        audit = (await c.get("/api/v1/devices/dev1/audit")).json()
        assert [e["actor"] for e in audit if e["action"] in ("push", "rollback")][-3:] == ["token:t-operator"] * 3


async def test_push_with_wait_reports_what_a_real_device_did(running: Running) -> None:
    good, bad = await running.add("good", {"v": 0}), await running.add("bad", {"v": 0})
    tasks = [await reporting_device(running, "good", good),
             await reporting_device(running, "bad", bad, reject="port 99999 out of range")]
    try:
        async with web(running) as (server, tokens), client(server, tokens["operator"]) as c:
            applied = await c.put("/api/v1/devices/good/config", json={"v": 1}, params={"wait": 5})
            assert applied.status_code == 200 and applied.json()["report"]["status"] == "applied"
            rejected = await c.put("/api/v1/devices/bad/config", json={"v": 1}, params={"wait": 5})
            assert rejected.json()["report"].items() >= {
                "status": "rejected", "error": "port 99999 out of range"}.items()
            row = (await c.get("/api/v1/devices", params={"sync": "rejected"})).json()["items"]
            assert [(r["device"], r["error"]) for r in row] == [("bad", "port 99999 out of range")]
            await running.add("silent", {"v": 0})
            timed_out = await c.put("/api/v1/devices/silent/config", json={"v": 1}, params={"wait": 0.3})
            assert timed_out.status_code == 202 and timed_out.json()["report"] is None
            fleet = await c.post("/api/v1/push", json={"all": True, "config": {"v": 2}, "delivery_timeout": 5})
            assert fleet.json().items() >= {"devices": 3, "online": 2, "acknowledged": 2}.items()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_hostile_bodies_are_refused_cleanly_and_store_nothing(running: Running) -> None:
    await running.add("dev1", {"a": 1})
    limit = running.service.settings.max_config_bytes
    async with web(running) as (server, tokens), client(server, tokens["admin"]) as c:
        cases: list[tuple[bytes, dict[str, str], int, str]] = [
            (b'{"a": NaN}', {}, 422, "invalid_config"),
            (b'{"a": 1, "a": 2}', {}, 422, "invalid_config"),
            (b"[1, 2]", {}, 422, "invalid_config"),
            (b'{"a": "\xff"}', {}, 422, "invalid_config"),
            (b"{" * 100_000, {}, 422, "invalid_config"),
            (b"[" * 100_000, {}, 422, "invalid_config"),
            (b'{"a": 1}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            (b'{"a": "' + b"x" * (limit + 20_000) + b'"}', {}, 413, "body_too_large"),
            (b'{"a": "' + b"x" * (limit + 100) + b'"}', {}, 413, "config_too_large"),
        ]
        for body, headers, status, code in cases:
            r = await c.put("/api/v1/devices/dev1/config", content=body,
                            headers={"Content-Type": "application/json"} | headers)
            assert (r.status_code, r.json()["code"]) == (status, code), (body[:30], r.text[:200])
            assert "Traceback" not in r.text
        # A body larger than the limit sent without Content-Length (chunked) is cut off too.

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b" " * 16_384

        r = await c.put("/api/v1/devices/dev1/config", content=chunks(), headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["code"]) == (413, "body_too_large")
        bad_id = await c.get("/api/v1/devices/no%20such/config")
        assert (bad_id.status_code, bad_id.json()["code"]) == (422, "invalid")
        unknown = await c.get("/api/v1/devices/ghost/config")
        assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_device")
        dup = await c.post("/api/v1/devices", json={"device": "dev1"})
        assert (dup.status_code, dup.json()["code"]) == (409, "duplicate_device")
        assert len(await running.service.history("dev1")) == 1


async def test_status_pages_filters_and_summary(running: Running) -> None:
    secrets = {}
    for i in range(25):
        device = f"d{i:02d}"
        secrets[device] = await running.service.add_device(device, {"site": "a" if i % 2 else "b"})
    async with web(running) as (server, tokens), client(server, tokens["viewer"]) as c, \
            running.device_client("d03", secrets["d03"]):
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 10} | ({"cursor": cursor} if cursor else {})
            page = (await c.get("/api/v1/devices", params=params)).json()
            assert len(page["items"]) == (10 if len(seen) < 20 else 5)
            seen += [row["device"] for row in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(secrets)
        await wait_until(lambda: running.service.broker.session("d03", 0).online)
        online = (await c.get("/api/v1/devices", params={"state": "online"})).json()["items"]
        assert [r["device"] for r in online] == ["d03"]
        site_a = (await c.get("/api/v1/devices", params=[("label", "site=a"), ("q", "1")])).json()["items"]
        assert [r["device"] for r in site_a] == ["d01", "d11", "d13", "d15", "d17", "d19", "d21"]
        bad = await c.get("/api/v1/devices", params={"label": "no-equals"})
        assert (bad.status_code, bad.json()["code"]) == (422, "invalid")
        summary = (await c.get("/api/v1/summary")).json()
        assert summary.items() >= {"devices": 25, "online": 1, "offline": 24, "conflicts": 0}.items()


async def test_tokens_roles_revocation_and_no_secret_in_any_answer(running: Running) -> None:
    async with web(running) as (server, tokens), client(server, tokens["admin"]) as admin:
        added = await admin.post("/api/v1/devices", json={"device": "cam1", "labels": {"site": "x"}})
        assert added.status_code == 201
        secret = added.json()["secret"]
        made = await admin.post("/api/v1/tokens", json={"name": "ci", "role": "viewer"})
        assert made.status_code == 201
        ci_token = made.json()["token"]
        listed = await admin.get("/api/v1/tokens")
        assert ci_token not in listed.text and "secret_hash" not in listed.text
        assert {t["name"]: t["role"] for t in listed.json()}["ci"] == "viewer"
        async with client(server, ci_token) as viewer:
            assert (await viewer.get("/api/v1/devices/cam1")).status_code == 200
            refused = await viewer.put("/api/v1/devices/cam1/config", json={"a": 1})
            assert (refused.status_code, refused.json()["needed"]) == (403, "operator")
            for path in ("/api/v1/devices/cam1", "/api/v1/devices", "/api/v1/audit", "/api/v1/summary",
                         "/api/v1/devices/cam1/audit"):
                assert secret not in (await viewer.get(path)).text
            assert (await admin.delete("/api/v1/tokens/ci")).json()["revoked"] is True
            gone = await viewer.get("/api/v1/summary")
            assert (gone.status_code, gone.json()["code"]) == (401, "authentication_failed")
        rotated = await admin.post("/api/v1/devices/cam1/secret")
        assert rotated.json()["secret"] != secret
        labels = await admin.patch("/api/v1/devices/cam1/labels", json={"set": {"floor": "2"}, "remove": ["site"]})
        assert labels.json()["labels"] == {"floor": "2"}
        audit = (await admin.get("/api/v1/audit")).json()
        assert {(e["actor"], e["action"]) for e in audit} >= {
            ("token:t-admin", "device.add"), ("token:t-admin", "token.create"), ("token:t-admin", "token.revoke")}
        imported = await admin.post("/api/v1/devices/import", json={
            "devices": [{"id": f"bulk{i}", "labels": {"batch": "1"}} for i in range(3000)]})
        assert imported.status_code == 200 and len(imported.json()["secrets"]) == 3000
        again = await admin.post("/api/v1/devices/import", json={"devices": [{"id": "bulk1"}]})
        assert (again.status_code, again.json()["code"]) == (409, "duplicate_device")
        assert (await admin.delete("/api/v1/devices/cam1")).json()["removed"] is True
        assert not running.service.store.has_device("cam1")


async def test_cors_is_closed_by_default(running: Running) -> None:
    async with web(running) as (server, tokens), client(server, tokens["viewer"]) as c:
        pre = await c.options("/api/v1/summary", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in pre.headers
        r = await c.get("/api/v1/summary", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        page = await c.get("/")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert (await c.get("/api/v1/docs")).status_code == 200
        assert (await c.get("/static/vendor/swagger-ui/swagger-ui-bundle.js")).status_code == 200


async def read_events(response: httpx.Response, count: int, timeout: float = 5.0) -> list[tuple[str, str, str]]:
    """``count`` SSE frames as (id, event, data)."""
    frames: list[tuple[str, str, str]] = []
    fields: dict[str, str] = {}

    async def collect() -> None:
        async for line in response.aiter_lines():
            if line == "":
                if "data" in fields:
                    frames.append((fields.get("id", ""), fields.get("event", "message"), fields["data"]))
                fields.clear()
                if len(frames) >= count:
                    return
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value

    await asyncio.wait_for(collect(), timeout)
    return frames


async def test_events_stream_filters_and_resumes_with_last_event_id(running: Running) -> None:
    for device in ("a", "b"):
        await running.add(device)
    svc = running.service
    async with web(running) as (server, tokens), client(server, tokens["viewer"]) as c:
        params = [("device", "a"), ("type", "config_published")]
        async with c.stream("GET", "/api/v1/events", params=params) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            await svc.push("b", {"n": 1})  # filtered out
            await svc.push("a", {"n": 1})
            (first_id, _, data), = await read_events(stream, 1)
            assert json.loads(data)["device"] == "a"
        for n in range(2, 5):  # while nobody listens
            await svc.push("a", {"n": n})
            await svc.push("b", {"n": n})
        async with c.stream("GET", "/api/v1/events", params=params, headers={"Last-Event-ID": first_id}) as stream:
            missed = await read_events(stream, 3)
            assert [json.loads(d)["data"]["version"] for _, _, d in missed] == [2, 3, 4]
            ids = [int(i.rpartition("-")[2]) for i, _, _ in missed]
            assert ids == sorted(ids) and ids[0] > int(first_id.rpartition("-")[2])
        async with c.stream("GET", "/api/v1/events", headers={"Last-Event-ID": "0000-5"}) as stream:
            (_, kind, data), = await read_events(stream, 1)
            assert kind == "reset" and "restarted" in json.loads(data)["reason"]


def test_a_slow_reader_is_dropped_and_its_backlog_freed() -> None:
    hub = EventHub(replay_bytes=10 * (ITEM_BYTES + 120), backlog=3)
    client, _ = hub.subscribe(devices=None, types=None, last_event_id=None)
    for n in range(5):
        hub.on_event(Event(type="report", at="2026-01-01T00:00:00Z", device=f"d{n}"))
    assert client.dropped and not client.pending
    assert len(hub.presence("d1")) == 0 and hub.last_id().endswith("-5")
    # Replay is bounded: an id older than the buffer asks the client to reload.
    _, reset = hub.subscribe(devices=None, types=None, last_event_id=f"{hub.run}-0")
    assert reset is None
    for _ in range(20):
        hub.on_event(Event(type="report", at="2026-01-01T00:00:00Z", device="x"))
    _, reset = hub.subscribe(devices=None, types=None, last_event_id=f"{hub.run}-1")
    assert reset is not None and "no longer" in reset
    # ... in bytes: a storm of big events keeps no more than the bound, and always the newest one.
    for n in range(50):
        hub.on_event(Event(type="report", at="2026-01-01T00:00:00Z", device="x", data={"n": n, "pad": "y" * 300}))
    assert hub.buffered <= 10 * (ITEM_BYTES + 120) and hub.last_id().endswith("-75")
    _, reset = hub.subscribe(devices=None, types=None, last_event_id=f"{hub.run}-74")
    assert reset is None


async def test_presence_timeline_names_epochs_and_reasons(running: Running) -> None:
    secret = await running.add("dev1")
    async with web(running) as (server, tokens), client(server, tokens["viewer"]) as c:
        for _ in range(2):
            async with running.device_client("dev1", secret):
                await wait_until(lambda: running.service.broker.session("dev1", 0).online)
            await wait_until(lambda: not running.service.broker.session("dev1", 0).online)
        changes = (await c.get("/api/v1/devices/dev1/presence")).json()["changes"]
        assert [(e["type"], e["data"]["epoch"]) for e in changes] == [
            ("disconnected", 2), ("connected", 2), ("disconnected", 1), ("connected", 1)]
        assert changes[0]["data"]["reason"] == "client_disconnect"


def serve(data: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


async def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 20) -> tuple[re.Match[str], str]:
    seen: list[str] = []

    def scan() -> re.Match[str] | None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if found := re.search(pattern, line):
                return found
        return None

    found = await asyncio.wait_for(asyncio.to_thread(scan), timeout)
    assert found, "".join(seen)
    return found, "".join(seen)


async def test_serve_prints_the_console_url_and_writes_a_first_run_token(tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc = serve(data, "--http", "127.0.0.1:0")
    try:
        found, log = await read_until(proc, r"console on (http://127\.0\.0\.1:\d+/) \(first-run admin token in (\S+)\)")
        url, token_file = found.group(1), Path(found.group(2))
        assert token_file == (data / "http-token") and (token_file.stat().st_mode & 0o777) == 0o600
        token = token_file.read_text().strip()
        await read_until(proc, r"serving on mqtt://")
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            assert (await c.get("api/v1/me")).json() == {"name": "first-run", "role": "admin"}
            assert "henge-mqtt console" in (await c.get("")).text
    finally:
        proc.terminate()
        rest = await asyncio.to_thread(proc.communicate, timeout=20)
    assert proc.returncode == 0
    assert token not in log + rest[0]  # never in a log
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = serve(tmp_path / "e", "--http", f"127.0.0.1:{taken.getsockname()[1]}")
        try:
            out = await asyncio.to_thread(busy.communicate, timeout=20)
        finally:
            busy.kill()
    assert busy.returncode == 1 and out[0].strip().splitlines()[-1].startswith("error: cannot serve HTTP on")
    assert "Traceback" not in out[0]


def test_docs_name_every_route() -> None:
    text = (ROOT / "docs" / "http.md").read_text()
    routes = re.findall(r'@api\.(get|put|patch|post|delete)\("([^"]+)"', (ROOT / "henge_mqtt/http/app.py").read_text())
    missing = [f"{m.upper()} /api/v1{p}" for m, p in routes if f"{m.upper()} /api/v1{p}" not in text]
    assert not missing, f"docs/http.md does not document {missing}"



async def test_idle_and_excess_http_connections_are_closed(running: Running, monkeypatch: Any) -> None:
    """A peer cannot hold HTTP sockets: one that sends nothing is closed, one too many is closed at
    once, and a real client is served all along."""
    from henge_mqtt.http import engine

    monkeypatch.setattr(engine._BoundedH11, "max_connections", 4)
    monkeypatch.setattr(engine._BoundedH11, "first_request_timeout", 0.5)
    async with web(running) as (server, tokens):
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
        extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(extra_reader.read(), 2) == b""  # closed on arrival
        for reader, _ in idle:
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed for saying nothing
        async with client(server, tokens["viewer"]) as c:
            assert (await c.get("/api/v1/summary")).status_code == 200
        for _, writer in [*idle, (extra_reader, extra_writer)]:
            writer.close()


async def test_a_keep_alive_answer_is_not_held_back_by_nagle(running: Running) -> None:
    """uvicorn writes an answer's head and body apart; on a socket without TCP_NODELAY the body
    waited for the client's delayed ACK (40 ms a request on a kept-alive connection). Every accepted
    HTTP socket has TCP_NODELAY, and the answer's body is there right after its head."""
    import socket

    async with web(running) as (server, tokens):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            request = (f"GET /api/v1/summary HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['viewer']}"
                       "\r\n\r\n").encode()
            for _ in range(2):  # the second request is the one that stalled
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await asyncio.wait_for(reader.readexactly(length), 5)
            assert server._engine is not None
            accepted = [c.transport.get_extra_info("socket") for c in server._engine.server_state.connections]
            assert accepted, "no accepted HTTP connection to look at"
            assert all(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in accepted)
        finally:
            writer.close()


async def test_https_with_the_broker_kind_of_certificate(running: Running, tmp_path: Path) -> None:
    from henge_mqtt.certs import make_dev_certs
    from henge_mqtt.errors import SettingsError

    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], [])
    async with HttpServer(running.service, "127.0.0.1", 0, certfile=certs / "server.pem",
                          keyfile=certs / "server.key") as server:
        assert server.url.startswith("https://")
        token = (await running.service.create_token("tls", "viewer"))["token"]
        trust = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        async with httpx.AsyncClient(verify=trust, headers={"Authorization": f"Bearer {token}"}) as c:
            assert (await c.get(server.url + "api/v1/summary")).status_code == 200
        async with httpx.AsyncClient() as plain:  # not trusted without the CA
            try:
                await plain.get(server.url + "api/v1/summary")
            except httpx.ConnectError as exc:
                assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
            else:
                raise AssertionError("an untrusted certificate was accepted")
    (tmp_path / "bad.pem").write_text("not a certificate")
    try:
        async with HttpServer(running.service, "127.0.0.1", 0, certfile=tmp_path / "bad.pem",
                              keyfile=certs / "server.key"):
            raise AssertionError("a bad certificate was loaded")
    except SettingsError as exc:
        assert "cannot serve https" in str(exc)


async def test_every_use_is_in_the_audit_trail_one_row_a_minute(running: Running) -> None:
    await running.add("dev1", {"a": 1})
    async with web(running) as (server, tokens), client(server, tokens["viewer"]) as viewer, client(server) as anon:
        for _ in range(30):
            assert (await viewer.get("/api/v1/summary")).status_code == 200
        assert (await viewer.put("/api/v1/devices/dev1/config", json={"a": 2})).status_code == 403
        for _ in range(20):
            assert (await anon.get("/api/v1/summary")).status_code == 401
    rows = [e for e in await running.service.audit() if e["action"].startswith("http.")]
    by = {(e["actor"], e["action"]): e["summary"] for e in rows}
    assert by[("token:t-viewer", "http.use")]["reads"] == 30
    assert by[("token:t-viewer", "http.refused")]["forbidden"] == 1
    assert by[("http", "http.refused")]["unauthenticated"] == 20
    assert len(rows) == 3  # 51 requests, three rows


async def test_no_request_the_openapi_document_allows_is_a_server_error(tmp_path: Path) -> None:
    """schemathesis walks every route (its coverage phase: boundary and invalid values, then fuzzing)
    with an admin token against a real `henge serve`: not one answer is a 5xx. Streams, waits and
    backups (files on the server) are left to the tests above."""
    data = tmp_path / "d"
    proc = serve(data, "--http", "127.0.0.1:0")
    try:
        found, _ = await read_until(proc, r"console on (http://127\.0\.0\.1:\d+/)")
        url = found.group(1)
        await read_until(proc, r"serving on mqtt://")
        token = (data / "http-token").read_text().strip()
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            assert (await c.post("api/v1/devices", json={"device": "dev1"})).status_code == 201
            assert (await c.put("api/v1/devices/dev1/config", json={"a": 1})).status_code == 200
        run = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "schemathesis.cli", "run", f"{url}api/v1/openapi.json",
             "-H", f"Authorization: Bearer {token}", "--checks", "not_a_server_error", "--max-examples", "5",
             "--phases", "coverage,fuzzing", "--seed", "1", "--exclude-path-regex", "events|backup|wait"],
            capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:]
        assert "passed" in run.stdout
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.communicate, timeout=20)


async def test_a_labels_edit_with_a_stale_etag_is_refused_412(running: Running) -> None:
    """`GET /devices/{id}` tags the labels (ETag); `PATCH .../labels` with `If-Match` stores only if
    they are still those: otherwise 412 `labels_conflict` with the labels as they are, nothing stored."""
    await running.service.add_device("d1", {"site": "a"})
    async with web(running) as (server, tokens), client(server, tokens["admin"]) as http:
        got = await http.get("/api/v1/devices/d1")
        tag = got.headers["etag"]
        await running.service.set_labels("d1", {"tier": "gold"}, [])
        stale = await http.patch("/api/v1/devices/d1/labels", json={"set": {"site": "b"}}, headers={"If-Match": tag})
        assert stale.status_code == 412
        assert stale.json()["code"] == "labels_conflict" and stale.json()["current"] == {"site": "a", "tier": "gold"}
        assert (await running.service.get_device("d1")).labels == {"site": "a", "tier": "gold"}
        fresh = (await http.get("/api/v1/devices/d1")).headers["etag"]
        assert fresh != tag
        ok = await http.patch("/api/v1/devices/d1/labels", json={"set": {"site": "b"}}, headers={"If-Match": fresh})
        assert ok.status_code == 200 and ok.json()["labels"] == {"site": "b", "tier": "gold"}
        blind = await http.patch("/api/v1/devices/d1/labels", json={"set": {"x": "1"}})  # no If-Match: as before
        assert blind.status_code == 200


async def test_an_exiting_stop_still_answers_a_request_in_flight(running: Running) -> None:
    """``henge serve`` stops the HTTP server with ``exiting=True`` (uvicorn's graceful shutdown is
    skipped when nothing is in flight): a request in flight is still answered, not cut off."""
    await running.add("waiting", {"v": 0})
    server = HttpServer(running.service, "127.0.0.1", 0)
    await server.start()
    try:
        token = (await running.service.create_token("t-exit", "operator"))["token"]
        async with client(server, token) as c:
            put = asyncio.create_task(c.put("/api/v1/devices/waiting/config", json={"v": 1}, params={"wait": 1}))
            await wait_until(lambda: server._engine and server._engine.server_state.tasks, 5, "the request in flight")
            assert server._engine is not None
            state = server._engine.server_state  # uvicorn's: its connections and requests in flight
            await server.stop(exiting=True)
            assert not state.tasks  # answered before stop returned (the process may exit right after)
            answer = await put
        assert answer.status_code == 202 and answer.json()["version"] == 2  # stored; the device never said
    finally:
        await server.stop()


LAZY_PROBE = """
import asyncio, json, sys
from pathlib import Path
from henge_mqtt.http import HttpServer
from henge_mqtt.service import HengeService
from henge_mqtt.settings import Settings

STACK = ("fastapi", "starlette", "uvicorn", "henge_mqtt.http.app")

async def main() -> None:
    settings = Settings(data_dir=Path(sys.argv[1])).with_listener("127.0.0.1", 0)
    async with HengeService(settings) as svc, HttpServer(svc, "127.0.0.1", 0) as web:
        before = [m for m in STACK if m in sys.modules]
        answers = []
        for _ in range(2):  # the first client waits while the stack loads; the second is served as usual
            reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
            writer.write(b"GET / HTTP/1.1\\r\\nHost: henge\\r\\nConnection: close\\r\\n\\r\\n")
            answers.append((await asyncio.wait_for(reader.read(), 30)).split(b"\\r\\n")[0].decode())
            writer.close()
        print(json.dumps({"before": before, "after": [m for m in STACK if m in sys.modules], "answers": answers}))

asyncio.run(main())
"""


def test_the_http_stack_loads_when_the_first_client_connects(tmp_path: Path) -> None:
    """With the HTTP API on (the default) a service holds no FastAPI, Starlette or uvicorn (about
    15 MB of the idle process) until a client connects: the port is bound and answered from the
    start, the first client waits in the backlog while the stack loads, and is served."""
    run = subprocess.run([sys.executable, "-c", LAZY_PROBE, str(tmp_path / "data")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    said = json.loads(run.stdout.splitlines()[-1])
    assert said == {"before": [], "after": ["fastapi", "starlette", "uvicorn", "henge_mqtt.http.app"],
                    "answers": ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"]}
