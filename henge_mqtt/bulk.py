"""Reading and writing the files of bulk device operations (import/export, secrets)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from .errors import ValidationFailed
from .models import device_id_problem


def read_devices(path: Path) -> list[tuple[str, dict[str, str]]]:
    """CSV with an ``id`` column (every other column is a label) or JSON lines ``{"id", "labels"}``.

    Every problem names the file and line, and nothing is imported unless the whole file is good.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationFailed(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValidationFailed(f"{path} is not UTF-8 text") from exc
    stripped = text.lstrip()
    devices = _read_jsonl(path, text) if stripped.startswith("{") else _read_csv(path, text)
    if not devices:
        raise ValidationFailed(f"{path} holds no devices")
    seen: set[str] = set()
    for line, (device, _) in enumerate(devices, start=1):
        problem = device_id_problem(device)
        if problem:
            raise ValidationFailed(f"{path}: device {line}: {problem}")
        if device in seen:
            raise ValidationFailed(f"{path}: device {device!r} appears twice")
        seen.add(device)
    return devices


def _read_jsonl(path: Path, text: str) -> list[tuple[str, dict[str, str]]]:
    devices = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationFailed(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise ValidationFailed(f"{path}:{number}: expected an object with a string \"id\"")
        labels = row.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValidationFailed(f"{path}:{number}: \"labels\" must map names to strings")
        devices.append((row["id"], {str(k): v for k, v in labels.items()}))
    return devices


def _read_csv(path: Path, text: str) -> list[tuple[str, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "id" not in reader.fieldnames:
        raise ValidationFailed(f"{path}: a CSV needs a header with an \"id\" column")
    devices = []
    for row in reader:
        device = (row.pop("id") or "").strip()
        labels = {k: v for k, v in row.items() if k and v}
        devices.append((device, labels))
    return devices


def devices_csv(rows: list[dict[str, Any]]) -> str:
    keys = sorted({k for row in rows for k in row["labels"]})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", *keys])
    for row in rows:
        labels = row["labels"]
        writer.writerow([row["id"], *(labels.get(k, "") for k in keys)])
    return out.getvalue()


def write_secrets(path: Path, secrets_by_id: dict[str, str]) -> None:
    """``id,secret`` lines in a file only its owner can read, created exclusively."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "secret"])
        for device, secret in secrets_by_id.items():
            writer.writerow([device, secret])
