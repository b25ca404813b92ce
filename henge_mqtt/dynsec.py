"""Mosquitto's dynamic security plugin, as henge uses it: identities managed live, no reload.

Pure: the documents and commands, no I/O. ``henge broker-config mosquitto --identities
dynamic-security`` writes :func:`document` as the plugin's initial config; the service, connected
as the admin identity, sends :func:`create` (a device added, or given a new secret: the identity
re-created, whether or not the broker had it) and :func:`delete` commands to
``$CONTROL/dynamic-security/v1``, and the broker applies them at once (it disconnects a deleted
client itself).

Each device is a client whose ``clientid`` is bound to its user name (another client id is refused
at CONNECT, as ``use_username_as_clientid`` does with password files), with a role of its own:
Mosquitto 2.0.11 does not expand ``%u`` in dynamic-security ACLs, so one role per device holds that
device's topics. The admin identity has no bound client id (the service and the CLI connect as it
at once).
"""

from __future__ import annotations

from typing import Any

from .topics import DEVICE_PUBLISHES, DEVICE_READS

TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSES = "$CONTROL/dynamic-security/v1/response"
ADMIN_ROLE = "henge-admin"


def role_of(device: str) -> str:
    return f"henge-device-{device}"


def _allow(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}


def device_acls(prefix: str, device: str) -> list[dict[str, Any]]:
    """The same rights the password-file ACL gives a device: read its config and presence, write its
    report, read and write its own presence announcements."""
    base = f"{prefix}/devices/{device}"
    return ([_allow("subscribeLiteral", f"{base}/{leaf}") for leaf in DEVICE_READS]
            + [_allow("publishClientSend", f"{base}/{leaf}") for leaf in DEVICE_PUBLISHES])


def admin_acls(prefix: str) -> list[dict[str, Any]]:
    return [_allow(kind, topic) for topic in (f"{prefix}/#", "$CONTROL/dynamic-security/#")
            for kind in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")]


def stored_password(mosquitto_hash: str) -> dict[str, Any]:
    """A ``$7$`` hash (what henge keeps for external brokers: PBKDF2-SHA512) as the plugin stores one."""
    parts = mosquitto_hash.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        raise ValueError("not a Mosquitto $7$ password hash")
    return {"password": parts[4], "salt": parts[3], "iterations": int(parts[2])}


def document(hashes: dict[str, str], *, admin_name: str, prefix: str) -> dict[str, Any]:
    """The plugin's config file: the admin identity and every device, each with its role."""
    clients: list[dict[str, Any]] = []
    roles: list[dict[str, Any]] = [{"rolename": ADMIN_ROLE, "acls": admin_acls(prefix)}]
    for user, digest in sorted(hashes.items()):
        if user == admin_name:
            clients.append({"username": user, "textname": "henge service and CLI",
                            "roles": [{"rolename": ADMIN_ROLE}], **stored_password(digest)})
            continue
        clients.append({"username": user, "clientid": user, "textname": "henge device",
                        "roles": [{"rolename": role_of(user)}], **stored_password(digest)})
        roles.append({"rolename": role_of(user), "acls": device_acls(prefix, user)})
    return {
        # Nothing is allowed that a role does not allow, except receiving what one may subscribe to.
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": clients, "groups": [], "roles": roles,
    }


def create(device: str, secret: str, *, prefix: str) -> list[dict[str, Any]]:
    """A device's role and client, made live (any older ones of that name replaced)."""
    return [
        *delete(device),
        {"command": "createRole", "rolename": role_of(device), "textname": "henge device",
         "acls": device_acls(prefix, device)},
        {"command": "createClient", "username": device, "password": secret, "clientid": device,
         "textname": "henge device", "roles": [{"rolename": role_of(device)}]},
    ]


def delete(device: str) -> list[dict[str, Any]]:
    """The device's client (its connection is closed by the broker) and its role."""
    return [{"command": "deleteClient", "username": device}, {"command": "deleteRole", "rolename": role_of(device)}]


NOT_FOUND = ("Client not found", "Role not found")  # what deleting something absent answers: fine here


def failures(responses: list[dict[str, Any]]) -> list[str]:
    """The errors of a response, except a delete of what was not there (``create`` deletes first)."""
    return [f"{r.get('command')}: {r['error']}" for r in responses
            if r.get("error") and not (str(r.get("command", "")).startswith("delete") and r["error"] in NOT_FOUND)]
