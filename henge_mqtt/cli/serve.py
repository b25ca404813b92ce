"""``henge serve``: the options become :class:`Settings`; :class:`ServeRunner` owns the lifecycle
(signals, a standby's wait, the HTTP and metrics servers, fencing, the exit code), apart from the
command the way uvicorn keeps ``Server`` apart from ``main``: testable in-process, no global.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from ..service import HengeService
    from ..settings import Settings

from .common import DataOpt, fail, log_level_of, user_errors
from .tree import app


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
    broker_events: Annotated[str | None, typer.Option(
        "--broker-events", metavar="nats://HOST:PORT[,HOST:PORT...] | emqx", help="Presence from the broker's own "
        "connection events, for any MQTT client: a NATS cluster's nodes (broker-config nats prints them), or emqx "
        "(EMQX's $SYS client events, on the --broker connection).")] = None,
    nats_accounts: Annotated[Path | None, typer.Option(
        "--nats-accounts", help="The accounts file the NATS nodes include: rewritten when devices are added, "
        "removed or re-keyed.")] = None,
    nats_reload: Annotated[str | None, typer.Option(
        "--nats-reload", metavar="COMMAND", help="Run after each rewrite of --nats-accounts to reload every node "
        "(broker-config nats writes one).")] = None,
    http: Annotated[str | None, typer.Option(
        "--http", metavar="HOST:PORT", envvar="HENGE_HTTP", help="Serve the HTTP API and console here (default "
        "127.0.0.1:8080, or henge.http in --config; port 0 picks a free one).")] = None,
    no_http: Annotated[bool, typer.Option("--no-http", help="No HTTP API or console.")] = False,
    store: Annotated[str | None, typer.Option("--store", metavar="URL", help="postgresql://user@host/db: keep the "
                                              "store in PostgreSQL (default: SQLite in the data dir).")] = None,
    listener_processes: Annotated[int | None, typer.Option(
        "--listener-processes", min=0, max=64, metavar="N", help="Hold device sockets in N listener processes "
        "sharing the port (beyond one process's open-file limit; 0: in the service itself; TLS without client "
        "certificates; see docs/scaling.md).")] = None,
    loop: Annotated[str, typer.Option(
        "--loop", envvar="HENGE_LOOP", metavar="auto|uvloop|asyncio", help="The event loop: uvloop (installed "
        "with henge on Linux and macOS) runs the sockets' work in C; auto picks it when it can be imported.")]
    = "auto",
) -> None:
    """Run the service (with its embedded broker, or against --broker) until SIGINT/SIGTERM."""
    from ..settings import Settings

    logging.basicConfig(
        level=log_level_of(log_level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    os.umask(0o077)  # the store, its WAL and every file henge writes: for the service's user only
    factory = loop_factory(loop)
    logging.getLogger(__name__).info("serve.loop %s", "uvloop" if factory is not None else "asyncio")
    settings = Settings.load(config, data_dir=data, host=host, port=port)
    if external:
        if host is not None or port is not None:
            fail("--host/--port configure the embedded broker; with --broker there is none", 2)
        from ..external import parse_broker_url

        parse_broker_url(external)
        settings = settings.model_copy(update={"external_broker": external, "external_ca": broker_ca,
                                               "external_cert": broker_cert, "external_key": broker_key})
        if broker_events is not None and broker_events != "emqx":
            from ..nats_events import parse_events_url

            parse_events_url(broker_events)
        if broker_events is not None:
            settings = settings.model_copy(update={"external_events": broker_events})
        if nats_accounts is not None:
            settings = settings.model_copy(update={"nats_accounts": nats_accounts.resolve(),
                                                   "nats_reload": nats_reload})
        elif nats_reload is not None:
            fail("--nats-reload needs --nats-accounts (the file it reloads)", 2)
    elif broker_events or nats_accounts or nats_reload:
        fail("--broker-events, --nats-accounts and --nats-reload need --broker (the cluster's MQTT address)", 2)
    if listener_processes is not None:
        if external and listener_processes:
            fail("--listener-processes serves the embedded broker's devices; with --broker there is none", 2)
        settings = settings.model_copy(update={"listener_processes": listener_processes})
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
        from ..http import parse_address

        http_address = parse_address(settings.http)
    _raise_file_limit()

    runner = ServeRunner(settings, http_address=http_address,
                         metrics=(metrics_host, metrics_port) if metrics_port is not None else None)
    asyncio_runner = asyncio.Runner(loop_factory=factory)
    try:
        asyncio_runner.run(runner.run())
    except BaseException as exc:
        asyncio_runner.close()
        if isinstance(exc, OSError):
            fail(f"cannot start the service: {exc.strerror or exc}")
        raise
    # The loop is not closed: its teardown (10,000 sockets taken out of epoll one at a time) is
    # the kernel's at exit, right below, as is the sockets' closing.
    if runner.fenced:
        typer.echo("error: another instance took the store's lease; this one stopped (see the log)", err=True)
        logging.shutdown()
        os._exit(1)
    # Everything is flushed and closed; skip the interpreter's object-by-object teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``--loop``: uvloop's loop, or None for asyncio's own. uvloop does in C what asyncio's selector
    loop does in Python for every socket event (a fleet push is 10,000 of each kind: a write, a
    readable socket, a PUBACK); ``auto`` falls back to asyncio where uvloop is not installed (it has
    no Windows build). The library runs on whatever loop its caller runs."""
    if name not in ("auto", "uvloop", "asyncio"):
        fail(f"--loop must be auto, uvloop or asyncio, not {name!r}", 2)
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            fail("--loop uvloop: uvloop is not installed (pip install uvloop)", 2)
        return None
    return uvloop.new_event_loop


