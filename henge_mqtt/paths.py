"""Files ``henge serve`` keeps in its data dir, shared by the service and the admin client."""

from __future__ import annotations

ADMIN_FILE = "admin.json"  # admin credentials, mode 0600
EVENTS_FILE = "broker-events.json"  # the NATS system user henge reads connection events as, mode 0600
SERVICE_FILE = "service.json"  # address of the running service, removed on clean shutdown
ADMIN_SOCKET = "admin.sock"  # the admin listener (Unix domain socket, 0600): the CLI's way in
BROKER_FILE = "broker.json"  # the external broker's listeners, as broker-config wrote them (serve says where
                             # devices connect)
