"""Mosquitto configuration generated from the store (``henge broker-config mosquitto``).

Two ways for the broker to know the devices: its dynamic security plugin (the default: henge then
adds, removes and re-keys identities live, see :mod:`henge_mqtt.dynsec`), or a password file and an
ACL file (for a Mosquitto without the plugin: regenerated and reloaded by an operator).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from ..dynsec import document
from ..errors import SettingsError, ValidationFailed
from ..topics import DEVICE_PUBLISHES, DEVICE_READS, claim_user
from .auth import write_private


def _access(leaf: str) -> str:
    """A device's right to one of its own topics, as a Mosquitto ACL pattern says it."""
    return {(True, False): "read", (False, True): "write"}.get(
        (leaf in DEVICE_READS, leaf in DEVICE_PUBLISHES), "readwrite")


def identities(data_dir: Path, admin_name: str, url: str | None = None, *, init: bool = False,
               kind: Literal["mosquitto", "bcrypt"] = "mosquitto"
               ) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """``{username: hash}`` (Mosquitto's ``$7$``, or bcrypt for NATS) of the admin and every device
    from the store (SQLite in ``data_dir``, or PostgreSQL at ``url``), with the admin identity made
    first if need be; the devices with no such hash yet; ``{claim user: hash}`` of the claims.

    A SQLite data dir without a store is refused unless ``init`` (first setup, before the first
    ``henge serve``): a mistyped ``--data`` would otherwise write a config with the admin alone, and
    every device would be locked out at the broker's next reload. With ``url`` the data dir holds
    only the admin credentials, and is created. The data dir's lock is taken when no service holds
    it (a running service is fine: the store is only read, the admin identity already exists).
    """
    from ..datadir import DataDirLock
    from ..store import DB_FILE, Store
    from .auth import admin_secret

    if url is None and not (data_dir / DB_FILE).exists() and not init:
        raise ValidationFailed(f"no henge store in {data_dir} (no {DB_FILE}): check --data, or pass --init to "
                               "create one on first setup; nothing was written")
    lock = DataDirLock(data_dir)
    lock.try_acquire()  # not taken when a service runs on it: then read alongside it
    try:
        store = Store(data_dir, url=url)
        try:
            store.ensure_admin(admin_name, admin_secret(data_dir, admin_name))
            hashes, missing = store.broker_hashes(kind)
            return hashes, missing, claim_users(store.claim_hashes(kind))
        finally:
            store.close()
    finally:
        lock.release()


def claim_users(hashes: dict[str, str]) -> dict[str, str]:
    """``{claim id: hash}`` as the broker's users: ``claim:<id>`` (docs/onboarding.md)."""
    return {claim_user(claim): digest for claim, digest in hashes.items()}


def _listener(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise SettingsError(f"invalid listener {spec!r}: expected HOST:PORT")
    return host or "0.0.0.0", int(port)


def _give_to(user: str, *paths: Path) -> None:
    """Mosquitto started as root reads its password file only after switching to ``user``: as root,
    hand the files to that user (still mode 0600, readable by nobody else)."""
    if os.geteuid() != 0 or user == "root":
        return
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SettingsError(f"no user {user!r} on this machine for mosquitto to run as (--user)") from None
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


PLUGIN_PATHS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                "/usr/lib/mosquitto_dynamic_security.so", "/usr/local/lib/mosquitto_dynamic_security.so")


def find_plugin() -> Path | None:
    """Where this machine's Mosquitto keeps its dynamic security plugin (Debian's package ships it)."""
    return next((Path(p) for p in PLUGIN_PATHS if Path(p).exists()), None)


def write_mosquitto_config(
    out: Path,
    hashes: dict[str, str],
    *,
    device_listener: str,
    admin_listener: str,
    topic_prefix: str,
    admin_name: str,
    run_as: str = "mosquitto",
    plugin: Path | None = None,
    claims: dict[str, str] | None = None,
) -> list[Path]:
    """``mosquitto.conf`` and the identities of everyone in ``hashes``, every file mode 0600 and
    written atomically (a broker reloading meanwhile never reads half a file).

    Two listeners: devices on the first, henge and the CLI on the second (loopback), where several
    admin clients may be connected at once. With ``plugin`` (Mosquitto's dynamic security plugin),
    the identities are the plugin's state, ``dynamic-security.json``, which the broker rewrites as
    henge changes identities (so it belongs to ``run_as``); devices' client ids are bound to their
    user names there, and the claims in ``claims`` (``{claim user: hash}``) are clients too.
    Without, ``passwd`` and ``acl``, and the device listener sets ``use_username_as_clientid`` (so
    one device's credentials can never take over another's connection); a password file cannot
    hold a claim's user name (Mosquitto splits its lines at ``:``), so claims need the plugin.
    """
    device_host, device_port = _listener(device_listener)
    admin_host, admin_port = _listener(admin_listener)
    out.mkdir(parents=True, exist_ok=True)
    conf = out / "mosquitto.conf"
    if plugin is not None:
        state = out / "dynamic-security.json"
        write_private(state, json.dumps(document(hashes, admin_name=admin_name, prefix=topic_prefix,
                                                           claims=claims), indent=2))
        _give_to(run_as, state, out)  # the plugin saves its state there (a new file next to it, then a rename)
        conf.write_text(
            "# generated by henge broker-config mosquitto --identities dynamic-security (see docs/scaling.md)\n"
            "per_listener_settings false\n"
            "persistence false\n"
            f"# started as root, mosquitto switches to this user: it must be able to write {state.name}\n"
            f"user {run_as}\n"
            "allow_anonymous false\n"
            f"plugin {plugin}\n"
            f"plugin_opt_config_file {state.resolve()}\n\n"
            "# devices\n"
            f"listener {device_port} {device_host}\n\n"
            "# henge and the admin CLI (loopback)\n"
            f"listener {admin_port} {admin_host}\n"
        )
        return [conf, state]
    passwd, acl = out / "passwd", out / "acl"
    write_private(passwd, "".join(f"{user}:{digest}\n" for user, digest in sorted(hashes.items())))
    p = topic_prefix
    write_private(acl, (
        "# generated by henge broker-config mosquitto\n"
        f"user {admin_name}\n"
        f"topic readwrite {p}/#\n\n"
        "# every other user is a device: %u is its username, which is also its client id\n"
        + "".join(f"pattern {_access(leaf)} {p}/devices/%u/{leaf}\n"
                  for leaf in dict.fromkeys(DEVICE_READS + DEVICE_PUBLISHES))
    ))
    _give_to(run_as, passwd, acl)
    conf.write_text(
        "# generated by henge broker-config mosquitto (see docs/scaling.md)\n"
        "per_listener_settings true\n"
        "persistence false\n"
        f"# started as root, mosquitto switches to this user: it must be able to read {passwd.name}\n"
        f"user {run_as}\n\n"
        "# devices\n"
        f"listener {device_port} {device_host}\n"
        "allow_anonymous false\n"
        f"password_file {passwd.resolve()}\n"
        f"acl_file {acl.resolve()}\n"
        "use_username_as_clientid true\n\n"
        "# henge and the admin CLI (loopback)\n"
        f"listener {admin_port} {admin_host}\n"
        "allow_anonymous false\n"
        f"password_file {passwd.resolve()}\n"
        f"acl_file {acl.resolve()}\n"
    )
    return [conf, acl, passwd]
