"""Commands that work on a data dir or files rather than a running service: migrate, backup,
restore, throwaway certificates, and an external broker's configuration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import BrokerOpt, DataOpt, JsonOpt, TimeoutOpt, call_op, emit, fail, user_errors
from .tree import app, broker_config_app, certs_app


@app.command()
@user_errors
def migrate(
    source: Annotated[str, typer.Option("--from", metavar="DATA|URL", help="A stopped service's data dir (SQLite) "
                                        "or a postgresql:// URL.")],
    target: Annotated[str, typer.Option("--to", metavar="DATA|URL", help="An empty data dir or PostgreSQL "
                                        "database.")],
    as_json: JsonOpt = False,
) -> None:
    """Move a whole store between SQLite and PostgreSQL (stop the service first)."""
    from ..service.migrate import migrate_store

    counts = migrate_store(source, target)
    emit(counts, as_json, lambda c: "moved " + ", ".join(f"{n} {table}" for table, n in c.items() if n))


@app.command()
@user_errors
def backup(
    target: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write the copy (mode 0600).")],
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    """A consistent copy of the store: from the running service (online), or from a stopped data dir."""
    from ..service.backup import backup_stopped

    data_dir = data or Path("henge-data")
    copied = None if broker else backup_stopped(data_dir, target.resolve())  # None: a service holds the data dir
    if copied is None:
        result = call_op(data, broker, timeout, "backup", path=str(target.resolve()))
    else:
        result = {"path": str(target.resolve()), "bytes": copied}
    emit(result, as_json, lambda r: f"backup written to {r['path']} ({r['bytes']} bytes)")


@app.command()
@user_errors
def restore(
    source: Annotated[Path, typer.Argument(metavar="FILE", help="A file made by henge backup.")],
    data: DataOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the data dir's store.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Put a backup in place as a (stopped) data dir's store; the next henge serve republishes it."""
    from ..service.backup import restore as put_back

    data_dir = data or Path("henge-data")
    devices = put_back(source, data_dir, force=force)
    emit({"data": str(data_dir), "devices": devices}, as_json,
          lambda r: f"restored {r['devices']} devices into {r['data']}; start henge serve --data {r['data']}")


@certs_app.command("dev")
@user_errors
def certs_dev(
    out: Annotated[Path, typer.Option("--out", help="Directory to write into.")],
    host: Annotated[list[str] | None, typer.Option("--host", help="Server name or IP (repeatable).")] = None,
    device: Annotated[list[str] | None, typer.Option("--device", help="A device certificate (CN = id).")] = None,
    days: Annotated[int, typer.Option("--days", min=1)] = 30,
    force: Annotated[bool, typer.Option("--force", help="Overwrite certificates already in --out.")] = False,
) -> None:
    """A throwaway CA, server and device certificates for tests and demos (not for production)."""
    from ..certs import make_dev_certs
    from ..ids import device_id_problem

    for d in device or []:
        problem = device_id_problem(d)
        if problem:
            fail(problem, 2)
    if (out / "ca.pem").exists() and not force:
        fail(f"{out} already holds a CA (ca.pem): certificates signed by it would stop verifying; "
             "pass --force to replace it", 1)
    written = make_dev_certs(out, host or ["localhost", "127.0.0.1"], device or [], days)
    typer.echo(f"wrote {', '.join(p.name for p in written.values())} and their keys (mode 0600) to {out}")
    typer.echo("these are for testing: production certificates come from your own PKI", err=True)


@broker_config_app.command("mosquitto")
@user_errors
def broker_config_mosquitto(
    out: Annotated[Path, typer.Option("--out", help="Directory for mosquitto.conf, acl and passwd.")],
    data: DataOpt = None,
    device_listener: Annotated[str, typer.Option("--device-listener", help="HOST:PORT devices use.")]
    = "0.0.0.0:1883",
    admin_listener: Annotated[str, typer.Option("--admin-listener", help="HOST:PORT for henge and the CLI.")]
    = "127.0.0.1:1884",
    topic_prefix: Annotated[str, typer.Option("--topic-prefix")] = "henge",
    run_as: Annotated[str, typer.Option("--user", help="The user mosquitto runs as (it reads these files; with "
                                        "dynamic security it also writes its state there).")] = "mosquitto",
    store: Annotated[str | None, typer.Option("--store", metavar="URL", help="Read the identities from this "
                                              "PostgreSQL store (as henge serve --store).")] = None,
    init: Annotated[bool, typer.Option("--init", help="First setup: create the store and the admin identity "
                                       "if --data holds none (otherwise that is refused).")] = False,
    identities_mode: Annotated[str, typer.Option(
        "--identities", help="dynamic-security (the broker's plugin: henge adds, removes and re-keys devices live) "
        "or password-file (passwd and acl files: run broker-config again and reload the broker after a change)."
    )] = "dynamic-security",
    plugin: Annotated[Path | None, typer.Option(
        "--plugin", help="Path of mosquitto_dynamic_security.so (default: found where Debian puts it).")] = None,
) -> None:
    """Write a Mosquitto configuration (listeners, and every device's identity: the dynamic security
    plugin's state, or a password file and an ACL) from the store."""
    from ..service.mosquitto import find_plugin, identities, write_mosquitto_config
    from ..settings import Settings

    if identities_mode not in ("dynamic-security", "password-file"):
        fail(f"--identities must be dynamic-security or password-file, not {identities_mode!r}", 2)
    if identities_mode == "dynamic-security":
        plugin = plugin or find_plugin()
        if plugin is None or not plugin.exists():
            fail(f"no Mosquitto dynamic security plugin at {plugin or 'the usual paths'}: pass --plugin PATH, or "
                 "--identities password-file; nothing was written", 2)
    settings = Settings.load(data_dir=data)
    hashes, missing, claims = identities(settings.data_dir, settings.admin_name, store, init=init)
    written = write_mosquitto_config(out, hashes, device_listener=device_listener, admin_listener=admin_listener,
                                     topic_prefix=topic_prefix, admin_name=settings.admin_name, run_as=run_as,
                                     plugin=plugin if identities_mode == "dynamic-security" else None, claims=claims)
    from ..paths import BROKER_FILE
    from ..service.auth import write_private

    write_private(settings.data_dir / BROKER_FILE, json.dumps(  # for serve's banner: where devices connect
        {"broker": "mosquitto", "device_listener": device_listener, "admin_listener": admin_listener,
         "config": str(out.resolve()), "identities": identities_mode}))
    typer.echo(f"wrote {', '.join(p.name for p in written)} to {out} ({len(hashes)} identities"
               + (f", {len(claims)} claims)" if claims and identities_mode == "dynamic-security" else ")"))
    if claims and identities_mode == "password-file":
        typer.echo(f"warning: {len(claims)} claims are not in the password file (it cannot hold their user names, "
                   "claim:ID): devices claim only with --identities dynamic-security", err=True)
    if missing:
        typer.echo(f"warning: {len(missing)} devices have no broker password yet (created before this feature): "
                   f"rotate their secrets, e.g. henge device rotate-secret {missing[0]}", err=True)


