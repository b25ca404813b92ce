"""The SQLite store on disk and the settings files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml

from henge_mqtt.errors import DuplicateDevice, SettingsError, StoreError, UnknownDevice, UnknownVersion
from henge_mqtt.models import device_id_problem
from henge_mqtt.server.router import filter_matches, valid_filter
from henge_mqtt.settings import Settings
from henge_mqtt.store import MIGRATIONS, IntegrityError, Store
from henge_mqtt.topics import Topics

ROOT = Path(__file__).resolve().parent.parent


def test_store_schema_wal_and_migrations(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.schema_version == len(MIGRATIONS)
    store.close()
    db = sqlite3.connect(tmp_path / "henge.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    # a store made by the first release (schema 1), with a device in it, migrates forward intact
    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "henge.db")
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO devices (id, secret_hash, created_at) VALUES ('legacy', 'x', '2026-01-01T00:00:00+00:00')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    migrated = Store(old)
    assert migrated.schema_version == len(MIGRATIONS)
    assert migrated.get_device("legacy").id == "legacy"
    assert migrated.broker_hashes()[1] == ["legacy"]  # made before broker hashes existed
    migrated.close()


def test_store_refuses_a_newer_schema_and_garbage(tmp_path: Path) -> None:
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "henge.db")
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this henge"):
        Store(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "henge.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(bad)


def test_versions_are_immutable_and_secrets_hashed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    secret = store.add_device("d1", {"site": "x"})
    with pytest.raises(DuplicateDevice):
        store.add_device("d1")
    assert store.verify_device("d1", secret) and not store.verify_device("d1", secret + "x")
    assert not store.verify_device("ghost", secret)
    store.push("d1", {"a": 1}, actor="t")
    with pytest.raises(IntegrityError, match="immutable"):
        store._db.execute("UPDATE config_versions SET config = '{}'")
    raw = (tmp_path / "henge.db").read_bytes() + (tmp_path / "henge.db-wal").read_bytes()
    assert secret.encode() not in raw
    with pytest.raises(UnknownVersion):
        store.get_version("d1", 5)
    with pytest.raises(UnknownDevice):
        store.history("nobody")
    store.close()


def test_epoch_high_water_mark_only_rises(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.add_device("d1")
    store.save_sessions({"d1": 5}, {})
    store.save_sessions({"d1": 3}, {})
    assert store.epochs() == {"d1": 5}
    store.close()


def test_default_yaml_spells_out_the_built_in_defaults(tmp_path: Path) -> None:
    built_in = Settings.load(data_dir=tmp_path)
    from_file = Settings.load(ROOT / "broker_config" / "default.yaml", data_dir=tmp_path)
    assert from_file == built_in
    gateway = Settings.load(ROOT / "broker_config" / "gateway.yaml", data_dir=tmp_path)
    assert gateway.listeners["default"].bind == "0.0.0.0:1883"
    assert gateway.model_copy(update={"listeners": built_in.listeners}) == built_in


def test_settings_overrides_and_errors(tmp_path: Path) -> None:
    s = Settings.load(data_dir=tmp_path, port=0)
    assert s.listeners["default"].bind == "127.0.0.1:0"
    assert Settings.load(data_dir=tmp_path, host="::1", port=5).listeners["default"].bind == "[::1]:5"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"henge": {"max_keepalive": -1}}))
    with pytest.raises(SettingsError, match="max_keepalive"):
        Settings.load(bad)
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("good", ["a", "dev-1", "A.b_c-9", "x" * 64])
def test_good_device_ids(good: str) -> None:
    assert device_id_problem(good) is None


@pytest.mark.parametrize("bad", ["", "-a", "a/b", "a+b", "a#", "$SYS", "x" * 65, "a b", "é"])
def test_bad_device_ids(bad: str) -> None:
    assert device_id_problem(bad)


def test_topic_acl() -> None:
    t = Topics("henge")
    assert t.device_may_subscribe("d1", "henge/devices/d1/config")
    assert t.device_may_subscribe("d1", "henge/devices/d1/#")
    assert not t.device_may_subscribe("d1", "henge/devices/d10/config")
    assert not t.device_may_subscribe("d1", "henge/devices/+/config")
    assert not t.device_may_subscribe("d1", "henge/#")
    assert t.device_may_publish("d1", "henge/devices/d1/report")
    assert not t.device_may_publish("d1", "henge/devices/d1/config")
    assert filter_matches("a/+/c", "a/b/c") and filter_matches("a/#", "a") and not filter_matches("+/x", "$SYS/x")
    assert not valid_filter("a/#/b") and not valid_filter("a+/b")


def test_store_durability_is_full_unless_configured(tmp_path: Path) -> None:
    full = Store(tmp_path / "a")
    normal = Store(tmp_path / "b", synchronous="normal")
    try:
        assert full._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit survives a power cut
        assert normal._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL (docs/security.md)
    finally:
        full.close()
        normal.close()
    config = tmp_path / "c.yaml"
    config.write_text("henge:\n  store_synchronous: off\n")
    with pytest.raises(SettingsError, match="store_synchronous"):
        Settings.load(config, data_dir=tmp_path)


def test_every_setting_is_documented() -> None:
    from henge_mqtt.settings import SessionConfig

    doc = (ROOT / "docs" / "configuration.md").read_text()
    internal = {"data_dir", "listeners", "sessions", "external_ca", "external_cert", "external_key"}
    names = [n for n in Settings.model_fields if n not in ("data_dir", "listeners", "sessions")]
    names += [f"sessions.{n}" for n in SessionConfig.model_fields]
    missing = [n for n in names if f"| `{n}` |" not in doc]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    default_yaml = (ROOT / "broker_config" / "default.yaml").read_text()
    assert not [n for n in Settings.model_fields if n not in internal and f"  {n}:" not in default_yaml]
