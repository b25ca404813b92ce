"""``henge token``: the HTTP API's bearer tokens.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..roles import ROLES
from .common import BrokerOpt, DataOpt, JsonOpt, TimeoutOpt, call_op, emit, fail, op_help
from .render import render_table
from .tree import token_app


@token_app.command("create", help=op_help("token.create"))
def token_create(
    role: Annotated[str, typer.Option("--role", help="viewer (read), operator (push, rollback, kick) or admin "
                                      "(devices, secrets, tokens).")],
    name: Annotated[str | None, typer.Option("--name", help="A name for the audit trail (default: ROLE-N).")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    if role not in ROLES:
        fail(f"--role must be {', '.join(ROLES[:-1])} or {ROLES[-1]}, not {role!r}", 2)
    if name is None:
        import secrets as _secrets

        name = f"{role}-{_secrets.token_hex(2)}"
    result = call_op(data, broker, timeout, "token.create", name=name, role=role)
    emit(result, as_json, lambda r: f"token {r['name']} ({r['role']}) created\ntoken: {r['token']}\n"
          "(store it now: it is not shown again)")


@token_app.command("list", help=op_help("token.list"))
def token_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
               timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "token.list")
    emit(rows, as_json, lambda r: render_table(r, ["id", "name", "role", "created_at", "created_by"]))


@token_app.command("revoke", help=op_help("token.revoke"))
def token_revoke(
    token: Annotated[str, typer.Argument(metavar="ID_OR_NAME", help="The token's id or name.")],
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    result = call_op(data, broker, timeout, "token.revoke", token=token)
    emit(result, as_json, lambda r: f"token {r['name']} revoked")
