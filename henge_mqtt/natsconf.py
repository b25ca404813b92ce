"""A NATS cluster with JetStream and MQTT, as henge uses it: node files and the accounts file.

Pure: text from data, no I/O (``henge broker-config nats`` writes it; the service rewrites the
accounts file when identities change, then runs the reload hook). What NATS 2.9 needs, measured on
a real cluster (docs/scaling.md):

- MQTT needs JetStream in the account the MQTT users are in: one account (``HENGE``) with
  JetStream, holding the admin identity and every device.
- Every user gets explicit permissions (a user with none has crashed every node on a reload once
  retained messages exist), in NATS subjects: the MQTT topic ``a/b.c`` is the subject ``a.b//c``.
  QoS 1 subscriptions deliver through ``$MQTT.sub.<id>``, so subscribing there is allowed too.
- ``consumer_replicas: 1`` and ``consumer_memory_storage: true``: a QoS 1 subscription is a
  JetStream consumer; replicated on disc, 10,000 of them take minutes to create.
- Connection events (``$SYS.ACCOUNT.HENGE.CONNECT|DISCONNECT``) exist only in the system account,
  and carry the client's credentials in a ``jwt`` field: a system user of its own for henge, allowed
  those two subjects, one account-scoped request (``CONNZ``) and its replies, and nothing else.
- Passwords are bcrypt hashes (henge keeps one per identity for this, never the secret).
- The MQTT client id is not tied to the user name: henge flags an identity whose client id differs
  (from the CONNECT events), since NATS cannot be told to refuse it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .topics import DEVICE_PUBLISHES, DEVICE_READS

ACCOUNT = "HENGE"
SYSTEM_ACCOUNT = "SYS"
EVENTS_USER = "henge-events"


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    host: str
    client_port: int  # NATS clients (henge's events client)
    cluster_port: int  # routes between the nodes
    mqtt_port: int  # devices and henge's admin connection

    def route(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"


def nodes(specs: list[str], *, client_port: int = 4222, cluster_port: int = 6222, mqtt_port: int = 1883) -> list[Node]:
    """One node per ``HOST`` or ``HOST:CLIENT:CLUSTER:MQTT``; nodes that share a host and give no
    ports get the next ones (three on one machine: 4222, 4223, 4224), so a whole cluster can run on
    one host to try it. Raises ValueError naming a bad spec."""
    seen: dict[str, int] = {}
    out = []
    for i, spec in enumerate(specs, start=1):
        host, *ports = spec.split(":")
        if not host or (ports and (len(ports) != 3 or not all(p.isdigit() and 0 < int(p) < 65536 for p in ports))):
            raise ValueError(f"invalid node {spec!r}: expected HOST or HOST:CLIENT:CLUSTER:MQTT")
        if ports:
            out.append(Node(f"henge-{i}", host, int(ports[0]), int(ports[1]), int(ports[2])))
            continue
        k = seen.get(host, 0)
        seen[host] = k + 1
        out.append(Node(f"henge-{i}", host, client_port + k, cluster_port + k, mqtt_port + k))
    if len({(n.host, p) for n in out for p in (n.client_port, n.cluster_port, n.mqtt_port)}) != 3 * len(out):
        raise ValueError("two nodes would listen on the same host and port: give each its own ports")
    return out


def subject(topic: str) -> str:
    """The NATS subject of an MQTT topic (NATS's own mapping: ``/`` to ``.``, ``.`` to ``//``)."""
    return "".join("//" if ch == "." else "." if ch == "/" else ch for ch in topic)


def _quote(text: str) -> str:
    return json.dumps(text)  # NATS reads JSON strings; a quoted "$2b$..." is never a variable


def _list(items: list[str]) -> str:
    return "[" + ", ".join(_quote(i) for i in items) + "]"


def device_permissions(prefix: str, device: str) -> dict[str, list[str]]:
    """The same rights the Mosquitto ACL gives a device: read its config and presence, write its
    report, read and write its own presence announcements."""
    base = f"{prefix}/devices/{device}"
    return {"publish": [subject(f"{base}/{leaf}") for leaf in DEVICE_PUBLISHES],
            "subscribe": [subject(f"{base}/{leaf}") for leaf in DEVICE_READS] + ["$MQTT.sub.>"]}


def claim_permissions(prefix: str) -> dict[str, list[str]]:
    """A claim's user: publish a claim request, read claim responses (NATS cannot tie a subject to
    the client id, so every answer is one a claimer could read: behind a broker the device
    proposes its own secret, and no answer carries one; docs/onboarding.md)."""
    base = subject(f"{prefix}/claim")
    return {"publish": [f"{base}.*.request"], "subscribe": [f"{base}.*.response", "$MQTT.sub.>"]}


def admin_permissions(prefix: str) -> dict[str, list[str]]:
    p = subject(prefix)
    return {"publish": [f"{p}.>"], "subscribe": [f"{p}.>", "$MQTT.sub.>"]}


def events_permissions(account: str = ACCOUNT) -> dict[str, list[str]]:
    return {"publish": [f"$SYS.REQ.ACCOUNT.{account}.CONNZ", "$SYS.REQ.SERVER.PING.VARZ"],
            "subscribe": [f"$SYS.ACCOUNT.{account}.CONNECT", f"$SYS.ACCOUNT.{account}.DISCONNECT", "_INBOX.>"]}


def _user(name: str, password: str, rights: dict[str, list[str]]) -> str:
    return (f"{{user: {_quote(name)}, password: {_quote(password)}, permissions: "
            f"{{publish: {{allow: {_list(rights['publish'])}}}, subscribe: {{allow: {_list(rights['subscribe'])}}}}}}}")


def accounts(hashes: dict[str, str], *, admin_name: str, prefix: str, events_hash: str,
             account: str = ACCOUNT, claims: dict[str, str] | None = None) -> str:
    """The accounts file every node includes: ``hashes`` maps the admin and each device to its
    bcrypt hash, ``claims`` each claim's user name to its; ``events_hash`` is the system user's."""
    users = [_user(admin_name, hashes[admin_name], admin_permissions(prefix))] if admin_name in hashes else []
    users += [_user(name, digest, device_permissions(prefix, name))
              for name, digest in sorted(hashes.items()) if name != admin_name]
    users += [_user(name, digest, claim_permissions(prefix)) for name, digest in sorted((claims or {}).items())]
    body = ",\n      ".join(users)
    return (
        "# generated by henge (broker-config nats, and the service when identities change): do not edit\n"
        "accounts {\n"
        f"  {account}: {{\n"
        "    jetstream: enabled\n"
        f"    users: [\n      {body}\n    ]\n"
        "  }\n"
        f"  {SYSTEM_ACCOUNT}: {{\n"
        f"    users: [\n      {_user(EVENTS_USER, events_hash, events_permissions(account))}\n    ]\n"
        "  }\n"
        "}\n"
        f"system_account: {SYSTEM_ACCOUNT}\n"
    )


def node_config(node: Node, cluster: list[Node], *, store_dir: str, pid_file: str, accounts_file: str,
                cluster_name: str = "henge") -> str:
    routes = [n.route() for n in cluster if n != node]
    # Sessions and retained messages on every node up to 3 (quorum survives a node's loss); NATS would
    # pick fewer if it made the streams before every route was up (seen: R2, stalled by one loss).
    settings: dict[str, Any] = {"stream_replicas": min(3, len(cluster)), "consumer_replicas": 1,
                                "consumer_memory_storage": "true"}
    mqtt = ", ".join(f"{k}: {v}" for k, v in settings.items())
    return (
        "# generated by henge broker-config nats (see docs/scaling.md)\n"
        f"server_name: {_quote(node.name)}\n"
        f"listen: {_quote(f'{node.host}:{node.client_port}')}\n"
        f"pid_file: {_quote(pid_file)}\n"
        f"jetstream {{ store_dir: {_quote(store_dir)} }}\n"
        f"cluster {{\n  name: {_quote(cluster_name)}\n  listen: {_quote(f'{node.host}:{node.cluster_port}')}\n"
        f"  routes: {_list(routes)}\n}}\n"
        "# MQTT 3.1.1 (NATS has no 5.0). Sessions and retained messages replicated; a QoS 1 subscription is a\n"
        "# JetStream consumer: one replica, in memory.\n"
        f"mqtt {{ listen: {_quote(f'{node.host}:{node.mqtt_port}')}, {mqtt} }}\n"
        f"include {_quote(accounts_file)}\n"
    )
