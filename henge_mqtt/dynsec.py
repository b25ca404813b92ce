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

A claim (docs/onboarding.md) is a client ``claim:<id>`` with the one shared role ``henge-claim``:
publish any claim request, subscribe to a claim response by its exact topic (no filter that reads
every answer). Its client id is not bound: the nonce is the client id, new on every claim.
"""

from __future__ import annotations

from typing import Any

from .topics import DEVICE_PUBLISHES, DEVICE_READS

TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSES = "$CONTROL/dynamic-security/v1/response"
ADMIN_ROLE = "henge-admin"
CLAIM_ROLE = "henge-claim"


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


def claim_acls(prefix: str) -> list[dict[str, Any]]:
    """Publish any claim request; subscribe to one response topic by its exact name. The pattern
    would also admit the one filter that reads every answer, ``{prefix}/claim/+/response``
    (the plugin matches a filter against a pattern as if it were a topic): refused first."""
    wide = f"{prefix}/claim/+/response"
    return [_allow("publishClientSend", f"{prefix}/claim/+/request"),
            {"acltype": "subscribeLiteral", "topic": wide, "priority": 1, "allow": False},
            {"acltype": "subscribeLiteral", "topic": f"$share/+/{wide}", "priority": 1, "allow": False},
            _allow("subscribePattern", wide)]


def admin_acls(prefix: str) -> list[dict[str, Any]]:
    return [_allow(kind, topic) for topic in (f"{prefix}/#", "$CONTROL/dynamic-security/#")
            for kind in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")]


def stored_password(mosquitto_hash: str) -> dict[str, Any]:
    """A ``$7$`` hash (what henge keeps for external brokers: PBKDF2-SHA512) as the plugin stores one."""
    parts = mosquitto_hash.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        raise ValueError("not a Mosquitto $7$ password hash")
    return {"password": parts[4], "salt": parts[3], "iterations": int(parts[2])}


def document(hashes: dict[str, str], *, admin_name: str, prefix: str,
             claims: dict[str, str] | None = None) -> dict[str, Any]:
    """The plugin's config file: the admin identity and every device, each with its role, and the
    claims in ``claims`` (``{user name: hash}``) with theirs."""
    clients: list[dict[str, Any]] = [{"username": user, "textname": "henge claim", "roles": [{"rolename": CLAIM_ROLE}],
                                      **stored_password(digest)} for user, digest in sorted((claims or {}).items())]
    roles: list[dict[str, Any]] = [{"rolename": ADMIN_ROLE, "acls": admin_acls(prefix)},
                                   {"rolename": CLAIM_ROLE, "acls": claim_acls(prefix)}]
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


def create_claim(user: str, secret: str, *, prefix: str) -> list[dict[str, Any]]:
    """A claim's client (the shared claim role made if the broker lacks it: one made already is
    answered "Role already exists", which :func:`failures` lets pass)."""
    return [{"command": "deleteClient", "username": user},
            {"command": "createRole", "rolename": CLAIM_ROLE, "textname": "henge claims", "acls": claim_acls(prefix)},
            {"command": "createClient", "username": user, "password": secret, "textname": "henge claim",
             "roles": [{"rolename": CLAIM_ROLE}]}]


def delete_claim(user: str) -> list[dict[str, Any]]:
    """The claim's client: claiming connections with it are closed by the broker."""
    return [{"command": "deleteClient", "username": user}]


def delete(device: str) -> list[dict[str, Any]]:
    """The device's client (its connection is closed by the broker) and its role."""
    return [{"command": "deleteClient", "username": device}, {"command": "deleteRole", "rolename": role_of(device)}]


NOT_FOUND = ("Client not found", "Role not found")  # what deleting something absent answers: fine here


def failures(responses: list[dict[str, Any]]) -> list[str]:
    """The errors of a response, except a delete of what was not there (``create`` deletes first)."""
    return [f"{r.get('command')}: {r['error']}" for r in responses
            if r.get("error") and not (str(r.get("command", "")).startswith("delete") and r["error"] in NOT_FOUND)
            and not (r.get("command") == "createRole" and r["error"] == "Role already exists")]