class ServeRunner:
    """One run of the service as ``henge serve`` runs it, until SIGINT/SIGTERM (or :meth:`stop`).

    Owns what the library's ``async with HengeService`` leaves to its caller: the signals, a
    standby's wait for the store's lease (a signal ends that too), the HTTP API and metrics servers,
    the process's collector and switch-interval settings, and what ended the run (:attr:`fenced`:
    another instance took the PostgreSQL store's lease). ``echo`` gets the banner lines.
    ``tune_process``: the runner owns the process, which exits after the run (so the broker leaves
    the devices' sockets for the kernel to close at exit).
    """

    def __init__(self, settings: Settings, *, http_address: tuple[str, int] | None = None,
                 metrics: tuple[str, int] | None = None, echo: Callable[[str], None] | None = None,
                 handle_signals: bool = True, tune_process: bool = True) -> None:
        self.settings = settings
        self.http_address = http_address
        self.metrics = metrics
        self.echo = echo or (lambda line: typer.echo(line, err=True))
        self.handle_signals = handle_signals
        self.tune_process = tune_process
        self.service: HengeService | None = None
        self.fenced = False
        self._stop = asyncio.Event()  # (an Event binds no loop until awaited: made here, one run per runner)
        self.started = asyncio.Event()  # set once the service serves (the banner is out)

    def stop(self) -> None:
        """End the run, as SIGTERM does; asked before the run starts, it ends as soon as it begins."""
        self._stop.set()

    async def run(self) -> None:
        from ..service import HengeService

        stop = self._stop
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        loop.set_exception_handler(_quiet_loop_errors())
        service = self.service = HengeService(self.settings)
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
        try:
            await self._serve(service, stop)
        finally:
            fenced.cancel()
            self.fenced = service.fenced.is_set()

    async def _serve(self, service: HengeService, stop: asyncio.Event) -> None:
        settings = self.settings
        async with service, contextlib.AsyncExitStack() as stack:
            bound_host, bound_port = service.address
            web = None
            if self.http_address is not None:
                from ..http import HttpServer
                from ..http.tokens import first_run_token

                token_file = await first_run_token(service)  # before the port opens: a client finds it there
                web = await stack.enter_async_context(HttpServer(
                    service, *self.http_address, certfile=settings.http_certfile, keyfile=settings.http_keyfile))
                self.echo(f"henge: console on {web.url}" + (
                    f" (first-run admin token in {token_file})" if token_file else ""))
            metrics = None
            if self.metrics is not None:
                from ..metrics import MetricsServer

                metrics = MetricsServer(service, *self.metrics)
                self.echo(f"henge: metrics on http://{self.metrics[0]}:{metrics.port}/metrics")
            if self.tune_process:
                # Start-up objects live as long as the process: keep the collector from rescanning them,
                # and collect less often (a fleet of connections is many long-lived objects).
                gc.freeze()
                # The store's thread and the loop share the GIL: a loop thread that gives it up for every
                # send() must not wait the default 5 ms each time to get it back (the convoy effect).
                sys.setswitchinterval(0.0005)
                gc.set_threshold(50_000, 20, 100)
            if settings.external_broker:
                self.echo(f"henge: serving through the broker at {settings.external_broker} (its admin listener; "
                          f"data: {settings.data_dir}); {_device_listener(settings.data_dir)}")
            else:
                held = (f"; device sockets in {settings.listener_processes} listener processes"
                        if settings.listener_processes else "")
                self.echo(f"henge: serving on mqtt://{bound_host}:{bound_port} (devices and admin; data: "
                          f"{settings.data_dir}{held})")
            self.started.set()
            await stop.wait()
            self.echo("henge: shutting down")
            if self.tune_process:
                gc.disable()  # tearing down 10,000 connections makes garbage a collection would only rescan
            if metrics is not None:
                metrics.close()
            # The HTTP server's own shutdown waits on timers; it runs while the broker closes its
            # connections, not after (the later exits then have nothing left to do).
            exiting = self.tune_process
            await asyncio.gather(*([web.stop(exiting=exiting)] if web is not None else []),
                                 service.stop(exiting=exiting))
            if self.tune_process:
                gc.enable()


def _device_listener(data_dir: Path) -> str:
    """Where devices connect in external mode: the broker's device listener, as broker-config wrote it."""
    from ..paths import BROKER_FILE

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
    from ..logs import LogLimiter

    limiter = LogLimiter(logging.getLogger("henge_mqtt.loop"), rate=1.0)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        limiter.log(logging.ERROR, "loop.error", "%s %s", context.get("message", ""), repr(exc) if exc else "")

    return handler
