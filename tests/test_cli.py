"""The ``henge`` CLI against a real running service: as a subprocess and in-process."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from henge_mqtt.cli import app

from .conftest import ROOT, Running, henge_cli, next_message, payload_json, wait_status, wait_until
from .ports import free_port


async def cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(henge_cli, *args, input=input, env=env)


def serve_error(result: subprocess.CompletedProcess[str]) -> str:
    """``serve`` logs before it fails; its error is still one line, the last, and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


async def test_device_add_push_get_history_diff_rollback(running: Running, tmp_path: Path) -> None:
    data = str(running.data_dir)
    added = await cli("device", "add", "dev1", "--label", "site=berlin", "--data", data, "--json")
    assert added.returncode == 0, added.stderr
    secret = json.loads(added.stdout)["secret"]
    assert len(secret) >= 22 and json.loads(added.stdout)["device"] == "dev1"
    assert secret not in (running.data_dir / "henge.db").read_bytes().decode("latin-1")

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rate": 1}))
    pushed = await cli("push", "dev1", str(cfg), "-m", "first", "--data", data)
    assert pushed.returncode == 0 and "version 1" in pushed.stdout
    pushed = await cli("push", "dev1", "-", "--if-version", "1", "--data", data, "--json", input='{"rate": 2}')
    assert json.loads(pushed.stdout)["version"] == 2

    got = await cli("get", "dev1", "--version", "1", "--data", data)
    assert json.loads(got.stdout) == {"rate": 1}
    hist = await cli("history", "dev1", "--data", data, "--json")
    assert [(r["version"], r["message"]) for r in json.loads(hist.stdout)] == [(1, "first"), (2, "")]
    diff = await cli("diff", "dev1", "1", "2", "--data", data)
    assert '-  "rate": 1' in diff.stdout and '+  "rate": 2' in diff.stdout
    assert diff.returncode == 1 and "\x1b[" not in diff.stdout  # they differ, like diff(1); no colour in a pipe
    same = await cli("diff", "dev1", "1", "1", "--data", data)
    assert same.returncode == 0 and same.stdout.strip() == "(no differences)"
    rolled = await cli("rollback", "dev1", "1", "--data", data, "--json")
    assert json.loads(rolled.stdout)["version"] == 3
    assert running.service.store.get_version("dev1").config == {"rate": 1}

    async with running.device_client("dev1", secret) as device:
        await device.subscribe("henge/devices/dev1/config", qos=1)
        assert payload_json(await next_message(device))["version"] == 3
        status = await cli("status", "--data", data, "--json")
        row = json.loads(status.stdout)[0]
        for key in ("device", "online", "epoch", "since", "remote", "reason", "desired_version", "takeovers",
                    "conflict"):
            assert key in row
        assert (row["device"], row["online"], row["desired_version"]) == ("dev1", True, 3)
        table = await cli("status", "--data", data)
        assert "dev1" in table.stdout and "online" in table.stdout
        kicked = await cli("kick", "dev1", "--data", data)
        assert kicked.returncode == 0 and "kicked" in kicked.stdout

    listed = await cli("device", "list", "--data", data, "--json")
    assert json.loads(listed.stdout)[0]["labels"] == {"site": "berlin"}
    rotated = await cli("device", "rotate-secret", "dev1", "--data", data, "--json")
    assert json.loads(rotated.stdout)["secret"] != secret
    removed = await cli("device", "remove", "dev1", "--data", data)
    assert removed.returncode == 0
    assert not running.service.store.has_device("dev1")


async def test_bad_input_gets_one_clear_line_and_stores_nothing(running: Running, tmp_path: Path) -> None:
    data = str(running.data_dir)
    await running.add("dev1", {"a": 1})
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"blob": "x" * (300 * 1024)}))
    cases = [
        (("push", "dev1", "-", "--data", data), "{not json", "not valid JSON"),
        (("push", "dev1", "-", "--data", data), "[1, 2]", "must be a JSON object"),
        (("push", "dev1", str(big), "--data", data), None, "over the limit"),
        (("push", "ghost", "-", "--data", data), "{}", "unknown device"),
        (("push", "dev1", "-", "--if-version", "7", "--data", data), "{}", "version conflict"),
        (("push", "dev1", str(tmp_path / "missing.json"), "--data", data), None, "cannot read"),
        (("device", "add", "dev1", "--data", data), None, "already exists"),
        (("device", "add", "bad/id", "--data", data), None, "invalid device id"),
        (("device", "add", "-x", "--data", data), None, None),
        (("get", "dev1", "--version", "9", "--data", data), None, "no version 9"),
        (("device", "add", "ok", "--label", "nokey", "--data", data), None, "invalid label"),
    ]
    for args, stdin, expected in cases:
        result = await cli(*args, input=stdin)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr, args
        if expected is not None:
            assert expected in one_line_error(result), (args, result.stderr)
    assert [r.version for r in running.service.store.history("dev1")] == [1]
    assert [d.id for d in running.service.store.list_devices()] == ["dev1"]


async def test_wrong_admin_credentials_and_no_service(running: Running, tmp_path: Path) -> None:
    env = {"HENGE_ADMIN_SECRET": "wrong"}
    result = await cli("status", "--broker", f"mqtt://127.0.0.1:{running.port}", env=env)
    assert "refused the admin credentials" in one_line_error(result)
    env = {"HENGE_ADMIN_SECRET": running.service.admin_secret}
    ok = await cli("status", "--broker", f"mqtt://127.0.0.1:{running.port}", "--json", env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout) == []
    missing = await cli("status", "--data", str(tmp_path / "nowhere"))
    assert "no running service" in one_line_error(missing)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "service.json").write_text(json.dumps({"host": "127.0.0.1", "port": 1}))
    (tmp_path / "stale" / "admin.json").write_text(json.dumps({"name": "henge-admin", "secret": "x"}))
    dead = await cli("status", "--data", str(tmp_path / "stale"))
    assert "cannot reach the service" in one_line_error(dead)


