"""``henge claim``: credentials a batch of devices shares to enrol themselves (docs/onboarding.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import BrokerOpt, DataOpt, JsonOpt, TimeoutOpt, call_op, emit, fail, labels_arg, op_help
from .render import broker_said, render_table
from .tree import claim_app

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600`` (seconds) as seconds; exit 2 otherwise."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not found or float(found.group(1)) <= 0:
        fail(f"--expires wants a duration like 30d, 12h or 90m, not {text!r}", 2)
    return float(found.group(1)) * UNITS[found.group(2) or "s"]


@claim_app.command("create", help=op_help("claim.create"))
def claim_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The claim's name (e.g. the batch: berlin-2026-12).")],
    uses: Annotated[int, typer.Option("--uses", min=1, max=1_000_000, help="How many devices it may create.")],
    expires: Annotated[str, typer.Option("--expires", help="How long it works: 30d, 12h, 90m, or seconds.")],
    label: Annotated[list[str] | None, typer.Option("--label", help="k=v, repeatable: the labels every device it "
                                                    "creates gets (and so its layers).")] = None,
    device_broker: Annotated[str | None, typer.Option("--device-broker", help="mqtt://host:port the devices "
                                                      "connect to, written in the claim file (default: the "
                                                      "first device listener).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the claim file here (mode 0600; never "
                                             "overwritten) instead of printing it.")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="A claim CA (PEM): a device with a certificate it signed "
                                            "may claim its certificate's CN over TLS without the claim secret.")]
    = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    seconds = duration(expires)
    if seconds > 366 * 86400:
        fail("--expires: at most 366 days", 2)
    if out is not None and out.exists():
        fail(f"{out} exists; the claim file is never overwritten (nothing was created)", 2)
    args: dict[str, Any] = {"name": name, "labels": labels_arg(label), "uses": uses, "expires_in": seconds}
    if device_broker is not None:
        args["broker"] = device_broker
    if ca is not None:
        try:
            args["ca"] = ca.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read the claim CA {ca}: {getattr(exc, 'strerror', None) or exc}", 2)
    result = call_op(data, broker, timeout, "claim.create", **args)
    said = broker_said(result)  # behind an external broker: whether it has the claim's user now
    document = json.dumps(result["credential"], indent=2) + "\n"
    if out is not None:
        import os

        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(document)
    summary = (f"claim {result['name']} ({result['id']}) created: {result['uses']} devices, until "
               f"{result['expires_at']}" + (f", labels {','.join(f'{k}={v}' for k, v in result['labels'].items())}"
                                           if result["labels"] else "") + said)
    if out is not None:
        emit(result, as_json, lambda _: f"{summary}\nclaim file: {out} (give it to the devices: henge agent --claim "
                                         f"{out.name} ...; it is not shown again)")
    else:
        emit(result, as_json, lambda _: f"{summary}\n(the claim file below is not shown again)\n{document.rstrip()}")


@claim_app.command("list", help=op_help("claim.list"))
def claim_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
               timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "claim.list")
    people = [r | {"labels": ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-", "ca": r["ca"] or "-"}
              for r in rows]
    emit(rows, as_json, lambda _: render_table(people, ["id", "name", "state", "used", "uses", "left", "expires_at",
                                                        "labels", "ca"]) if rows else "no claims")


@claim_app.command("revoke", help=op_help("claim.revoke"))
def claim_revoke(
    claim: Annotated[str, typer.Argument(metavar="ID_OR_NAME", help="The claim's id or name.")],
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    result = call_op(data, broker, timeout, "claim.revoke", claim=claim)
    said = broker_said(result)
    emit(result, as_json, lambda r: f"claim {r['name']} revoked ({r['used']} devices created with it keep "
                                    f"their own identities){said}")
