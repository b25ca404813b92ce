"""How the CLI shows things: tables, the status table with its colours, spans of time, the
fleet and rollout answers, YAML and JSON dumps. Pure functions of the service's replies.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from .jsontext import dumps as json_text
from .plain import echo


def render_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def session_text(session: dict[str, Any] | None) -> str:
    """``persistent (expires ...)``: a session kept for a device that asked for one; else ``clean``."""
    if not session:
        return "clean"
    if session["expires_at"] is None:
        return f"persistent (connected; kept {session['expiry']} s after it disconnects)"
    return f"persistent (expires {session['expires_at']}, in {age_until(session['expires_at'])})"


def age_until(stamp: str) -> str:
    """How long until ``stamp``: ``45s``, ``12m``, ``3h``, ``2d``."""
    return span((datetime.fromisoformat(stamp.replace("Z", "+00:00")) - datetime.now(UTC)).total_seconds())


def device_block(r: dict[str, Any]) -> str:
    st = r["status"]

    def show(value: Any) -> str:
        if value is None or value == [] or value == {}:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, dict):
            return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
        if isinstance(value, list):
            return ", ".join(str(v) for v in value)
        return str(value)

    applied = st["applied_version"]
    lines = [
        ("device", r["id"]), ("labels", show(r["labels"])),
        ("created", f"{r['created_at']} ({age(r['created_at'])} ago)"),
        ("state", f"{st['state']} since {st['since']} ({age(st['since'])} ago)" if st["since"] else st["state"]),
        ("reason", st["reason"]), ("remote", show(st["remote"])), ("epoch", str(st["epoch"])),
        ("version", f"desired {r['desired_version']}, applied {show(applied)}"), ("sync", st["sync"]),
        ("error", show(st["error"])), ("takeovers (1 h)", str(st["takeovers"])),
        ("conflict", show(st["conflict_remotes"]) if st["conflict"] else "no"),
        ("quarantined until", show(st["quarantined_until"])),
        ("session", session_text(st.get("session"))),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)


def fleet_failure(r: dict[str, Any]) -> str:
    """The one ``error:`` line of a fleet ``push --wait`` that did not end applied everywhere: counts,
    then the most common messages (as a single-device push says why its device rejected)."""
    if r["rejected"]:
        common = "; ".join(f"{' '.join(str(error).split()) or 'no reason given'} ({count})"
                           for error, count in list(r["errors"].items())[:3])
        more = f"; {r['pending']} not reported" if r["pending"] else ""
        return f"{r['rejected']} of {r['devices']} devices rejected the new version: {common}{more}"
    return (f"{r['pending']} of {r['devices']} devices did not report the new version within {r['waited']:g} s "
            f"({r['offline']} offline)")


def fleet_lines(r: dict[str, Any], waited: bool) -> str:
    """A fleet push's answer for people: counts, then the devices that need a look."""
    lines = [f"stored a new version for {r['devices']} of {r['targeted']} devices"
             + (f" ({r['unchanged']} already had it)" if r["unchanged"] else "")]
    delivered = "" if r["delivered"] is None else f", {r['delivered']} delivered"
    lines.append(f"{r['online']} online, {r['offline']} offline{delivered}; "
                 f"{r['applied']} applied, {r['rejected']} rejected, {r['pending']} not reported yet")
    for error, count in r["errors"].items():
        lines.append(f"rejected by {count}: {error}")
    for state, what in (("rejected", "rejected"), ("offline", "offline (they get it when they connect)"),
                        ("silent", "online, no report yet")):
        names = r["listed"][state]
        if names and (state == "rejected" or waited):
            more = r[{"rejected": "rejected"}.get(state, "pending")] - len(names) if state == "rejected" else 0
            lines.append(f"{what}: {', '.join(names)}" + (f" and {more} more" if more > 0 else ""))
    if waited and r["pending"]:
        lines.append(f"timed out after {r['waited']:g} s with {r['pending']} devices not reported")
    return "\n".join(lines)


# ---- sessions ----------------------------------------------------------------------------------


