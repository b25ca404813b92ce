"""The ``henge`` command tree: the root app and its groups; the commands register themselves
on these from the modules named for what they act on.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="henge-mqtt: versioned JSON configs for fleets of MQTT devices.",
    pretty_exceptions_enable=False,
)
def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"henge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """henge-mqtt: versioned JSON configs for fleets of MQTT devices."""


device_app = typer.Typer(no_args_is_help=True, help="Register and manage devices.")
app.add_typer(device_app, name="device")


rollout_app = typer.Typer(no_args_is_help=True, help="Staged rollouts that halt (and revert) on rejections "
                          "(docs/rollouts.md).")
app.add_typer(rollout_app, name="rollout")


layer_app = typer.Typer(no_args_is_help=True, help="Config layers: the fleet's, and per label (docs/rollouts.md).")
app.add_typer(layer_app, name="layer")


schema_app = typer.Typer(no_args_is_help=True, help="JSON Schemas every config must satisfy (docs/rollouts.md).")
app.add_typer(schema_app, name="schema")


token_app = typer.Typer(no_args_is_help=True, help="Tokens for the HTTP API and the console (docs/http.md).")
app.add_typer(token_app, name="token")


claim_app = typer.Typer(no_args_is_help=True, help="Claims: devices that enrol themselves (docs/onboarding.md).")
app.add_typer(claim_app, name="claim")


certs_app = typer.Typer(no_args_is_help=True, help="Certificates for TLS listeners.")
app.add_typer(certs_app, name="certs")


broker_config_app = typer.Typer(no_args_is_help=True, help="Configuration for an external broker.")
app.add_typer(broker_config_app, name="broker-config")