@broker_config_app.command("nats")
@user_errors
def broker_config_nats(
    out: Annotated[Path, typer.Option("--out", help="Directory for the node files, accounts.conf and reload.")],
    data: DataOpt = None,
    node: Annotated[list[str] | None, typer.Option(
        "--node", metavar="HOST[:CLIENT:CLUSTER:MQTT]", help="A node, once per node (default: three nodes on "
        "127.0.0.1); nodes on one host without ports get consecutive ones.")] = None,
    client_port: Annotated[int, typer.Option("--client-port", min=1, max=65535,
                                             help="NATS client port of the first node on a host.")] = 4222,
    cluster_port: Annotated[int, typer.Option("--cluster-port", min=1, max=65535,
                                              help="Route port of the first node on a host.")] = 6222,
    mqtt_port: Annotated[int, typer.Option("--mqtt-port", min=1, max=65535,
                                           help="MQTT port of the first node on a host.")] = 1883,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix")] = "henge",
    store: Annotated[str | None, typer.Option("--store", metavar="URL", help="Read the identities from this "
                                              "PostgreSQL store (as henge serve --store).")] = None,
    init: Annotated[bool, typer.Option("--init", help="First setup: create the store and the admin identity "
                                       "if --data holds none (otherwise that is refused).")] = False,
) -> None:
    """Write a NATS cluster's configuration (JetStream and MQTT on every node, an account with every
    device's identity and permissions, a system user for connection events) from the store."""
    from ..natsconf import EVENTS_USER, nodes
    from ..paths import BROKER_FILE, EVENTS_FILE
    from ..service.auth import admin_secret, write_private
    from ..service.mosquitto import identities
    from ..service.nats import ACCOUNTS_FILE, write_nats_config
    from ..settings import Settings

    try:
        cluster = nodes(node or ["127.0.0.1"] * 3, client_port=client_port, cluster_port=cluster_port,
                        mqtt_port=mqtt_port)
    except ValueError as exc:
        fail(f"{exc}; nothing was written", 2)
    settings = Settings.load(data_dir=data)
    hashes, missing, claims = identities(settings.data_dir, settings.admin_name, store, init=init, kind="bcrypt")
    events_secret = admin_secret(settings.data_dir, EVENTS_USER, EVENTS_FILE)
    written = write_nats_config(out, hashes, cluster=cluster, admin_name=settings.admin_name, prefix=topic_prefix,
                                events_secret=events_secret, claims=claims)
    first = cluster[0]
    events = "nats://" + ",".join(f"{n.host}:{n.client_port}" for n in cluster)
    accounts = (out / ACCOUNTS_FILE).resolve()
    write_private(settings.data_dir / BROKER_FILE, json.dumps(  # for serve's banner: where devices connect
        {"broker": "nats", "device_listener": f"{first.host}:{first.mqtt_port}",
         "admin_listener": f"{first.host}:{first.mqtt_port}", "config": str(out.resolve()), "identities": "nats"}))
    typer.echo(f"wrote {', '.join(p.name for p in written)} to {out} ({len(hashes)} identities, "
               f"{len(cluster)} nodes)")
    for n in cluster:
        typer.echo(f"  start: nats-server -c {(out / f'{n.name}.conf').resolve()}")
    typer.echo(f"  then:  henge serve --data {settings.data_dir} --broker mqtt://{first.host}:{first.mqtt_port} "
               f"--broker-events {events} --nats-accounts {accounts} --nats-reload {(out / 'reload').resolve()}")
    if missing:
        typer.echo(f"warning: {len(missing)} devices have no bcrypt password yet (created before this feature): "
                   f"rotate their secrets, e.g. henge device rotate-secret {missing[0]}", err=True)
