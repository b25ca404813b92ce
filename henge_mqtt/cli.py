"""The ``henge`` command: ``serve`` runs the service; every other command is an admin client call."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from .errors import HengeError, InvalidConfig
from .ids import parse_labels

if TYPE_CHECKING:  # the admin client (aiomqtt) is loaded by the commands that use it, not by `serve`
    from .client import Endpoint

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="henge-mqtt: versioned JSON configs for fleets of MQTT devices.",
    pretty_exceptions_enable=False,
)
def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"henge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """henge-mqtt: versioned JSON configs for fleets of MQTT devices."""


device_app = typer.Typer(no_args_is_help=True, help="Register and manage devices.")
app.add_typer(device_app, name="device")

DataOpt = Annotated[
    Path | None,
    typer.Option("--data", envvar="HENGE_DATA", help="Data dir of a local service (default ./henge-data)."),
]
BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker", envvar="HENGE_BROKER", help="mqtt[s]://host:port of the service; credentials from "
                 "HENGE_ADMIN_USER/SECRET (TLS files: HENGE_CA/CERT/KEY) or the client config file."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the service.")]
WaitTimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.1, help="Seconds to wait for the service (with --wait: for the device).")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", help="Wait until the device (with --all/--label: every device) reports the version applied "
    "(exit 0) or rejected (exit 3); exit 4 on timeout.")]

T = TypeVar("T")


def _log_level(name: str) -> int:
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
    if name.lower() not in levels:
        fail(f"--log-level must be one of {', '.join(levels)}, not {name!r}", 2)
    return levels[name.lower()]


def fail(message: str, code: int = 1) -> NoReturn:
    """One ``error:`` line per line of the message (a schema refusal has one per violation)."""
    for line in [" ".join(line.split()) for line in message.splitlines() if line.strip()] or [""]:
        typer.echo("error: " + line, err=True)
    raise typer.Exit(code)


def _endpoint(data: Path | None, broker: str | None) -> Endpoint:
    """Where the service is: --broker (or HENGE_BROKER), else --data (or HENGE_DATA), else the context
    of the client config file (HENGE_CONTEXT or its current one), else ./henge-data."""
    from .client import Endpoint, load_context

    context = None if (broker or data) else load_context(os.environ.get("HENGE_CONTEXT"))
    if broker:
        return Endpoint.from_url(broker, load_context(os.environ.get("HENGE_CONTEXT")) if os.environ.get(
            "HENGE_CONTEXT") else None)
    if context is not None and context.get("broker"):
        return Endpoint.from_url(str(context["broker"]), context)
    if data is None and context is not None and context.get("data"):
        data = Path(str(context["data"]))
    return Endpoint.from_data_dir(data or Path("henge-data"))


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells expect of a command Ctrl-C ended


def _run(coro: Coroutine[Any, Any, T], *, until_interrupted: bool = False) -> T:
    """``until_interrupted``: a command that runs until Ctrl-C (a watch, a stream), for which the
    interrupt is how it ends: no error line, still exit 130 (a script can tell it from a normal end)."""
    try:
        return asyncio.run(coro)
    except HengeError as exc:
        fail(str(exc), EXIT_TIMEOUT if exc.code == "timeout" else 1)
    except KeyboardInterrupt:
        if until_interrupted:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        fail("interrupted", EXIT_INTERRUPTED)


def _call(data: Path | None, broker: str | None, timeout: float, op: str, **args: Any) -> Any:
    return _call_then_wait(data, broker, timeout, op, None, **args)[0]


def _call_then_wait(
    data: Path | None, broker: str | None, timeout: float, op: str, wait: float | None, **args: Any
) -> tuple[Any, Any]:
    """Run ``op``; with ``wait``, then wait (that long) for the device to report the new version."""

    async def go() -> tuple[Any, Any]:
        from .client import AdminClient

        async with AdminClient(_endpoint(data, broker), timeout=10.0 if wait else timeout) as client:
            result = await client.call(op, **args)
            if wait is None:
                return result, None
            outcome = await client.call("wait", wait=wait, device=result["device"], version=result["version"],
                                        timeout=wait)
            return result, outcome

    return _run(go())


EXIT_REJECTED = 3
EXIT_TIMEOUT = 4


def _report_outcome(result: dict[str, Any], outcome: dict[str, Any] | None, as_json: bool, line: str) -> None:
    if outcome is None:
        _emit(result, as_json, lambda _: line)
        return
    if as_json:
        typer.echo(json.dumps(result | {"report": outcome}, indent=2, sort_keys=True))
    if outcome["status"] == "rejected":
        fail(f"{result['device']} rejected version {result['version']}: {outcome['error'] or 'no reason given'}",
             EXIT_REJECTED)
    if not as_json:
        typer.echo(f"{line}; applied by the device")


def _emit(value: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True) if as_json else human(value))


def _device_id(value: str, what: str = "ID") -> str:
    """A device id given where one is optional: empty is a mistake (it would mean "every device")."""
    if not value.strip():
        fail(f"{what} is empty: give a device id, or leave it out for every device", 2)
    return value


def _labels(pairs: list[str] | None) -> dict[str, str]:
    try:
        return parse_labels(pairs or [])
    except ValueError as exc:
        fail(str(exc))


def _read_json_document(source: str) -> dict[str, Any]:
    return _read_config(source, what="schema")


def _read_config(source: str, what: str = "config") -> dict[str, Any]:
    """Read a config from a file or ``-`` (stdin); refuse anything but a JSON object."""
    where = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {where}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        fail(f"{where} is not UTF-8 text")
    from .ids import StrictJSONError, strict_json

    try:
        value = strict_json(text)
    except json.JSONDecodeError as exc:
        raise InvalidConfig(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except StrictJSONError as exc:
        raise InvalidConfig(f"{where} is not strict JSON: {exc}; nothing was stored") from exc
    if not isinstance(value, dict):
        raise InvalidConfig(f"{where}: a {what} must be a JSON object, not {type(value).__name__}")
    return value


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def user_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """One line on stderr and a non-zero exit for every error of ours: never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except HengeError as exc:
            fail(str(exc))

    return wrapper


# ---- serve -------------------------------------------------------------------------------------


