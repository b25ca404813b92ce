"""Docs run as written (issue 19): every Python block of docs/library.md, and the README's shell
blocks (the ports substituted: this suite binds only ports it chose). docs/scaling.md's blocks run in
tests/test_external.py (the first, on Mosquitto) and tests/test_postgres.py (PostgreSQL, HA)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .conftest import ROOT
from .ports import free_port


def blocks(doc: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / doc).read_text(), re.S)




def test_every_python_block_of_library_md_runs(tmp_path: Path) -> None:
    found = blocks("docs/library.md", "python")
    assert len(found) >= 2
    for block in found:
        for _ in range(2):  # as written, and once more on the same data dir
            done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, (block, done.stderr)


def test_the_readme_quickstart_and_first_steps_run(tmp_path: Path) -> None:
    """`henge serve` (the Quickstart's first line, after its install), then the block that follows it,
    line by line as a user types it, in the same directory (so the default ./henge-data)."""
    quickstart, steps = blocks("README.md", "sh")[:2]
    serve = quickstart.splitlines()[0].split("&&")[1].strip()
    assert serve == "henge serve"
    mqtt, http = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--port", str(mqtt), "--http",
                                   f"127.0.0.1:{http}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 20
        # Ready once the console is up too: its first-run token is written just before its port opens.
        while not ((tmp_path / "henge-data" / "service.json").exists() and b"console on" in log.read_bytes()):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert (tmp_path / "henge-data" / "http-token").exists()
        secret = ""
        outputs: list[str] = []
        for line in steps.strip().splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith("mosquitto_sub"):  # a device: one message, on this run's port
                command = command.replace("<secret>", secret) + f" -p {mqtt} -C 1 -W 10"
            command = re.sub(r"(^|\| )henge ", rf"\1{shlex.quote(sys.executable)} -m henge_mqtt ", command)
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, (command, done.stderr)
            outputs.append(done.stdout)
            if "device add" in command:
                secret = re.search(r"secret: (\S+)", done.stdout).group(1)  # type: ignore[union-attr]
        snapshot = json.loads(outputs[2])
        assert (snapshot["device"], snapshot["config"]) == ("sensor-1", {"interval": 5})
        assert "sensor-1" in outputs[3] and "devices=1" in outputs[3]
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_the_op_tables_in_the_docs_are_generated_from_the_op_table() -> None:
    """docs/protocol.md's op table and docs/http.md's route table are henge_mqtt/ops.py's, as
    ``python -m henge_mqtt.ops`` writes them: an op added, renamed or given another role shows."""
    from henge_mqtt.ops import GENERATED, OPS, with_tables

    for doc in GENERATED:
        text = (ROOT / doc).read_text()
        assert with_tables(doc, text) == text, f"{doc} is stale: run python -m henge_mqtt.ops"
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    assert all(f"| `{op.name}` | {op.role} |" in protocol for op in OPS.values() if op.admin)
