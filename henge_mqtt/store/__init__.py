"""The durable store: SQLite in the data dir (or PostgreSQL), the single source of truth for devices
and configs.

:class:`Store` is synchronous (WAL, ``BEGIN IMMEDIATE``, one transaction per operation) and is
composed of one repository per aggregate (devices, versions, reports, reported states, sessions, audit, admins,
layers, rollouts, schemas, tokens), each a module here, all sharing one connection (``core``).
:class:`StoreWorker` gives it one thread of its own, datasette's habit: every call runs there in
order, so admin operations stay atomic with respect to each other while the event loop, which
serves every device, only awaits them. The credential hashes are also kept in memory so that
authenticating a CONNECT never waits for the thread.

Durability: ``synchronous=FULL`` by default (every commit survives a power cut);
``store_synchronous: normal`` trades the last commits before a power cut for cheaper commits
(docs/security.md; the measured cost is in bench/README.md).
"""

from __future__ import annotations

from .core import ts
from .credentials import hash_secret, mosquitto_hash, new_secret
from .db import DatabaseError, IntegrityError
from .reported import ReportedMessage, ReportedOutcome
from .reports import DeviceReports
from .schema import DB_FILE, MIGRATIONS
from .store import Store
from .worker import StoreWorker

__all__ = ["DB_FILE", "MIGRATIONS", "DatabaseError", "DeviceReports", "IntegrityError", "ReportedMessage",
           "ReportedOutcome", "Store", "StoreWorker",
           "hash_secret", "mosquitto_hash", "new_secret", "ts"]
