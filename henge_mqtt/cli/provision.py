"""``henge device add``: its work, without typer, once its line is parsed.

A provisioning script registers its fleet one ``henge device add ID --label k=v`` at a time (10,000
starts of the command); :mod:`henge_mqtt.cli.quick` parses such a plain line and calls this, and the
typer command (:mod:`henge_mqtt.cli.devices`) declares the options and calls it too.
"""

from __future__ import annotations

from pathlib import Path

from .plain import call_op, emit, labels_arg
from .render import broker_said


def device_add(device: str, *, label: list[str] | None = None, data: Path | None = None, broker: str | None = None,
               as_json: bool = False, timeout: float = 10.0) -> None:
    result = call_op(data, broker, timeout, "device.add", device=device, labels=labels_arg(label))
    said = broker_said(result)
    emit(result, as_json, lambda r: f"device {r['device']} added\nsecret: {r['secret']}\n"
          "(store it now: it is not shown again)" + said)