@app.command()
@user_errors
def serve(
    data: DataOpt = None,
    config: Annotated[Path | None, typer.Option("--config", help="Broker YAML file (see broker_config/).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Listener address (overrides the config).")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="Listener port; 0 picks one.")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535, help="Serve Prometheus metrics on this port (off by default).")] = None,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="Address for --metrics-port.")] = "127.0.0.1",
    external: Annotated[str | None, typer.Option(
        "--broker", help="mqtt[s]://host:port of an existing broker's admin listener: run without the embedded "
        "broker (see docs/scaling.md).")] = None,
    broker_ca: Annotated[Path | None, typer.Option("--broker-ca", help="CA file for mqtts://.")] = None,
    broker_cert: Annotated[Path | None, typer.Option("--broker-cert", help="Client certificate for mqtts://.")] = None,
    broker_key: Annotated[Path | None, typer.Option("--broker-key", help="Client key for mqtts://.")] = None,
    http: Annotated[str | None, typer.Option(
        "--http", metavar="HOST:PORT", envvar="HENGE_HTTP", help="Serve the HTTP API and console here (default "
        "127.0.0.1:8080, or henge.http in --config; port 0 picks a free one).")] = None,
    no_http: Annotated[bool, typer.Option("--no-http", help="No HTTP API or console.")] = False,
    store: Annotated[str | None, typer.Option("--store", metavar="URL", help="postgresql://user@host/db: keep the "
                                              "store in PostgreSQL (default: SQLite in the data dir).")] = None,
) -> None:
    """Run the service (with its embedded broker, or against --broker) until SIGINT/SIGTERM."""
    from .service import HengeService
    from .settings import Settings

    logging.basicConfig(
        level=_log_level(log_level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    os.umask(0o077)  # the store, its WAL and every file henge writes: for the service's user only
    settings = Settings.load(config, data_dir=data, host=host, port=port)
    if external:
        if host is not None or port is not None:
            fail("--host/--port configure the embedded broker; with --broker there is none", 2)
        from .external import parse_broker_url

        parse_broker_url(external)
        settings = settings.model_copy(update={"external_broker": external, "external_ca": broker_ca,
                                               "external_cert": broker_cert, "external_key": broker_key})
    if store is not None:
        if not store.startswith(("postgresql://", "postgres://")):
            fail(f"--store wants a postgresql:// URL, not {store.split('://')[0]!r}", 2)
        settings = settings.model_copy(update={"store": store})
    if no_http and http and http != os.environ.get("HENGE_HTTP"):  # (HENGE_HTTP is a default --no-http overrides)
        fail("--http and --no-http contradict each other", 2)
    if no_http or http:
        settings = settings.model_copy(update={"http": None if no_http else http})
    http_address = None
    if settings.http:
        from .http import parse_address

        http_address = parse_address(settings.http)
    _raise_file_limit()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.set_exception_handler(_quiet_loop_errors())
        service = HengeService(settings)
        _LAST_SERVICE[:] = [service]
        # A standby (a PostgreSQL store another instance holds) waits in start(): a signal must end that too.
        starting = asyncio.create_task(service.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        stopping.cancel()
        starting.result()
        fenced = asyncio.create_task(service.fenced.wait())
        fenced.add_done_callback(lambda _: stop.set())
        async with service, contextlib.AsyncExitStack() as stack:
            bound_host, bound_port = service.address
            web = None
            if http_address is not None:
                from .http import HttpServer
                from .http.tokens import first_run_token

                token_file = await first_run_token(service)  # before the port opens: a client finds it there
                web = await stack.enter_async_context(HttpServer(
                    service, *http_address, certfile=settings.http_certfile, keyfile=settings.http_keyfile))
                typer.echo(f"henge: console on {web.url}" + (
                    f" (first-run admin token in {token_file})" if token_file else ""), err=True)
            metrics = None
            if metrics_port is not None:
                from .metrics import MetricsServer

                metrics = MetricsServer(service, metrics_host, metrics_port)
                typer.echo(f"henge: metrics on http://{metrics_host}:{metrics.port}/metrics", err=True)
            # Start-up objects live as long as the process: keep the collector from rescanning them,
            # and collect less often (a fleet of connections is many long-lived objects).
            gc.freeze()
            # The store's thread and the loop share the GIL: a loop thread that gives it up for every
            # send() must not wait the default 5 ms each time to get it back (the convoy effect).
            sys.setswitchinterval(0.0005)
            gc.set_threshold(50_000, 20, 100)
            if settings.external_broker:
                typer.echo(f"henge: serving through the broker at {settings.external_broker} (its admin listener; "
                           f"data: {settings.data_dir}); {_device_listener(settings.data_dir)}", err=True)
            else:
                typer.echo(f"henge: serving on mqtt://{bound_host}:{bound_port} (devices and admin; data: "
                           f"{settings.data_dir})", err=True)
            await stop.wait()
            typer.echo("henge: shutting down", err=True)
            gc.disable()  # tearing down 10,000 connections makes garbage a collection would only rescan
            if metrics is not None:
                metrics.close()
            # The HTTP server's own shutdown waits on timers; it runs while the broker closes its
            # connections, not after (the later exits then have nothing left to do).
            await asyncio.gather(*([web.stop()] if web is not None else []), service.stop())

    fenced: list[bool] = []

    async def run() -> None:
        await main()
        if _LAST_SERVICE and _LAST_SERVICE[0].fenced.is_set():
            fenced.append(True)

    try:
        asyncio.run(run())
    except OSError as exc:
        fail(f"cannot start the service: {exc.strerror or exc}")
    if fenced:
        typer.echo("error: another instance took the store's lease; this one stopped (see the log)", err=True)
        logging.shutdown()
        os._exit(1)
    # Everything is flushed and closed; skip the interpreter's object-by-object teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


_LAST_SERVICE: list[Any] = []  # the service `serve` ran, for its exit code


def _device_listener(data_dir: Path) -> str:
    """Where devices connect in external mode: the broker's device listener, as broker-config wrote it."""
    from .paths import BROKER_FILE

    try:
        known = json.loads((data_dir / BROKER_FILE).read_text())
        return f"devices connect to the broker at mqtt://{known['device_listener']} (from broker-config)"
    except (OSError, ValueError, KeyError, TypeError):
        return "devices connect to the broker's own device listener (see its configuration)"


def _raise_file_limit() -> None:
    """Every device is a socket: lift the soft open-file limit to the hard one, and say so."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger(__name__).warning("serve.file_limit_unchanged error=%s", exc)
    now_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    logging.getLogger(__name__).info("serve.file_limit soft=%d (was %d) hard=%d", now_soft, soft, hard)


def _quiet_loop_errors() -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """asyncio logs a traceback per failed accept() (e.g. out of file descriptors): at most a line a second."""
    from .server.limits import LogLimiter

    limiter = LogLimiter(logging.getLogger("henge_mqtt.loop"), rate=1.0)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        limiter.log(logging.ERROR, "loop.error", "%s %s", context.get("message", ""), repr(exc) if exc else "")

    return handler


# ---- devices -----------------------------------------------------------------------------------


@device_app.command("add")
def device_add(
    device: str,
    label: Annotated[list[str] | None, typer.Option("--label", help="k=v, repeatable.")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Register a device and print its secret (shown only this once)."""
    result = _call(data, broker, timeout, "device.add", device=device, labels=_labels(label))
    _emit(result, as_json, lambda r: f"device {r['device']} added\nsecret: {r['secret']}\n"
          "(store it now: it is not shown again)")


@device_app.command("list")
def device_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                timeout: TimeoutOpt = 10.0) -> None:
    """List devices with their labels and current version."""
    rows = _call(data, broker, timeout, "device.list")
    now = datetime.now(UTC)
    people = [{"id": r["id"], "version": r["desired_version"], "created": age(r["created_at"], now) + " ago",
               "labels": ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or None} for r in rows]
    _emit(rows, as_json, lambda _: _table(people, ["id", "version", "created", "labels"]))


@device_app.command("show")
def device_show(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                timeout: TimeoutOpt = 10.0) -> None:
    """Show one device."""
    result = _call(data, broker, timeout, "device.show", device=device)
    _emit(result, as_json, _device_block)


def _session_text(session: dict[str, Any] | None) -> str:
    """``persistent (expires ...)``: a session kept for a device that asked for one; else ``clean``."""
    if not session:
        return "clean"
    if session["expires_at"] is None:
        return f"persistent (connected; kept {session['expiry']} s after it disconnects)"
    return f"persistent (expires {session['expires_at']}, in {age_until(session['expires_at'])})"


def age_until(stamp: str) -> str:
    """How long until ``stamp``: ``45s``, ``12m``, ``3h``, ``2d``."""
    return _span((datetime.fromisoformat(stamp.replace("Z", "+00:00")) - datetime.now(UTC)).total_seconds())


def _device_block(r: dict[str, Any]) -> str:
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
        ("session", _session_text(st.get("session"))),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)


@device_app.command("remove")
def device_remove(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 10.0) -> None:
    """Remove a device, its history and its retained topics; its connection is closed."""
    result = _call(data, broker, timeout, "device.remove", device=device)
    _emit(result, as_json, lambda r: f"device {r['device']} removed")


@device_app.command("rotate-secret")
def device_rotate(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 10.0) -> None:
    """Give a device a new secret (the old one stops working for new connections)."""
    result = _call(data, broker, timeout, "device.rotate_secret", device=device)
    _emit(result, as_json, lambda r: f"new secret for {r['device']}: {r['secret']}")


@device_app.command("import")
def device_import(
    source: Annotated[Path, typer.Argument(metavar="FILE", help="CSV (id column + one column per label) "
                                           "or JSON lines ({\"id\", \"labels\"}).")],
    secrets_out: Annotated[Path, typer.Option("--secrets-out", help="Where to write id,secret (mode 0600).")]
    = Path("henge-secrets.csv"),
    update: Annotated[bool, typer.Option("--update", help="Existing devices get the labels in FILE (secrets "
                                         "kept) instead of refusing the import.")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    """Create many devices in one transaction; their secrets go to a 0600 file, never to the screen."""
    from .bulk import read_devices, write_secrets

    devices = read_devices(source)
    if secrets_out.exists():
        fail(f"{secrets_out} already exists: choose another --secrets-out (secrets are never overwritten)")
    result = _call(data, broker, timeout, "device.import", devices=[{"id": d, "labels": lb} for d, lb in devices],
                   update=update)
    if result["secrets"]:
        write_secrets(secrets_out, result["secrets"])
    summary = {"imported": len(result["secrets"]), "updated": result.get("updated", 0),
               "secrets_file": str(secrets_out) if result["secrets"] else None}
    _emit(summary, as_json, lambda r: f"imported {r['imported']} devices, updated {r['updated']}"
          + (f"; secrets in {r['secrets_file']} (mode 0600)" if r["secrets_file"] else ""))


@device_app.command("label")
def device_label(
    device: str,
    changes: Annotated[list[str], typer.Argument(metavar="k=v|k-", help="Set k=v, or remove k with k-.")],
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Set and remove a device's labels (kubectl style: site=berlin tier-)."""
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for change in changes:
        if "=" in change:
            to_set.update(_labels([change]))
        elif change.endswith("-") and len(change) > 1:
            to_remove.append(change[:-1])
        else:
            fail(f"invalid label change {change!r}: use key=value to set or key- to remove", 2)
    result = _call(data, broker, timeout, "device.label", device=device, set=to_set, remove=to_remove)
    _emit(result, as_json, lambda r: f"{r['device']}: " + (",".join(f"{k}={v}" for k, v in
                                                                   sorted(r["labels"].items())) or "no labels"))


@device_app.command("export")
def device_export(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 60.0) -> None:
    """Print every device with its labels (CSV, or JSON lines with --json), ready for import."""
    from .bulk import devices_csv

    rows = _call(data, broker, timeout, "device.export")
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, sort_keys=True))
    else:
        typer.echo(devices_csv(rows), nl=False)


# ---- configs -----------------------------------------------------------------------------------


@app.command()
@user_errors
def push(
    target: Annotated[str | None, typer.Argument(metavar="ID", help="The device (omit with --all/--label).")]
    = None,
    source: Annotated[str | None, typer.Argument(metavar="FILE|-", help="JSON file, or - for stdin.")] = None,
    all_devices: Annotated[bool, typer.Option("--all", help="Push to every device.")] = False,
    label: Annotated[list[str] | None, typer.Option("--label", help="Push to devices with label k=v.")] = None,
    if_version: Annotated[int | None, typer.Option("--if-version", min=0,
                                                   help="Fail unless the current version is N.")] = None,
    message: Annotated[str, typer.Option("-m", "--message", help="Why this change.")] = "",
    force: Annotated[bool, typer.Option("--force", help="A new version even if the content is unchanged.")]
    = False,
    patch: Annotated[bool, typer.Option("--patch", help="FILE is an RFC 7396 merge patch of the current "
                                        "config (null removes a key).")] = False,
    wait: WaitOpt = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: WaitTimeoutOpt = 10.0,
) -> None:
    """Store a new config version for a device (or many) and publish it; unchanged content stores nothing."""
    if target is None:
        fail("missing FILE: henge push --all FILE or --label k=v FILE" if all_devices or label else
             "missing ID and FILE: henge push ID FILE|- (or henge push --all FILE)", 2)
    if all_devices or label:
        if source is not None:
            fail("with --all or --label give only the FILE, no device id", 2)
        if if_version is not None or patch:
            fail("--if-version and --patch apply to a single device", 2)
        _push_many(_read_config(target), all_devices, _labels(label), message, data, broker, as_json, timeout,
                   force, wait)
        return
    if source is None:
        fail("missing FILE: henge push ID FILE|-", 2)
    device = target
    document = _read_config(source)
    args: dict[str, Any] = {"device": device, "patch" if patch else "config": document, "message": message,
                            "force": force}
    if if_version is not None:
        args["if_version"] = if_version
    result, outcome = _call_then_wait(data, broker, timeout, "push", timeout if wait else None, **args)
    if result.get("unchanged"):
        line = f"{result['device']}: unchanged, still version {result['version']} (--force stores it again)"
    else:
        line = f"{result['device']}: version {result['version']} ({result['sha256'][:12]})"
    _report_outcome(result, outcome, as_json, line)


def _push_many(config: dict[str, Any], all_devices: bool, labels: dict[str, str], message: str,
               data: Path | None, broker: str | None, as_json: bool, timeout: float, force: bool,
               wait: bool) -> None:
    show = sys.stderr.isatty() and not as_json

    def progress(state: dict[str, Any]) -> None:
        if not show:
            return
        if "applied" in state:
            done, total = state["applied"] + state["rejected"], state["devices"]
            what = (f"devices reported ({state['rejected']} rejected)" if wait else
                    f"delivered {state['delivered']}" if state.get("delivered") is not None else "published")
            if not wait and state.get("delivered") is not None:
                done, total, what = state["delivered"], state["online"], "online devices acknowledged"
        else:  # still storing and publishing, chunk by chunk
            done, total, what = state.get("stored", 0), state.get("of", 0), "devices stored and published"
        width = 30
        filled = width * done // total if total else width
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what}   ")
        sys.stderr.flush()

    async def go() -> Any:
        from .client import AdminClient

        async with AdminClient(_endpoint(data, broker), timeout=timeout) as client:
            args: dict[str, Any] = {"all": all_devices, "labels": labels, "config": config, "message": message,
                                    "delivery_timeout": min(timeout, 30.0), "force": force}
            if wait:
                args["report_timeout"] = timeout
            return await client.call("push_many", wait=timeout + min(timeout, 30.0) + 10, progress=progress, **args)

    result = _run(go())
    if show:
        sys.stderr.write("\n")
    if as_json:
        _emit(result, True, str)
    else:
        typer.echo(fleet_lines(result, wait))
    if wait and result["rejected"]:
        fail(fleet_failure(result), EXIT_REJECTED)
    if wait and result["pending"]:
        fail(fleet_failure(result), EXIT_TIMEOUT)


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


@app.command()
def get(
    device: str,
    version: Annotated[int | None, typer.Option("--version", min=1, help="Default: the current one.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Per key, the layer that set it.")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Print a config version (the config itself; --json for the whole record)."""
    args: dict[str, Any] = {"device": device}
    if version is not None:
        args["version"] = version
    if explain:
        leaves = _call(data, broker, timeout, "explain", **args)
        people = [{"key": leaf["pointer"] or "/", "value": json.dumps(leaf["value"]), "layer": leaf["layer"]}
                  for leaf in leaves]
        _emit(leaves, as_json, lambda _: _table(people, ["key", "value", "layer"]) if people else "(empty config)")
        return
    result = _call(data, broker, timeout, "get", **args)
    _emit(result, as_json, lambda r: json.dumps(r["config"], indent=2, sort_keys=True))


@app.command()
def history(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
            timeout: TimeoutOpt = 10.0) -> None:
    """List every version of a device's config, each with the device's report of it."""
    rows = _call(data, broker, timeout, "history", device=device)
    people = []
    for row in rows:
        report = row.get("report")
        said = None if not report else "applied" if report["status"] == "applied" else (
            "rejected: " + (" ".join((report["error"] or "").split()) or "no reason given"))
        people.append(row | {"sha": row["sha256"][:12], "report": said})
    _emit(rows, as_json, lambda _: _table(people, ["version", "created_at", "actor", "sha", "report", "message"]))


@app.command()
def diff(device: str, a: int, b: int, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
         timeout: TimeoutOpt = 10.0) -> None:
    """Show what changed between two versions; exit 1 when they differ, like diff(1)."""
    result = _call(data, broker, timeout, "diff", device=device, a=a, b=b)
    color = _color()

    def paint(line: str) -> str:
        if not color or line.startswith(("+++", "---")):
            return line
        fg = "green" if line.startswith("+") else "red" if line.startswith("-") else "cyan" if line.startswith(
            "@@") else None
        return typer.style(line, fg=fg) if fg else line

    _emit(result, as_json, lambda r: "\n".join(paint(line) for line in r["diff"].splitlines()) or "(no differences)")
    if not result["same"]:
        raise typer.Exit(1)


@app.command()
def rollback(
    device: str, version: int,
    message: Annotated[str, typer.Option("-m", "--message")] = "",
    wait: WaitOpt = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: WaitTimeoutOpt = 10.0,
) -> None:
    """Publish an old version's content again, as a new version (history is never rewritten)."""
    result, outcome = _call_then_wait(data, broker, timeout, "rollback", timeout if wait else None,
                                      device=device, version=version, message=message)
    _report_outcome(result, outcome, as_json,
                    f"{result['device']}: version {result['version']} (content of version {version})")


# ---- sessions ----------------------------------------------------------------------------------


class Output(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


@app.command()
def status(
    device: Annotated[str | None, typer.Argument(metavar="[ID]")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Only devices with label k=v (repeatable).")]
    = None,
    state: Annotated[str | None, typer.Option("--state", help="Only devices online, offline or quarantined.")]
    = None,
    sync: Annotated[str | None, typer.Option("--sync", help="Only devices in_sync, pending, rejected, unknown or "
                                                            "invalid.")]
    = None,
    conflict: Annotated[bool, typer.Option("--conflict", help="Only devices with an identity conflict.")] = False,
    summary: Annotated[bool, typer.Option("--summary", help="Only the fleet summary.")] = False,
    output: Annotated[Output, typer.Option("-o", "--output", help="table (fits 100 columns), wide, json, yaml.")]
    = Output.table,
    watch: Annotated[float | None, typer.Option("--watch", min=0.5, help="Redraw every S seconds until Ctrl-C.")]
    = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Devices with their connection state, versions and sync; a fleet summary line at the end."""
    if state not in (None, "online", "offline", "quarantined"):
        fail(f"--state must be online, offline or quarantined, not {state!r}", 2)
    if sync not in (None, "in_sync", "pending", "rejected", "unknown", "invalid"):
        fail(f"--sync must be in_sync, pending, rejected, unknown or invalid, not {sync!r}", 2)
    args: dict[str, Any] = {"labels": _labels(label), "state": state, "sync": sync}
    if conflict:
        args["conflict"] = True
    if device is not None:
        args["device"] = _device_id(device)
    fmt = Output.json if as_json else output

    def render(rows: list[dict[str, Any]]) -> str:
        counts = fleet_summary(rows)
        if summary:
            return _dump(counts, fmt) if fmt in (Output.json, Output.yaml) else " ".join(
                f"{k}={v}" for k, v in counts.items())
        if fmt in (Output.json, Output.yaml):
            return _dump(rows, fmt)
        text = (_status_table(rows, wide=fmt == Output.wide, color=_color())
                + "\n" + " ".join(f"{k}={v}" for k, v in counts.items()))
        if device is not None and rows and rows[0].get("session"):  # one device: its MQTT session too
            text += "\nsession: " + _session_text(rows[0]["session"])
        return text

    if watch is None:
        typer.echo(render(_call(data, broker, timeout, "status", **args)))
        return

    async def follow() -> None:
        from .client import AdminClient

        async with AdminClient(_endpoint(data, broker), timeout=timeout) as client:
            while True:
                text = render(await client.call("status", **args))
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place, like watch(1)
                stamp = datetime.now(UTC).strftime("%H:%M:%S")
                typer.echo(f"every {watch:g} s, {stamp} UTC (Ctrl-C to stop)\n{text}")
                await asyncio.sleep(watch)

    _run(follow(), until_interrupted=True)


def _color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _dump(value: Any, fmt: Output) -> str:
    if fmt == Output.yaml:
        import yaml

        return str(yaml.safe_dump(value, sort_keys=False, allow_unicode=True)).rstrip()
    return json.dumps(value, indent=2, sort_keys=True)


def age(stamp: str | None, now: datetime | None = None) -> str:
    """``2026-11-29T10:00:00Z`` as a person reads it next to now: ``45s``, ``12m``, ``3h``, ``2d``."""
    if not stamp:
        return "-"
    return _span(((now or datetime.now(UTC)) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds())


def _span(seconds: float) -> str:
    """A length of time in its largest whole unit: ``45s``, ``12m``, ``3h``, ``2d`` (never negative)."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


_STATE_COLOR = {"online": "green", "offline": "bright_black", "quarantined": "red"}
_SYNC_COLOR = {"in_sync": "green", "pending": "yellow", "rejected": "red", "unknown": "bright_black",
               "invalid": "red"}


def _status_table(rows: list[dict[str, Any]], *, wide: bool, color: bool) -> str:
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
                padded = typer.style(padded, fg=_STATE_COLOR.get(t[c].split()[0]))
            elif color and c == "SYNC":
                padded = typer.style(padded, fg=_SYNC_COLOR.get(t[c]))
            line.append(padded)
        lines.append("  ".join(line).rstrip())
    if any(r["conflict"] for r in rows):
        lines.append("! identity conflict: two clients share the id (henge status -o wide shows where from)")
    return "\n".join(lines)


def fleet_summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"devices": len(rows), "online": 0, "offline": 0, "in_sync": 0, "pending": 0, "rejected": 0,
              "unknown": 0, "invalid": 0, "conflict": 0}
    for row in rows:
        counts["online" if row["online"] else "offline"] += 1
        counts[row["sync"]] += 1
        counts["conflict"] += bool(row["conflict"])
    return counts


@app.command()
def kick(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
         timeout: TimeoutOpt = 10.0) -> None:
    """Close a device's current connection."""
    result = _call(data, broker, timeout, "kick", device=device)
    if result.get("supported") is False:
        if as_json:
            _emit(result, as_json, str)
        fail(f"{device}: not kicked: {result.get('detail') or 'not supported by this broker'}")
    _emit(result, as_json, lambda r: f"{r['device']}: {'kicked' if r['kicked'] else 'was not connected'}")


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
    from .migrate import migrate_store

    counts = migrate_store(source, target)
    _emit(counts, as_json, lambda c: "moved " + ", ".join(f"{n} {table}" for table, n in c.items() if n))


@app.command()
@user_errors
def backup(
    target: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write the copy (mode 0600).")],
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    """A consistent copy of the store: from the running service (online), or from a stopped data dir."""
    from .backup import backup_stopped

    data_dir = data or Path("henge-data")
    copied = None if broker else backup_stopped(data_dir, target.resolve())  # None: a service holds the data dir
    if copied is None:
        result = _call(data, broker, timeout, "backup", path=str(target.resolve()))
    else:
        result = {"path": str(target.resolve()), "bytes": copied}
    _emit(result, as_json, lambda r: f"backup written to {r['path']} ({r['bytes']} bytes)")


@app.command()
@user_errors
def restore(
    source: Annotated[Path, typer.Argument(metavar="FILE", help="A file made by henge backup.")],
    data: DataOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the data dir's store.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Put a backup in place as a (stopped) data dir's store; the next henge serve republishes it."""
    from .backup import restore as put_back

    data_dir = data or Path("henge-data")
    devices = put_back(source, data_dir, force=force)
    _emit({"data": str(data_dir), "devices": devices}, as_json,
          lambda r: f"restored {r['devices']} devices into {r['data']}; start henge serve --data {r['data']}")


@app.command("clear-conflict")
def clear_conflict(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                   timeout: TimeoutOpt = 10.0) -> None:
    """Clear a device's identity-conflict flag and any quarantine."""
    result = _call(data, broker, timeout, "clear_conflict", device=device)
    _emit(result, as_json, lambda r: f"{r['device']}: {'cleared' if r['cleared'] else 'no conflict'}")


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow/--no-follow", "-f", help="Reconnect (with backoff) when the "
                                         "service restarts; --no-follow ends, exit 1, when the connection does.")]
    = True,
    device: Annotated[str | None, typer.Option("--device", help="Only this device's events.")] = None,
    kind: Annotated[list[str] | None, typer.Option("--type", help="Only events of this type (repeatable).")]
    = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Stream service events as they happen until Ctrl-C (exit 130); reconnects when the service restarts."""
    from .backoff import Backoff
    from .errors import ServiceUnavailable

    kinds = set(kind or [])

    async def go() -> None:
        from .client import AdminClient

        backoff = Backoff(base=0.5, cap=10.0)
        while True:
            try:
                async with AdminClient(_endpoint(data, broker), timeout=timeout) as client:
                    backoff.reset()
                    async for event in client.events():
                        if (device and event.device != device) or (kinds and event.type not in kinds):
                            continue
                        if as_json:
                            typer.echo(event.model_dump_json())
                        else:
                            extra = " ".join(f"{k}={v}" for k, v in event.data.items() if v is not None)
                            typer.echo(f"{event.at} {event.type} {event.device or '-'} {extra}".rstrip())
            except ServiceUnavailable as exc:
                if not follow:
                    raise
                delay = backoff.next_delay()
                sys.stderr.write(f"henge: {exc}; reconnecting in {delay:.1f} s\n")
                await asyncio.sleep(delay)

    _run(go(), until_interrupted=True)


@app.command()
def audit(
    device: Annotated[str | None, typer.Option("--device", help="Only this device's entries.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="The newest N entries.")] = 100,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Who did what, when: every admin action, oldest first (secrets never appear)."""
    args: dict[str, Any] = {"limit": limit}
    if device is not None:
        args["device"] = _device_id(device, "--device")
    rows = _call(data, broker, timeout, "audit", **args)
    for row in rows:
        row["details"] = " ".join(f"{k}={v}" for k, v in sorted(row["summary"].items()))
    _emit(rows, as_json, lambda r: _table(r, ["at", "actor", "action", "device", "details"]))


rollout_app = typer.Typer(no_args_is_help=True, help="Staged rollouts that halt (and revert) on rejections "
                          "(docs/rollouts.md).")
app.add_typer(rollout_app, name="rollout")
RolloutArg = Annotated[str, typer.Argument(metavar="ID", help="The rollout's id (r-xxxxxxxx).")]


@rollout_app.command("start")
def rollout_start(
    source: Annotated[str, typer.Argument(metavar="FILE|-", help="The config every target gets as its own layer.")],
    all_devices: Annotated[bool, typer.Option("--all", help="Every device.")] = False,
    label: Annotated[list[str] | None, typer.Option("--label", help="Devices with label k=v (repeatable).")] = None,
    waves: Annotated[str | None, typer.Option("--waves", help="Cumulative percentages, e.g. 1,10,50,100 "
                                              "(the default).")] = None,
    wave_size: Annotated[int | None, typer.Option("--wave-size", min=1, help="N devices per wave instead.")] = None,
    max_rejected: Annotated[str, typer.Option("--max-rejected", help="Halt when a wave has more rejections: N "
                                              "devices or P% of the wave.")] = "1",
    min_applied: Annotated[str, typer.Option("--min-applied", help="Percent (90 or 90%) of the wave's devices "
                                             "online at its start that must apply to go on.")] = "90",
    wave_timeout: Annotated[float, typer.Option("--wave-timeout", min=0.1, help="Seconds a wave may take to "
                                                "reach --min-applied; then it halts.")] = 300.0,
    pause: Annotated[float, typer.Option("--pause", min=0, help="Seconds between waves.")] = 0.0,
    layer: Annotated[str | None, typer.Option("--layer", help="Stage a change of this layer instead: FILE is its "
                                              "new content; the targets are the devices it alters.")] = None,
    layer_label: Annotated[list[str] | None, typer.Option("--layer-label", help="With --layer: the layer's labels "
                                                          "(k=v, repeatable; default: unchanged).")] = None,
    priority: Annotated[int | None, typer.Option("--priority", min=-1000, max=1000, help="With --layer: its "
                                                 "priority (default: unchanged, or 0).")] = None,
    message: Annotated[str, typer.Option("-m", "--message", help="Why this change.")] = "",
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    """Start a staged rollout: wave by wave, on while devices apply, halting and reverting on rejections."""
    if layer is not None and (all_devices or label):
        fail("with --layer the targets are the devices the layer change alters: no --all or --label", 2)
    if layer is None and not all_devices and not label:
        fail("select the devices with --all or --label k=v (or stage a --layer change)", 2)
    if layer is None and (layer_label or priority is not None):
        fail("--layer-label and --priority go with --layer", 2)
    if waves is not None and wave_size is not None:
        fail("give --waves or --wave-size, not both", 2)
    try:
        applied_percent = float(min_applied.removesuffix("%"))
    except ValueError:
        fail(f"--min-applied wants a percentage like 90 or 90%, not {min_applied!r}", 2)
    if not 0 <= applied_percent <= 100:
        fail(f"--min-applied is a percentage between 0 and 100, not {min_applied!r}", 2)
    document = _read_config(source, what="layer" if layer else "config")
    args: dict[str, Any] = {"all": all_devices, "labels": _labels(label), "max_rejected": max_rejected,
                            "min_applied": applied_percent, "wave_timeout": wave_timeout, "pause": pause,
                            "message": message}
    if layer is None:
        args["config"] = document
    else:
        args["layer"] = {"name": layer, "content": document, "labels": _labels(layer_label) if layer_label else None,
                         "priority": priority}
    if wave_size is not None:
        args["wave_size"] = wave_size
    else:
        try:
            args["waves"] = [float(w) for w in (waves or "1,10,50,100").split(",")]
        except ValueError:
            fail(f"--waves wants percentages like 1,10,50,100, not {waves!r}", 2)
    result = _call(data, broker, timeout, "rollout.start", **args)
    _emit(result, as_json, lambda r: f"rollout {r['id']} started: {r['devices']} devices in "
          f"{len(r['waves'])} waves ({', '.join(str(w['targeted']) for w in r['waves'])})\n"
          f"follow it: henge rollout status {r['id']} --watch 2")


def rollout_lines(r: dict[str, Any]) -> str:
    lines = [f"rollout {r['id']}: {r['state']}" + (f" ({r['reason']})" if r["reason"] else "")
             + (f", wave {r['wave']} of {len(r['waves'])}" if r["state"] in ("running", "paused") else "")]
    people = [{"wave": w["wave"], "targeted": w["targeted"], "online": w["online"] if w["published"] else "-",
               "delivered": "-" if w["delivered"] is None or not w["published"] else w["delivered"],
               "applied": w["applied"], "rejected": w["rejected"], "offline": w["offline"], "pending": w["pending"],
               "reverted": w["reverted"]} for w in r["waves"]]
    lines.append(_table(people, ["wave", "targeted", "online", "delivered", "applied", "rejected", "offline",
                                 "pending", "reverted"]))
    for w in r["waves"]:
        for error, count in w["errors"].items():
            lines.append(f"wave {w['wave']}: rejected by {count}: {error}")
    for note in r["kept"]:
        lines.append(f"not reverted: {note}")
    return "\n".join(lines)


@rollout_app.command("status")
def rollout_status(
    rollout: RolloutArg,
    watch: Annotated[float | None, typer.Option("--watch", min=0.2, help="Redraw every S seconds until it "
                                                "ends (or Ctrl-C).")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Per wave: targeted, online, delivered, applied, rejected, offline, pending, reverted; errors by message."""
    import time as _time

    try:
        while True:
            result = _call(data, broker, timeout, "rollout.status", rollout=rollout)
            if watch is not None and not as_json and sys.stdout.isatty():
                typer.echo("\x1b[H\x1b[2J", nl=False)
            _emit(result, as_json, rollout_lines)
            if watch is None or result["state"] not in ("running", "paused", "reverting"):
                return
            _time.sleep(watch)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


@rollout_app.command("list")
def rollout_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                 timeout: TimeoutOpt = 10.0) -> None:
    """Every rollout, oldest first."""
    rows = _call(data, broker, timeout, "rollout.list")
    people = [{"id": r["id"], "state": r["state"], "wave": f"{r['wave']}/{r['waves']}", "started": r["created_at"],
               "by": r["actor"], "reason": r["reason"]} for r in rows]
    _emit(rows, as_json, lambda _: _table(people, ["id", "state", "wave", "started", "by", "reason"])
          if rows else "no rollouts")


@rollout_app.command("pause")
def rollout_pause(rollout: RolloutArg, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 10.0) -> None:
    """Stop before the next step (a wave already out stays out)."""
    _emit(_call(data, broker, timeout, "rollout.pause", rollout=rollout), as_json, rollout_lines)


@rollout_app.command("resume")
def rollout_resume(rollout: RolloutArg, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                   timeout: TimeoutOpt = 10.0) -> None:
    """Go on with a paused rollout."""
    _emit(_call(data, broker, timeout, "rollout.resume", rollout=rollout), as_json, rollout_lines)


@rollout_app.command("abort")
def rollout_abort(
    rollout: RolloutArg,
    revert: Annotated[bool, typer.Option("--revert", help="Put every device it changed back on its previous "
                                         "config (as a new version).")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    """Stop a rollout for good; with --revert, undo what it changed."""
    _emit(_call(data, broker, timeout, "rollout.abort", rollout=rollout, revert=revert), as_json, rollout_lines)


layer_app = typer.Typer(no_args_is_help=True, help="Config layers: the fleet's, and per label (docs/rollouts.md).")
app.add_typer(layer_app, name="layer")
LayerArg = Annotated[str, typer.Argument(metavar="NAME", help="fleet, or a label layer's name.")]


@layer_app.command("set")
def layer_set(
    name: LayerArg,
    source: Annotated[str, typer.Argument(metavar="FILE|-", help="The layer: a JSON object merged (RFC 7396) "
                                          "over the layers below it.")],
    label: Annotated[list[str] | None, typer.Option("--label", help="k=v, repeatable: the devices it applies to "
                                                    "(a new label layer needs at least one; default: unchanged).")]
    = None,
    priority: Annotated[int | None, typer.Option("--priority", min=-1000, max=1000, help="Label layers merge "
                                                 "lowest first (then by name); default 0 or unchanged.")] = None,
    message: Annotated[str, typer.Option("-m", "--message", help="Why this change.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Store it even if a device added later (no config of "
                                        "its own) would get a config its schemas refuse; says which.")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    """Set a layer; every device whose config changes gets a new version, in one transaction."""
    args: dict[str, Any] = {"name": name, "content": _read_config(source, what="layer"), "message": message,
                            "force": force}
    if label:
        args["labels"] = _labels(label)
    if priority is not None:
        args["priority"] = priority
    result = _call(data, broker, timeout, "layer.set", **args)
    if not as_json:
        result.pop("versions")
    _emit(result, as_json, lambda r: f"layer {r['layer']} is at version {r['version']}; "
          f"{r['devices']} device(s) got a new version")
    _warn_new_devices(result, as_json)


def _warn_new_devices(result: dict[str, Any], as_json: bool) -> None:
    """After ``--force``: which devices added from now on would be refused, said once on stderr."""
    for line in result.get("new_devices_invalid", []) if not as_json else []:
        typer.echo(f"warning: {line} (stored with --force: such a device add is refused)", err=True)


@layer_app.command("get")
def layer_get(name: LayerArg, version: Annotated[int | None, typer.Option("--version", min=1)] = None,
              data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
              timeout: TimeoutOpt = 10.0) -> None:
    """Print a layer's content (the current version unless --version)."""
    args: dict[str, Any] = {"name": name} | ({"version": version} if version else {})
    result = _call(data, broker, timeout, "layer.get", **args)
    if result["content"] is None and not as_json:
        fail(f"layer {name} was removed at version {result['version']}")
    _emit(result, as_json, lambda r: json.dumps(r["content"], indent=2, sort_keys=True))


@layer_app.command("list")
def layer_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
               timeout: TimeoutOpt = 10.0) -> None:
    """The layers in force, in merge order (the device's own layer comes last)."""
    rows = _call(data, broker, timeout, "layer.list")
    people = [{"layer": r["layer"], "version": r["version"],
               "priority": r["priority"] if r["layer"] != "fleet" else "-",
               "labels": ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "(all)"} for r in rows]
    _emit(rows, as_json, lambda _: _table(people, ["layer", "version", "priority", "labels"]) if rows else "no layers")


@layer_app.command("history")
def layer_history(name: LayerArg, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 10.0) -> None:
    """Every version of a layer, removals included."""
    rows = _call(data, broker, timeout, "layer.history", name=name)
    people = [{"version": r["version"], "at": r["created_at"], "by": r["actor"],
               "change": "removed" if r["removed"] else "set", "message": r["message"]} for r in rows]
    _emit(rows, as_json, lambda _: _table(people, ["version", "at", "by", "change", "message"]))


@layer_app.command("diff")
def layer_diff(name: LayerArg, a: int, b: int, data: DataOpt = None, broker: BrokerOpt = None,
               as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0) -> None:
    """Unified diff between two versions of a layer; exits 1 when they differ, like diff(1)."""
    result = _call(data, broker, timeout, "layer.diff", name=name, a=a, b=b)
    _emit(result, as_json, lambda r: r["diff"] or "(no difference)")
    if not result["same"]:
        raise typer.Exit(1)


@layer_app.command("rollback")
def layer_rollback(name: LayerArg, version: int, message: Annotated[str, typer.Option("-m", "--message")] = "",
                   data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                   timeout: TimeoutOpt = 60.0) -> None:
    """A layer's older version (content, labels, priority) as its new version."""
    result = _call(data, broker, timeout, "layer.rollback", name=name, version=version, message=message)
    if not as_json:
        result.pop("versions")
    _emit(result, as_json, lambda r: f"layer {r['layer']} is at version {r['version']}; "
          f"{r['devices']} device(s) got a new version")


@layer_app.command("remove")
def layer_remove(name: LayerArg, message: Annotated[str, typer.Option("-m", "--message")] = "",
                 force: Annotated[bool, typer.Option("--force", help="Remove it even if a device added later "
                                                     "would then get a config its schemas refuse.")] = False,
                 data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                 timeout: TimeoutOpt = 60.0) -> None:
    """Stop applying a layer (its history stays); devices whose config changes get a new version."""
    result = _call(data, broker, timeout, "layer.remove", name=name, message=message, force=force)
    _emit(result, as_json, lambda r: f"layer {r['layer']} removed; {r['devices']} device(s) got a new version")
    _warn_new_devices(result, as_json)


schema_app = typer.Typer(no_args_is_help=True, help="JSON Schemas every config must satisfy (docs/rollouts.md).")
app.add_typer(schema_app, name="schema")
SchemaLabels = Annotated[list[str] | None, typer.Option(
    "--label", help="k=v, repeatable: the schema for devices with all these labels (none: the fleet's).")]


@schema_app.command("set")
def schema_set(
    source: Annotated[str, typer.Argument(metavar="FILE", help="A JSON Schema 2020-12 document, or - for stdin.")],
    label: SchemaLabels = None,
    force: Annotated[bool, typer.Option("--force", help="Store it even if current configs break it (those "
                                        "devices then show sync invalid).")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 30.0,
) -> None:
    """Set the schema for the fleet or for devices with --label; refused if current configs break it."""
    document = _read_json_document(source)
    result = _call(data, broker, timeout, "schema.set", labels=_labels(label), document=document, force=force)
    bad = result["invalid_devices"]
    _emit(result, as_json, lambda r: f"schema {r['schema']} is at version {r['version']}" + (
        f"\n{len(bad)} device(s) now invalid: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}" if bad else ""))


@schema_app.command("get")
def schema_get(
    label: SchemaLabels = None,
    version: Annotated[int | None, typer.Option("--version", min=1, help="An older version.")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Print a schema document (the current version unless --version)."""
    args: dict[str, Any] = {"labels": _labels(label)} | ({"version": version} if version else {})
    result = _call(data, broker, timeout, "schema.get", **args)
    if result["document"] is None:
        fail(f"schema {result['schema']} was removed at version {result['version']}")
    _emit(result, as_json, lambda r: json.dumps(r["document"], indent=2, sort_keys=True))


@schema_app.command("list")
def schema_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                timeout: TimeoutOpt = 10.0) -> None:
    """The schemas in force."""
    rows = _call(data, broker, timeout, "schema.list")
    _emit(rows, as_json, lambda r: _table(r, ["schema", "version"]) if r else "no schemas")


@schema_app.command("history")
def schema_history(label: SchemaLabels = None, data: DataOpt = None, broker: BrokerOpt = None,
                   as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0) -> None:
    """Every version of a schema, removals included."""
    rows = _call(data, broker, timeout, "schema.history", labels=_labels(label))
    people = [{"version": r["version"], "at": r["created_at"], "by": r["actor"],
               "change": "removed" if r["removed"] else "set"} for r in rows]
    _emit(rows, as_json, lambda _: _table(people, ["version", "at", "by", "change"]))


@schema_app.command("remove")
def schema_remove(label: SchemaLabels = None, data: DataOpt = None, broker: BrokerOpt = None,
                  as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0) -> None:
    """Stop enforcing a schema (its history stays)."""
    result = _call(data, broker, timeout, "schema.remove", labels=_labels(label))
    _emit(result, as_json, lambda r: f"schema {r['schema']} removed (version {r['version']})")


token_app = typer.Typer(no_args_is_help=True, help="Tokens for the HTTP API and the console (docs/http.md).")
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help="viewer (read), operator (push, rollback, kick) or admin "
                                      "(devices, secrets, tokens).")],
    name: Annotated[str | None, typer.Option("--name", help="A name for the audit trail (default: ROLE-N).")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Create a bearer token and print it (shown only this once; only its hash is kept)."""
    if role not in ("viewer", "operator", "admin"):
        fail(f"--role must be viewer, operator or admin, not {role!r}", 2)
    if name is None:
        import secrets as _secrets

        name = f"{role}-{_secrets.token_hex(2)}"
    result = _call(data, broker, timeout, "token.create", name=name, role=role)
    _emit(result, as_json, lambda r: f"token {r['name']} ({r['role']}) created\ntoken: {r['token']}\n"
          "(store it now: it is not shown again)")


@token_app.command("list")
def token_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
               timeout: TimeoutOpt = 10.0) -> None:
    """Tokens with their roles (never the tokens themselves)."""
    rows = _call(data, broker, timeout, "token.list")
    _emit(rows, as_json, lambda r: _table(r, ["id", "name", "role", "created_at", "created_by"]))


@token_app.command("revoke")
def token_revoke(
    token: Annotated[str, typer.Argument(metavar="ID_OR_NAME", help="The token's id or name.")],
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Revoke a token: it stops working at once."""
    result = _call(data, broker, timeout, "token.revoke", token=token)
    _emit(result, as_json, lambda r: f"token {r['name']} revoked")


certs_app = typer.Typer(no_args_is_help=True, help="Certificates for TLS listeners.")
app.add_typer(certs_app, name="certs")


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
    from .certs import make_dev_certs
    from .ids import device_id_problem

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


broker_config_app = typer.Typer(no_args_is_help=True, help="Configuration for an external broker.")
app.add_typer(broker_config_app, name="broker-config")


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
    run_as: Annotated[str, typer.Option("--user", help="The user mosquitto runs as (must read passwd).")]
    = "mosquitto",
    store: Annotated[str | None, typer.Option("--store", metavar="URL", help="Read the identities from this "
                                              "PostgreSQL store (as henge serve --store).")] = None,
    init: Annotated[bool, typer.Option("--init", help="First setup: create the store and the admin identity "
                                       "if --data holds none (otherwise that is refused).")] = False,
) -> None:
    """Write a Mosquitto configuration (listeners, ACL, password file for every device) from the store."""
    from .mosquitto import identities, write_mosquitto_config
    from .settings import Settings

    settings = Settings.load(data_dir=data)
    hashes, missing = identities(settings.data_dir, settings.admin_name, store, init=init)
    written = write_mosquitto_config(out, hashes, device_listener=device_listener, admin_listener=admin_listener,
                                     topic_prefix=topic_prefix, admin_name=settings.admin_name, run_as=run_as)
    from .paths import BROKER_FILE
    from .service.auth import write_private

    write_private(settings.data_dir / BROKER_FILE, json.dumps(  # for serve's banner: where devices connect
        {"broker": "mosquitto", "device_listener": device_listener, "admin_listener": admin_listener,
         "config": str(out.resolve())}))
    typer.echo(f"wrote {', '.join(p.name for p in written)} to {out} ({len(hashes)} identities)")
    if missing:
        typer.echo(f"warning: {len(missing)} devices have no broker password yet (created before this feature): "
                   f"rotate their secrets, e.g. henge device rotate-secret {missing[0]}", err=True)


# ---- the device agent ----------------------------------------------------------------------------


@app.command()
@user_errors
def agent(
    broker: Annotated[str, typer.Option("--broker", help="mqtt://host:port of the gateway.")],
    device: Annotated[str, typer.Option("--device", help="This device's id.")],
    secret_file: Annotated[Path, typer.Option("--secret-file", help="File holding the device secret.")],
    write: Annotated[Path | None, typer.Option("--write", help="Write each config (JSON) to FILE atomically.")] = None,
    exec_: Annotated[str | None, typer.Option("--exec", help="Run CMD with the config on stdin; non-zero exit "
                                              "rejects it with CMD's stderr as the error.")] = None,
    state: Annotated[Path | None, typer.Option("--state", help="State file (default ./ID.henge-state.json).")] = None,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix")] = "henge",
    mqtt: Annotated[str, typer.Option("--mqtt", help="Protocol: 5 (default; the server says why it closes a "
                                       "connection) or 3.1.1.")] = "5",
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run on a device: apply each new config, report the outcome, reconnect forever."""
    from urllib.parse import urlsplit

    from .device import Agent, exec_applier, parse_exec, write_file_applier
    from .ids import device_id_problem

    if (write is None) == (exec_ is None):
        fail("give exactly one of --write FILE or --exec CMD", 2)
    if mqtt not in ("5", "5.0", "3.1.1"):
        fail(f"--mqtt must be 5 or 3.1.1, not {mqtt!r}", 2)
    problem = device_id_problem(device)
    if problem:
        fail(problem, 2)
    parts = urlsplit(broker)
    if parts.scheme != "mqtt" or not parts.hostname:
        fail(f"invalid broker URL {broker!r}: expected mqtt://host:port", 2)
    try:
        secret = secret_file.read_text().strip()
    except OSError as exc:
        fail(f"cannot read the secret file {secret_file}: {exc.strerror or exc}")
    try:
        applier = write_file_applier(write) if write is not None else exec_applier(parse_exec(exec_ or ""))
    except ValueError as exc:
        fail(str(exc), 2)
    logging.basicConfig(level=_log_level(log_level),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = Agent(parts.hostname, parts.port or 1883, device, secret, applier,
                   state or Path(f"{device}.henge-state.json"), topic_prefix=topic_prefix, mqtt5=mqtt != "3.1.1")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await worker.run(stop)

    asyncio.run(main())


def command() -> Any:
    """The click command tree of ``henge``, with usage lines in the plain form people read in man
    pages (``henge push [OPTIONS] [ID] [FILE|-]``, ``henge diff [OPTIONS] DEVICE A B``): typer marks a
    required argument ``{ID}`` (and lower-cases one without a metavar), which reads like a
    placeholder to fill in braces and all."""
    root = typer.main.get_command(app)

    def plain(cmd: Any) -> None:  # a click command (typer's own copy of click, from typer 0.26 on)
        typed = cmd.collect_usage_pieces

        def pieces(ctx: Any) -> list[str]:
            return [(p[1:-1] if p.startswith("{") and p.endswith("}") else p).upper() for p in typed(ctx)]

        cmd.collect_usage_pieces = pieces
        for sub in getattr(cmd, "commands", {}).values():
            plain(sub)

    plain(root)
    return root


def main() -> None:
    """The CLI's one exit: every failure is one ``error:`` line and a documented exit code, never a
    traceback (usage errors 2, failures 1; ``HENGE_DEBUG=1`` shows the traceback of an unexpected one)."""
    from typer.exceptions import TyperException

    try:
        code = command()(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fatal("interrupted", 130)
    except TyperException as exc:  # a usage error: one line, not a box
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fatal(message, int(getattr(exc, "exit_code", 2)))
    except HengeError as exc:
        _fatal(str(exc), EXIT_TIMEOUT if exc.code == "timeout" else 1)
    except KeyboardInterrupt:
        _fatal("interrupted", 130)
    except Exception as exc:  # the last guard: a bug must still not print a traceback at an operator
        if os.environ.get("HENGE_DEBUG"):
            raise
        _fatal(f"unexpected failure: {exc!r} (run with HENGE_DEBUG=1 for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _fatal(message: str, code: int) -> NoReturn:
    """One ``error:`` line per line of the message (a schema refusal has one per violation)."""
    lines = [" ".join(line.split()) for line in message.splitlines() if line.strip()] or [""]
    sys.stderr.write("".join(f"error: {line}\n" for line in lines))
    sys.exit(code)