async def test_events_follow_streams_service_events(running: Running) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "henge_mqtt", "events", "--follow", "--json", "--data", str(running.data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    try:
        await wait_until(lambda: running.broker.has_subscribers("henge/admin/events"), what="events subscriber")
        secret = await running.add("dev1", {"v": 1})
        async with running.device_client("dev1", secret):
            pass
        seen: list[str] = []
        async with asyncio.timeout(10):
            while "disconnected" not in seen:
                line = await proc.stdout.readline()  # type: ignore[union-attr]
                assert line, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                seen.append(json.loads(line)["type"])
        assert seen[:4] == ["device_added", "config_published", "connected", "disconnected"]
    finally:
        proc.terminate()
        await proc.wait()


async def test_in_process_cli(running: Running) -> None:
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke, app, ["device", "add", "inproc", "--data", str(running.data_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert running.service.store.has_device("inproc")
    bad = await asyncio.to_thread(runner.invoke, app, ["push", "ghost", "-", "--data", str(running.data_dir)],
                                  input="{}")
    assert bad.exit_code == 1


def test_serve_subprocess_port_zero_and_graceful_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 15
        while not (data / "service.json").exists():
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        service = json.loads((data / "service.json").read_text())
        assert service["port"] > 0
        assert oct((data / "admin.json").stat().st_mode & 0o777) == "0o600"
        added = henge_cli("device", "add", "d1", "--data", str(data))
        assert added.returncode == 0, added.stderr
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 2.0
        _, stderr = proc.communicate()
        assert f"mqtt://127.0.0.1:{service['port']}" in stderr
        assert "Traceback" not in stderr
        assert not (data / "service.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_reports_busy_port_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = henge_cli("serve", "--data", str(tmp_path / "d"), "--port", str(port), timeout=20)
    assert f"cannot listen on 127.0.0.1:{port} (listener default): Address already in use" in serve_error(result)


@pytest.mark.parametrize("bad", ["not: [valid", "henge: {sessions: {conflict_policy: maybe}}"])
def test_serve_reports_bad_config_file(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(bad)
    result = henge_cli("serve", "--data", str(tmp_path / "d"), "--config", str(cfg), timeout=20)
    assert "config file" in serve_error(result)


def _one_error_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr


async def test_bad_input_matrix_one_line_each(running: Running, tmp_path: Path) -> None:
    data = str(running.data_dir)
    no_id = tmp_path / "no-id.csv"
    no_id.write_text("name,site\na,b\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": "ok-1"}\n{not json\n')
    bad_id = tmp_path / "bad-id.csv"
    bad_id.write_text("id\nok-2\nbad/id\n")
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"a": 1}')
    cases = [
        (("device", "import", str(tmp_path / "missing.csv"), "--data", data), 1, "cannot read"),
        (("device", "import", str(no_id), "--data", data), 1, '"id" column'),
        (("device", "import", str(bad_json), "--data", data), 1, "not valid JSON"),
        (("device", "import", str(bad_id), "--data", data), 1, "invalid device id"),
        (("push",), 2, "missing ID and FILE"),
        (("status", "--timeout", "abc", "--data", data), 2, "--timeout"),
        (("nosuch",), 2, "No such command"),
        (("push", "--label", "site=nowhere", str(cfg), "--data", data), 1, "no device has the labels site=nowhere"),
        (("status", "--data", str(tmp_path / "elsewhere")), 1, "HENGE_DATA"),
        (("serve", "--log-level", "loud", "--data", str(tmp_path / "x")), 2, "--log-level"),
    ]
    for args, code, text in cases:
        result = await asyncio.to_thread(henge_cli, *args)
        _one_error_line(result, code, text)
    assert not running.service.store.has_device("ok-1") and not running.service.store.has_device("ok-2")
    version = await asyncio.to_thread(henge_cli, "--version")
    assert version.returncode == 0 and version.stdout.startswith("henge ")


async def test_store_and_data_dir_are_private(running: Running) -> None:
    import stat as st

    assert st.S_IMODE(running.data_dir.stat().st_mode) == 0o700
    for name in ("henge.db", "henge.db-wal", "henge.db-shm", "admin.json"):
        path = running.data_dir / name
        assert st.S_IMODE(path.stat().st_mode) == 0o600, name


def test_certs_dev_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    first = henge_cli("certs", "dev", "--out", str(tmp_path / "c"))
    assert first.returncode == 0, first.stderr
    ca = (tmp_path / "c" / "ca.pem").read_bytes()
    again = henge_cli("certs", "dev", "--out", str(tmp_path / "c"))
    _one_error_line(again, 1, "--force")
    assert (tmp_path / "c" / "ca.pem").read_bytes() == ca
    forced = henge_cli("certs", "dev", "--out", str(tmp_path / "c"), "--force")
    assert forced.returncode == 0 and (tmp_path / "c" / "ca.pem").read_bytes() != ca


async def test_library_and_metrics_name_what_could_not_listen(running: Running, tmp_path: Path) -> None:
    from henge_mqtt.errors import HengeError
    from henge_mqtt.service import HengeService

    from .conftest import make_settings

    busy = make_settings(tmp_path / "other").with_listener("127.0.0.1", running.port)
    with pytest.raises(HengeError, match=f"cannot listen on 127.0.0.1:{running.port}"):
        async with HengeService(busy):
            pass
    result = await asyncio.to_thread(henge_cli, "serve", "--data", str(tmp_path / "m"), "--port", "0",
                                     "--metrics-port", str(running.port), timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot start the metrics server on 127.0.0.1:{running.port}" in serve_error(result)


async def test_status_for_people_filters_outputs_and_watch(running: Running) -> None:
    import signal

    import yaml

    from . import mqtt_raw as raw

    data = str(running.data_dir)
    on = await running.add("on-1", {"v": 1})
    await running.service.add_device("off-1", {"site": "x" * 80, "tier": "gold"})  # long labels
    await running.service.push("off-1", {"v": 1})
    client = await raw.RawClient.open(running.port)
    await client.send(raw.connect("on-1", "on-1", on))
    assert await client.connack() == 0
    await client.send(raw.publish("henge/devices/on-1/report", b'{"version": 1, "status": "rejected", "error": "no"}'))
    await wait_status(running, "on-1", lambda r: r["sync"] == "rejected")

    table = await asyncio.to_thread(henge_cli, "status", "--data", data)
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "STATE", "AGE", "VERSION", "SYNC", "LABELS"]
    assert all(len(line) <= 100 for line in lines[:-1]), lines  # fits 100 columns (the summary aside)
    assert any(line.startswith("on-1") and " 0/1 " not in line and "rejected" in line for line in lines)
    assert "\x1b[" not in table.stdout  # no colour when not on a terminal

    async def rows(*args: str) -> list[dict[str, Any]]:
        result = await asyncio.to_thread(henge_cli, "status", "--data", data, *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if "yaml" not in args else yaml.safe_load(result.stdout)

    assert [r["device"] for r in await rows("--state", "online", "--json")] == ["on-1"]
    assert [r["device"] for r in await rows("--state", "offline", "-o", "json")] == ["off-1"]
    assert [r["device"] for r in await rows("--sync", "rejected", "-o", "yaml")] == ["on-1"]
    assert await rows("--conflict", "--json") == []
    one = (await rows("on-1", "--json"))[0]
    assert one["state"] == "online" and one["since"].endswith("Z") and "labels_text" not in one
    assert one["applied_at"] is None or one["applied_at"].endswith("Z")
    wide = await asyncio.to_thread(henge_cli, "status", "-o", "wide", "--data", data)
    assert "REMOTE" in wide.stdout and "x" * 80 in wide.stdout  # wide: everything, uncut
    bad = await asyncio.to_thread(henge_cli, "status", "--state", "sleeping", "--data", data)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --state")

    show = await asyncio.to_thread(henge_cli, "device", "show", "on-1", "--data", data)
    assert "{" not in show.stdout and "None" not in show.stdout and "False" not in show.stdout
    assert "state" in show.stdout and "online since" in show.stdout

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "henge_mqtt", "status", "--watch", "0.5", "--data", data, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    frames = 0
    async with asyncio.timeout(10):
        while frames < 2:
            line = await proc.stdout.readline()
            frames += line.startswith(b"every 0.5 s")
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 5) == 130  # Ctrl-C: as shells expect (issue 19)


async def test_events_filter_and_survive_a_restart(start_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "ev"
    async with start_service(data_dir=data) as first:
        await first.add("e1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "henge_mqtt", "events", "--device", "e1", "--type", "config_published",
            "--json", "--data", str(data), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        await wait_until(lambda: first.broker.has_subscribers("henge/admin/events"), what="events subscriber")
        await first.service.add_device("other")
        await first.service.push("other", {"v": 1})
        await first.service.push("e1", {"v": 1})
        line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert (line["type"], line["device"]) == ("config_published", "e1")  # the others were filtered out
    try:
        async with start_service(data_dir=data) as second:  # the same data dir: the stream reconnects
            await wait_until(lambda: second.broker.has_subscribers("henge/admin/events"), 20, "reconnected")
            await second.service.push("e1", {"v": 2})
            line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
            assert line["data"]["version"] == 2
    finally:
        proc.terminate()
        await proc.wait()


def test_unknown_config_sections_are_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listners:\n  default: {bind: '127.0.0.1:0'}\n")
    result = henge_cli("serve", "--config", str(config), "--data", str(tmp_path / "d"), timeout=20)
    assert result.returncode == 1 and "unknown section 'listners'" in serve_error(result)


def test_docs_cli_md_covers_every_command_and_flag() -> None:
    """docs/cli.md cannot drift from the CLI: every command and every flag of it is documented."""
    import typer.main

    doc = (ROOT / "docs" / "cli.md").read_text()
    missing: list[str] = []

    def walk(command: Any, path: list[str]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, [*path, name])
            return
        if f"henge {' '.join(path)}" not in doc:
            missing.append(f"command: henge {' '.join(path)}")
        for param in command.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("--") and flag not in ("--help",) and flag not in doc:
                    missing.append(f"flag {flag} of henge {' '.join(path)}")

    walk(typer.main.get_command(app), [])
    assert not missing, "\n".join(missing)


def test_each_command_is_registered_by_the_module_home_names() -> None:
    """``henge X`` loads only ``HOME[X]``: the table must name, for every command and group of the
    whole tree, the one module that registers it (a command added elsewhere would vanish when run)."""
    from henge_mqtt.cli import HOME

    found: dict[str, set[str]] = {}
    for info in app.registered_commands:
        assert info.callback is not None
        name = info.name or info.callback.__name__.replace("_", "-")
        found.setdefault(name, set()).add(info.callback.__module__.rsplit(".", 1)[1])
    for group in app.registered_groups:
        assert group.name is not None and group.typer_instance is not None
        modules = {c.callback.__module__.rsplit(".", 1)[1] for c in group.typer_instance.registered_commands
                   if c.callback is not None}
        found.setdefault(group.name, set()).update(modules)
    assert {name: {module} for name, module in HOME.items()} == found


LOADED = """
import runpy, sys
sys.argv = ["henge", *sys.argv[1:]]
try:
    runpy.run_module("henge_mqtt", run_name="__main__")
except SystemExit:
    pass
heavy = ("henge_mqtt", "typer", "aiomqtt", "paho", "pydantic", "asyncio", "dataclasses", "ssl")
print("LOADED " + " ".join(sorted(m for m in sys.modules if m.startswith(heavy))))
"""


def loaded_by(*args: str) -> set[str]:
    """The modules ``henge ARGS`` imported (of ours and of the heavy libraries)."""
    result = subprocess.run([sys.executable, "-c", LOADED, *args], capture_output=True, text=True, timeout=30,
                            cwd=ROOT, stdin=subprocess.DEVNULL)
    line = next(x for x in result.stdout.splitlines() if x.startswith("LOADED "))
    return set(line.split()[1:])


def test_a_command_imports_only_what_it_needs(tmp_path: Path) -> None:
    """The CLI's start is most of a one-device push (issue 23): ``--version`` loads no command and no
    typer; a plain ``push``, ``get``, ``history``, ``status`` or ``device add`` line is parsed without
    typer (``quick``) and runs on the blocking admin client: no typer, no asyncio, no ssl, no
    dataclasses, no pydantic, and no other command; a push line only click reads (``-mtext``) and
    ``--help`` go through typer, which shows the whole tree."""
    version = loaded_by("--version")
    assert not any(m.startswith("typer") for m in version) and "henge_mqtt.cli.configs" not in version
    from henge_mqtt.paths import ADMIN_FILE, SERVICE_FILE

    (tmp_path / SERVICE_FILE).write_text(json.dumps({"host": "127.0.0.1", "port": free_port()}))  # nobody there
    (tmp_path / ADMIN_FILE).write_text(json.dumps({"name": "henge-admin", "secret": "s"}))
    (tmp_path / "c.json").write_text("{}")
    line = ("push", "d1", str(tmp_path / "c.json"), "--data", str(tmp_path), "--timeout", "1")
    push = loaded_by(*line)
    assert {"henge_mqtt.cli.quick", "henge_mqtt.cli.push", "henge_mqtt.admin_call"} <= push
    assert not push & {"henge_mqtt.cli.configs", "henge_mqtt.client", "henge_mqtt.cli.devices", "henge_mqtt.cli.serve",
                       "henge_mqtt.cli.offline", "henge_mqtt.cli.render"}
    assert not any(m.startswith(("typer", "asyncio", "ssl", "dataclasses", "pydantic", "aiomqtt", "paho"))
                   for m in push), sorted(push)
    get = loaded_by("get", "d1", "--data", str(tmp_path), "--timeout", "1")
    history = loaded_by("history", "d1", "--data", str(tmp_path), "--timeout", "1")
    status = loaded_by("status", "-o", "wide", "--data", str(tmp_path), "--timeout", "1")
    add = loaded_by("device", "add", "d1", "--label", "a=b", "--data", str(tmp_path), "--timeout", "1")
    for loaded in (get, history, status, add):
        assert {"henge_mqtt.cli.quick", "henge_mqtt.admin_call"} <= loaded
        assert ("henge_mqtt.cli.read" in loaded) == (loaded is not add)
        assert ("henge_mqtt.cli.provision" in loaded) == (loaded is add)
        assert not loaded & {"henge_mqtt.cli.configs", "henge_mqtt.cli.push", "henge_mqtt.client",
                             "henge_mqtt.cli.devices"}
        assert ("henge_mqtt.cli.render" in loaded) == (loaded in (status, add))  # a table, a broker's note
        assert not any(m.startswith(("typer", "asyncio", "ssl", "dataclasses", "pydantic", "aiomqtt", "paho"))
                       for m in loaded), sorted(loaded)
    clicky = loaded_by(*line, "-mwhy")
    assert "henge_mqtt.cli.configs" in clicky and "typer" in clicky and "asyncio" not in clicky
    assert {"henge_mqtt.cli.devices", "henge_mqtt.cli.serve"} <= loaded_by("--help")


def _kind(param: Any) -> str:
    """A click option's kind as ``quick`` writes it."""
    if param.is_flag:
        return "flag"
    if param.multiple:
        return "many"
    if param.type.name == "path":
        return "path"
    if param.type.name == "choice":
        assert param.type.case_sensitive
        return "choice:" + ",".join(str(choice) for choice in param.type.choices)
    if getattr(param.type, "min", None) is not None:
        return f"{'int' if param.type.name.startswith('int') else 'float'}>={param.type.min:g}"
    return "text"


QUICK_COMMANDS = ["push", "get", "history", "status", "device add"]


@pytest.mark.parametrize("name", QUICK_COMMANDS)
def test_the_quick_tables_are_typers(name: str) -> None:
    """``quick.QUICK``'s table of a command is typer's written down: every option with its kind, the
    arguments in order and how many are required, the environment variables. An option added to the
    command and not to the table fails here (and, until then, a line with it goes to typer: nothing
    is misread)."""
    import typer.main

    from henge_mqtt.cli import quick

    assert set(quick.QUICK) == set(QUICK_COMMANDS)
    spec = quick.QUICK[name][0]
    command: Any = typer.main.get_command(app)
    for word in name.split():  # a group's command: "device add"
        command = command.commands[word]
    options = {flag: (p.name, _kind(p)) for p in command.params if p.param_type_name == "option"
               for flag in p.opts}
    assert spec.options == options
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    assert spec.arguments == tuple(p.name for p in arguments)
    assert spec.required == sum(1 for p in arguments if p.required)
    assert spec.env == {p.name: p.envvar for p in command.params if getattr(p, "envvar", None)}


PLAIN_PUSH_LINES: list[tuple[list[str], dict[str, str]]] = [
    (["d1", "f.json"], {}),
    (["d1", "-", "--json"], {}),
    ([], {}),
    (["--all", "f.json", "--label", "a=b", "--label", "c=d", "-m", "why", "--force", "--timeout", "2.5"], {}),
    (["d1", "f.json", "--if-version", "3", "--patch", "--wait", "--data", "/x/y"], {}),
    (["--where", "state == 'online'", "f.json", "--dry-run", "--broker", "mqtt://h:1"], {}),
    (["--reconcile", "d1"], {}),
    (["d1", "f.json", "--message=hello", "--timeout=7", "--if-version=0"], {}),
    (["d1", "f.json"], {"HENGE_DATA": "/env/data", "HENGE_BROKER": "mqtt://env:1"}),
    (["d1", "f.json", "--data", "/given"], {"HENGE_DATA": "/env/data"}),
    (["", "f.json", "-m", ""], {"HENGE_DATA": ""}),
]
TYPERS_PUSH_LINES = [  # lines quick leaves to typer: its help, its usage errors, click's own spellings
    ["--help"], ["d1", "f.json", "-mwhy"], ["d1", "f.json", "--timeout", "0"], ["d1", "f.json", "--timeout", "nan"],
    ["d1", "f.json", "--bogus"], ["d1", "f.json", "extra"], ["--", "d1", "f.json"], ["-m", "-x", "d1", "f.json"],
    ["d1", "f.json", "--if-version", "-1"], ["d1", "f.json", "--json=yes"], ["d1", "f.json", "--timeout"],
]


PLAIN_GET_LINES: list[tuple[list[str], dict[str, str]]] = [
    (["d1"], {}),
    (["d1", "--json", "--version", "3"], {}),
    (["d1", "--explain", "--timeout=2.5", "--data", "/x/y"], {}),
    (["--reported", "d1", "--history", "--broker", "mqtt://h:1"], {}),
    (["d1", "--history"], {}),  # refused by get itself (exit 2), the same way on both paths
    (["d1", "--version=1"], {"HENGE_DATA": "/env/data", "HENGE_BROKER": "mqtt://env:1"}),
    (["d1", "--data", "/given"], {"HENGE_DATA": "/env/data"}),
]
TYPERS_GET_LINES = [
    [], ["--help"], ["d1", "d2"], ["d1", "--version", "0"], ["d1", "--version", "x"], ["d1", "--bogus"],
    ["--", "d1"], ["d1", "--timeout"], ["d1", "--json=yes"], ["--json"],
]
PLAIN_HISTORY_LINES: list[tuple[list[str], dict[str, str]]] = [
    (["d1"], {}),
    (["d1", "--json", "--timeout=3"], {}),
    (["--data", "/x/y", "d1", "--broker", "mqtt://h:1"], {}),
    (["d1"], {"HENGE_DATA": "/env/data", "HENGE_BROKER": "mqtt://env:1"}),
]
TYPERS_HISTORY_LINES = [[], ["--help"], ["d1", "d2"], ["d1", "--bogus"], ["d1", "--timeout", "0"], ["--", "d1"]]
PLAIN_STATUS_LINES: list[tuple[list[str], dict[str, str]]] = [
    ([], {}),
    (["d1"], {}),
    (["--summary", "--json"], {}),
    (["-o", "wide", "--label", "site=a", "--label", "hw=2", "--state", "online", "--sync", "drift"], {}),
    (["--output=yaml", "--conflict", "--where", "state == 'online'", "--timeout=2.5"], {}),
    (["d1", "--watch", "0.5", "--data", "/x/y", "--broker", "mqtt://h:1"], {}),
    (["--state", "sideways"], {}),  # the function's own check says it (exit 2), as through typer
    ([], {"HENGE_DATA": "/env/data", "HENGE_BROKER": "mqtt://env:1"}),
]
PLAIN_DEVICE_ADD_LINES: list[tuple[list[str], dict[str, str]]] = [
    (["d1"], {}),
    (["d1", "--label", "site=a", "--label", "hw=2", "--json", "--timeout=3"], {}),
    (["--label=site=b", "d1", "--data", "/x/y"], {"HENGE_BROKER": "mqtt://env:1"}),
]
TYPERS_DEVICE_ADD_LINES = [[], ["--help"], ["d1", "d2"], ["d1", "--bogus"], ["d1", "--label"], ["--", "d1"]]
TYPERS_STATUS_LINES = [
    ["--help"], ["d1", "d2"], ["-o", "JSON"], ["-o", "csv"], ["-ojson"], ["--watch", "0.1"], ["--bogus"],
    ["--output"], ["--", "d1"],
]


@pytest.mark.parametrize("name", QUICK_COMMANDS)
def test_a_plain_line_means_the_same_with_and_without_typer(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Each plain line of the command calls its function (``push.push``, ``read.get``, ...) with the same
    arguments through ``quick`` as through the typer command (defaults, repeated options,
    ``--opt=value``, environment variables, given options over them); each line typer should read
    (its help, its usage errors, click's own spellings, a missing argument), ``quick`` leaves to it."""
    import importlib
    import inspect

    from henge_mqtt.cli import quick

    spec, module_name, function = quick.QUICK[name]
    module = importlib.import_module(f"henge_mqtt.cli.{module_name}")
    signature = inspect.signature(getattr(module, function))
    calls: list[dict[str, Any]] = []

    def record(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))

    monkeypatch.setattr(module, function, record)
    plain, typers = {"push": (PLAIN_PUSH_LINES, TYPERS_PUSH_LINES), "get": (PLAIN_GET_LINES, TYPERS_GET_LINES),
                     "history": (PLAIN_HISTORY_LINES, TYPERS_HISTORY_LINES),
                     "status": (PLAIN_STATUS_LINES, TYPERS_STATUS_LINES),
                     "device add": (PLAIN_DEVICE_ADD_LINES, TYPERS_DEVICE_ADD_LINES)}[name]
    for argv, env in plain:
        for variable in ("HENGE_DATA", "HENGE_BROKER"):
            monkeypatch.delenv(variable, raising=False)
        calls.clear()
        result = CliRunner().invoke(app, [*name.split(), *argv], env=env)
        assert result.exit_code == 0, (argv, result.output)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        with pytest.raises(SystemExit) as ended:
            quick.run(name.split()[0], [*name.split()[1:], *argv])  # as main hands a line over
        assert ended.value.code == 0
        assert len(calls) == 2 and calls[0] == calls[1], (argv, calls)
    for argv in typers:
        assert quick.parse(spec, argv) is None, argv


_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text())
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: (st.lists(inner, max_size=5) | st.lists(inner, max_size=3).map(tuple)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=5)
                   | st.dictionaries(st.integers(0, 3) | st.none() | st.booleans(), inner, max_size=3)),
    max_leaves=40,
)


@given(_DOCUMENTS)
def test_json_output_is_the_standard_librarys(document: Any) -> None:
    """``--json`` goes through ``jsontext.dumps`` (the standard encoder with ``indent`` is slow on
    10,000-device answers): byte for byte ``json.dumps(indent=2, sort_keys=True)``, whatever the
    document (nested empties, tuples, NaN and infinities, non-ASCII, keys that are not strings)."""
    from enum import IntEnum

    from henge_mqtt.cli.jsontext import dumps

    class Level(IntEnum):
        high = 2

    for value in (document, {"a": [document, Level.high]}):
        try:
            expected = json.dumps(value, indent=2, sort_keys=True)
        except TypeError:  # keys json cannot sort (None beside 1): the same error
            with pytest.raises(TypeError):
                dumps(value)
            continue
        assert dumps(value) == expected


def test_systemd_unit_and_dockerfile_use_real_flags() -> None:
    """examples/systemd/henge.service and the Dockerfile run `henge serve` with flags that exist."""
    import shlex

    import typer.main

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    flags = {opt for param in serve.params for opt in getattr(param, "opts", [])}
    unit = (ROOT / "examples" / "systemd" / "henge.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[0].endswith("henge") and argv[1] == "serve"
    assert {a for a in argv[2:] if a.startswith("--")} <= flags
    for hardening in ("DynamicUser=yes", "StateDirectory=henge", "ProtectSystem=strict", "Restart=on-failure",
                      "LimitNOFILE=", "UMask=0077"):
        assert hardening in unit
    dockerfile = (ROOT / "Dockerfile").read_text()
    entry = json.loads(next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))
                       .removeprefix("ENTRYPOINT "))
    assert entry[:2] == ["henge", "serve"] and {a for a in entry[2:] if a.startswith("--")} <= flags
    assert "USER henge" in dockerfile and "HEALTHCHECK" in dockerfile and "VOLUME /data" in dockerfile
    for line in dockerfile.splitlines():  # everything the image copies exists
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    health = json.loads(next(line for line in dockerfile.splitlines() if "CMD [" in line).split("CMD ", 1)[1])
    status = typer.main.get_command(app).commands["status"]  # type: ignore[attr-defined]
    assert {a for a in health[2:] if a.startswith("--")} <= {o for p in status.params for o in getattr(p, "opts", [])}


async def test_configs_are_strict_json(running: Running, tmp_path: Path) -> None:
    from henge_mqtt.errors import InvalidConfig

    await running.add("s1", {"ok": 1})
    data = str(running.data_dir)
    for text, problem in (('{"a": NaN}', "NaN"), ('{"a": Infinity}', "Infinity"), ('{"a": 1, "a": 2}', "'a'"),
                          ('{"n": {"x": 1, "x": 1}}', "'x'"), ("[1, 2]", "JSON object")):
        result = await asyncio.to_thread(henge_cli, "push", "s1", "-", "--data", data, input=text)
        _one_error_line(result, 1, problem)
    with pytest.raises(InvalidConfig):
        await running.service.push("s1", {"a": float("nan")})
    async with running.admin_client() as admin:  # a hand-written request with a key given twice inside
        reply_to = "henge/admin/reply/hand-written"
        await admin.subscribe(reply_to, qos=1)
        request = ('{"id": "r1", "op": "push", "reply_to": "' + reply_to + '", "args": '
                   '{"device": "s1", "config": {"a": 1, "a": 2}}}')
        await admin.publish("henge/admin/request", request, qos=1)
        reply = payload_json(await next_message(admin))
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_config"
    assert [r.version for r in await running.service.history("s1")] == [1]  # nothing was stored


async def test_no_empty_versions_and_merge_patches(running: Running) -> None:
    await running.add("p1", {"a": 1, "b": {"c": 2, "d": 3}})
    await running.add("p2", {"a": 1, "b": {"c": 2, "d": 3}})
    data = str(running.data_dir)
    same = await asyncio.to_thread(henge_cli, "push", "p1", "-", "--data", data, "--json",
                                   input='{"b": {"d": 3, "c": 2}, "a": 1}')  # equal content, other key order
    assert same.returncode == 0 and json.loads(same.stdout)["unchanged"] is True
    assert [r.version for r in await running.service.history("p1")] == [1]
    forced = await asyncio.to_thread(henge_cli, "push", "p1", "-", "--force", "--data", data, input='{"a": 1, '
                                     '"b": {"c": 2, "d": 3}}')
    assert forced.returncode == 0 and "version 2" in forced.stdout
    patched = await asyncio.to_thread(henge_cli, "push", "p1", "-", "--patch", "--data", data,
                                      input='{"b": {"d": null, "e": 5}, "z": true}')
    assert patched.returncode == 0, patched.stderr
    assert (await running.service.get_version("p1")).config == {"a": 1, "b": {"c": 2, "e": 5}, "z": True}
    cfg = running.data_dir.parent / "fleet.json"
    cfg.write_text('{"a": 1, "b": {"c": 2, "d": 3}}')  # p2 has it already, p1 does not
    fleet = await asyncio.to_thread(henge_cli, "push", "--all", str(cfg), "--data", data, "--json")
    result = json.loads(fleet.stdout)
    assert (result["devices"], result["unchanged"]) == (1, 1) and set(result["versions"]) == {"p1"}
    assert [r.version for r in await running.service.history("p2")] == [1]


# ---- issue 19: one error line, said once; usage that reads right; offline commands and the lock ----


def _serve(data: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A real ``henge serve`` (free ports, no HTTP) once it wrote service.json; its log in
    ``DATA-serve.log`` beside the data dir."""
    log = data.parent / f"{data.name}-serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0",
                                 "--no-http", "--log-level", "warning", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=out, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 20
    while not (data / "service.json").exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(0.05)
    return proc


def _cli_proc(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "henge_mqtt", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_output(proc: subprocess.Popen[str], what: str, timeout: float = 15) -> None:
    """Until ``proc`` printed a line containing ``what`` on stdout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if what in line:
            return
        assert line or proc.poll() is None, "the command ended"
    raise AssertionError(f"no {what!r} from the command")


def test_the_service_vanishing_mid_call_is_one_error_line(tmp_path: Path) -> None:
    """kill -9 of the service while the CLI waits for an answer: one ``error:`` line, at once, and none
    of asyncio's noise ("Future exception was never retrieved", aiomqtt's MqttCodeError)."""
    data = tmp_path / "d"
    server = _serve(data)
    try:
        assert henge_cli("device", "add", "d1", "--data", str(data)).returncode == 0
        for command in (["status", "--watch", "0.5"], ["events", "--no-follow"]):
            watcher = _cli_proc(*command, "--data", str(data))
            if command[0] == "status":
                _wait_for_output(watcher, "every 0.5 s")
            else:  # streaming once it shows an event that happened after it started
                assert watcher.stdout is not None
                while not select.select([watcher.stdout], [], [], 0.5)[0]:
                    assert henge_cli("device", "add", f"e{time.monotonic_ns()}", "--data", str(data)).returncode == 0
            server.send_signal(signal.SIGSTOP)  # the next call (every 0.5 s) waits for an answer...
            time.sleep(0.8)
            killed = time.monotonic()
            server.kill()  # ...that never comes
            server.wait()
            _, err = watcher.communicate(timeout=15)
            assert time.monotonic() - killed < 5, "the CLI sat out a timeout instead of seeing the lost connection"
            assert watcher.returncode == 1, err
            assert err.splitlines() == [err.splitlines()[0]] and err.startswith(
                "error: lost the connection to the service"), err
            assert "Future exception" not in err and "Traceback" not in err and "MqttCodeError" not in err
            (data / "service.json").unlink(missing_ok=True)
            server = _serve(data)
    finally:
        server.kill()
        server.wait()


def test_ctrl_c_ends_watch_and_follow_with_130_and_no_error_line(tmp_path: Path) -> None:
    data = tmp_path / "d"
    server = _serve(data)
    try:
        assert henge_cli("device", "add", "d1", "--data", str(data)).returncode == 0
        for command, ready in ((["status", "--watch", "0.5"], "every 0.5 s"), (["events"], "device_added")):
            proc = _cli_proc(*command, "--data", str(data))
            if command[0] == "events":  # streaming once it shows an event that happened after it started
                deadline = time.monotonic() + 15
                while True:
                    assert henge_cli("device", "add", f"e{time.monotonic_ns()}", "--data", str(data)).returncode == 0
                    assert proc.stdout is not None
                    if select.select([proc.stdout], [], [], 0.5)[0]:
                        break
                    assert time.monotonic() < deadline, "events never showed an event"
            _wait_for_output(proc, ready)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            assert (proc.returncode, err) == (130, ""), (command, err)
    finally:
        server.terminate()
        server.wait()


async def test_usage_as_the_docs_write_it(running: Running, tmp_path: Path) -> None:
    data = str(running.data_dir)
    await running.add("u1")
    cfg = tmp_path / "fleet.json"
    cfg.write_text('{"interval": 5}')
    pushed = await cli("push", "--all", str(cfg), "--data", data)  # as docs/cli.md writes it
    assert pushed.returncode == 0 and "stored a new version for 1 of 1 devices" in pushed.stdout, pushed.stderr
    for args, message in ((["push", "--all"], "missing FILE"), (["push"], "missing ID and FILE"),
                          (["status", ""], "ID is empty"), (["audit", "--device", ""], "--device is empty")):
        refused = await cli(*args, "--data", data)
        assert refused.returncode == 2 and one_line_error(refused).startswith(f"error: {message}"), refused.stderr
    for command in (["push"], ["diff"], ["device", "label"], ["status"]):
        shown = await cli(*command, "--help")
        assert shown.returncode == 0
        assert "<bool>" not in shown.stdout and "{" not in shown.stdout.splitlines()[1], shown.stdout
    assert "diff [OPTIONS] DEVICE A B" in (await cli("diff", "--help")).stdout


def test_broker_config_refuses_a_data_dir_without_a_store(tmp_path: Path) -> None:
    """A typo in --data must not write a config with the admin alone (every device locked out at the
    broker's next reload): refused, nothing written; --init is the explicit first setup."""
    out, typo = tmp_path / "etc", tmp_path / "henge-dta"
    refused = henge_cli("broker-config", "mosquitto", "--out", str(out), "--data", str(typo), "--user", "root")
    assert refused.returncode == 1 and one_line_error(refused).startswith(f"error: no henge store in {typo}")
    assert not out.exists() and not (typo / "henge.db").exists() and not (typo / "admin.json").exists()
    first = henge_cli("broker-config", "mosquitto", "--out", str(out), "--data", str(typo), "--user", "root",
                      "--init")
    assert first.returncode == 0, first.stderr
    assert (typo / "henge.db").exists() and ((out / "dynamic-security.json").stat().st_mode & 0o777) == 0o600


def test_offline_commands_take_the_data_dir_lock(tmp_path: Path) -> None:
    """With no admin socket, a running service is still found: restore refuses to replace its store,
    backup asks the service for an online copy, migrate refuses; the store is untouched."""
    data = tmp_path / "d"
    config = tmp_path / "nosock.yaml"
    config.write_text("henge:\n  admin_socket: false\n")
    backup = tmp_path / "b.db"
    seeded = _serve(data)
    assert henge_cli("device", "add", "keep", "--data", str(data)).returncode == 0
    seeded.terminate()
    seeded.wait()
    assert henge_cli("backup", str(backup), "--data", str(data)).returncode == 0  # stopped: a plain copy
    assert henge_cli("device", "add", "x", "--data", str(data)).returncode == 1  # (nothing runs now)
    server = _serve(data, "--config", str(config))
    try:
        assert json.loads((data / "service.json").read_text())["admin_socket"] is None
        assert henge_cli("device", "add", "later", "--data", str(data)).returncode == 0
        restored = henge_cli("restore", str(backup), "--data", str(data), "--force")
        assert restored.returncode == 1 and "a service is running on" in one_line_error(restored)
        online = henge_cli("backup", str(tmp_path / "online.db"), "--data", str(data), "--json")
        assert online.returncode == 0, online.stderr
        moved = henge_cli("migrate", "--from", str(data), "--to", str(tmp_path / "elsewhere"))
        assert moved.returncode == 1 and "another henge service is running" in one_line_error(moved)
        listed = json.loads(henge_cli("device", "list", "--data", str(data), "--json").stdout)
        assert sorted(d["id"] for d in listed) == ["keep", "later"]  # the store was not replaced
    finally:
        server.terminate()
        server.wait()


async def test_serve_runner_runs_the_service_in_process_and_stops_on_request(tmp_path: Path) -> None:
    """`henge serve`'s lifecycle is an object (as uvicorn's Server is apart from its main): it runs in
    this test's loop, serves a device, says what it does, and stops when asked; no global is left."""
    import aiomqtt

    from henge_mqtt.cli.serve import ServeRunner
    from henge_mqtt.settings import Settings

    settings = Settings.load(None, data_dir=tmp_path / "data", host="127.0.0.1", port=0)
    lines: list[str] = []
    runner = ServeRunner(settings, echo=lines.append, handle_signals=False, tune_process=False)
    run = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.started.wait(), 15)
    assert runner.service is not None
    secret = await runner.service.add_device("sensor-1")
    host, port = runner.service.address
    async with aiomqtt.Client(host, port, identifier="sensor-1", username="sensor-1", password=secret,
                              timeout=5) as device:
        await device.subscribe("henge/devices/sensor-1/config", qos=1)
        await runner.service.push("sensor-1", {"interval": 5})
        message = await asyncio.wait_for(anext(device.messages), 5)
        assert json.loads(message.payload)["config"] == {"interval": 5}  # type: ignore[arg-type]
    runner.stop()
    await asyncio.wait_for(run, 15)
    assert lines[0] == f"henge: serving on mqtt://127.0.0.1:{port} (devices and admin; data: {tmp_path / 'data'})"
    assert lines[-1] == "henge: shutting down"
    assert runner.fenced is False


def test_serve_runs_on_the_loop_it_is_given(tmp_path: Path) -> None:
    """``--loop`` (``$HENGE_LOOP``): ``auto`` and ``uvloop`` serve on uvloop (a dependency on Linux),
    ``asyncio`` on asyncio's own loop; each pushes a config a device receives, and stops on SIGTERM
    with exit 0. A loop that does not exist is a usage error, one line, exit 2."""
    for choice, running_on in (("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")):
        data = tmp_path / choice
        log = data.parent / f"{data.name}-serve.log"
        proc = _serve(data, "--log-level", "info", env={"HENGE_LOOP": choice})
        try:
            assert f"serve.loop {running_on}" in log.read_text()
            added = henge_cli("device", "add", "d1", "--data", str(data), "--json")
            secret = json.loads(added.stdout)["secret"]
            assert henge_cli("push", "d1", "-", "--data", str(data), input='{"on": "' + choice + '"}').returncode == 0
            port = json.loads((data / "service.json").read_text())["port"]
            got = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", "d1", "-u", "d1", "-P",
                                  secret, "-t", "henge/devices/d1/config", "-q", "1", "-C", "1", "-W", "10"],
                                 capture_output=True, text=True, timeout=20)
            assert json.loads(got.stdout)["config"] == {"on": choice}, got.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    wrong = henge_cli("serve", "--data", str(tmp_path / "x"), "--port", "0", "--no-http", "--loop", "trio")
    assert wrong.returncode == 2 and wrong.stderr == "error: --loop must be auto, uvloop or asyncio, not 'trio'\n"


async def test_output_to_a_reader_that_left_ends_quietly(running: Running, tmp_path: Path) -> None:
    """``henge push ... | head -0``: the reader is gone before the answer is written; as click does
    for the other commands, exit 1 with nothing on stderr (no "unexpected failure", no traceback),
    and the push itself is done."""
    await running.add("p1")
    (tmp_path / "c.json").write_text('{"a": 1}')
    proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "push", "p1", str(tmp_path / "c.json"), "--data",
                             str(running.data_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has started
    code = await asyncio.to_thread(proc.wait, 30)
    with proc.stderr:
        assert (code, proc.stderr.read()) == (1, b"")
    assert [r.version for r in await running.service.history("p1")] == [1]