class Output(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


def use_color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def dump(value: Any, fmt: Output) -> str:
    if fmt == Output.yaml:
        import yaml

        return str(yaml.safe_dump(value, sort_keys=False, allow_unicode=True)).rstrip()
    return json_text(value)


def age(stamp: str | None, now: datetime | None = None) -> str:
    """``2026-11-29T10:00:00Z`` as a person reads it next to now: ``45s``, ``12m``, ``3h``, ``2d``."""
    if not stamp:
        return "-"
    return span(((now or datetime.now(UTC)) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds())


def span(seconds: float) -> str:
    """A length of time in its largest whole unit: ``45s``, ``12m``, ``3h``, ``2d`` (never negative)."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


STATE_COLOR = {"online": "green", "offline": "bright_black", "quarantined": "red"}
SYNC_COLOR = {"in_sync": "green", "drift": "magenta", "pending": "yellow", "rejected": "red", "unknown": "bright_black",
               "invalid": "red"}
ANSI = {"green": 32, "red": 31, "yellow": 33, "magenta": 35, "bright_black": 90}  # click.style's codes


def style(text: str, fg: str | None) -> str:
    """``text`` in colour ``fg`` as ``click.style`` writes it (without loading click for a status line)."""
    return f"\x1b[{ANSI[fg]}m{text}\x1b[0m" if fg in ANSI else text


def status_table(rows: list[dict[str, Any]], *, wide: bool, color: bool) -> str:
    """A table for people: 100 columns by default (labels cut to fit), every field with ``wide``."""
    now = datetime.now(UTC)
    table = []
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-"
        marker = " !" if r["conflict"] else ""
        applied = "-" if r["applied_version"] is None else str(r["applied_version"])
        cells = {
            "DEVICE": r["device"], "STATE": r["state"] + marker, "AGE": age(r["since"], now),
            "VERSION": f"{applied}/{r['desired_version']}", "SYNC": r["sync"], "LABELS": labels,
        }
        if wide:
            cells.update({
                "SINCE": r["since"] or "-", "REMOTE": r["remote"] or "-", "REASON": r["reason"],
                "EPOCH": str(r["epoch"]), "TAKEOVERS": str(r["takeovers"]),
                "CONFLICT": ",".join(r["conflict_remotes"]) or ("yes" if r["conflict"] else "-"),
                "SESSION": "-" if not r.get("session") else "persistent" + (
                    f" (expires in {age_until(r['session']['expires_at'])})" if r["session"]["expires_at"] else ""),
                "ERROR": r["error"] or "-",
            })
        table.append(cells)
    columns = ["DEVICE", "STATE", "AGE", "VERSION", "SYNC", "LABELS"]
    if wide:
        columns += ["SINCE", "REMOTE", "REASON", "EPOCH", "TAKEOVERS", "CONFLICT", "SESSION", "ERROR"]
    widths = {c: max([len(c)] + [len(t[c]) for t in table]) for c in columns}
    if not wide:  # the labels get what is left of 100 columns
        used = sum(widths[c] + 2 for c in columns if c != "LABELS")
        widths["LABELS"] = max(len("LABELS"), min(widths["LABELS"], 100 - used))
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    for t in table:
        line: list[str] = []
        for c in columns:
            text = t[c] if len(t[c]) <= widths[c] else t[c][: widths[c] - 1] + "~"
            padded = text.ljust(widths[c])
            if color and c == "STATE":
                padded = style(padded, fg=STATE_COLOR.get(t[c].split()[0]))
            elif color and c == "SYNC":
                padded = style(padded, fg=SYNC_COLOR.get(t[c]))
            line.append(padded)
        lines.append("  ".join(line).rstrip())
    if any(r["conflict"] for r in rows):
        lines.append("! identity conflict: two clients share the id (henge status -o wide shows where from)")
    return "\n".join(lines)


def rollout_lines(r: dict[str, Any]) -> str:
    lines = [f"rollout {r['id']}: {r['state']}" + (f" ({r['reason']})" if r["reason"] else "")
             + (f", wave {r['wave']} of {len(r['waves'])}" if r["state"] in ("running", "paused") else "")]
    people = [{"wave": w["wave"], "targeted": w["targeted"], "online": w["online"] if w["published"] else "-",
               "delivered": "-" if w["delivered"] is None or not w["published"] else w["delivered"],
               "applied": w["applied"], "rejected": w["rejected"], "offline": w["offline"], "pending": w["pending"],
               "reverted": w["reverted"]} for w in r["waves"]]
    lines.append(render_table(people, ["wave", "targeted", "online", "delivered", "applied", "rejected", "offline",
                                 "pending", "reverted"]))
    for w in r["waves"]:
        for error, count in w["errors"].items():
            lines.append(f"wave {w['wave']}: rejected by {count}: {error}")
    for note in r["kept"]:
        lines.append(f"not reverted: {note}")
    return "\n".join(lines)


def warn_new_devices(result: dict[str, Any], as_json: bool) -> None:
    """After ``--force``: which devices added from now on would be refused, said once on stderr."""
    for line in result.get("new_devices_invalid", []) if not as_json else []:
        echo(f"warning: {line} (stored with --force: such a device add is refused)", err=True)


def broker_said(result: dict[str, Any]) -> str:
    """What the broker did with an identity change, for people: a line when an external broker took
    it at once, a warning on stderr (never silence) when it did not; nothing with the embedded one."""
    note = result.get("broker") or {}
    if not note or note.get("how") == "store":
        return ""
    if note.get("applied"):
        how = str(note.get("how"))
        how = {"dynamic-security": "Mosquitto dynamic security",
               "nats-accounts": "NATS accounts file rewritten, " + (note.get("detail") or "every node reloaded"),
               }.get(how, how)
        return f"\nbroker: updated at once ({how})"
    echo(f"warning: the broker does not know this yet: {note.get('detail')}", err=True)
    return ""
