"""The store's tables: one migration per schema version, appended, never edited.
"""

from __future__ import annotations

DB_FILE = "henge.db"


# Each entry moves the schema from version i to i+1; never edit a shipped entry, append one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        epoch INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE config_versions (
        device TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        config TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        PRIMARY KEY (device, version)
    );
    CREATE TABLE admins (
        name TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TRIGGER config_versions_immutable BEFORE UPDATE ON config_versions
    BEGIN SELECT RAISE(ABORT, 'config versions are immutable'); END;
    """,
    """
    CREATE TABLE device_reports (
        device TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        applied_version INTEGER,
        applied_at TEXT,
        rejected_version INTEGER,
        rejected_error TEXT,
        rejected_at TEXT
    );
    """,
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        device TEXT,
        summary TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_device ON audit (device, id);
    CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    """,
    """
    ALTER TABLE devices ADD COLUMN broker_hash TEXT;
    ALTER TABLE admins ADD COLUMN broker_hash TEXT;
    """,
    """
    ALTER TABLE devices ADD COLUMN last_seen REAL;
    ALTER TABLE devices ADD COLUMN last_remote TEXT;
    ALTER TABLE devices ADD COLUMN last_reason TEXT;
    """,
    """
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
        secret_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE schemas (
        selector TEXT NOT NULL,          -- canonical k=v,k2=v2 (sorted); '' for the whole fleet
        version INTEGER NOT NULL,
        document TEXT,                   -- NULL: removed at this version
        created_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        PRIMARY KEY (selector, version)
    );
""",
    """
    ALTER TABLE config_versions ADD COLUMN own TEXT;          -- the device layer, when it differs from config
    ALTER TABLE config_versions ADD COLUMN layers TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE layers (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        selector TEXT NOT NULL DEFAULT '{}',
        priority INTEGER NOT NULL DEFAULT 0,
        content TEXT,                    -- NULL: removed at this version
        message TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
    """,
    """
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        target TEXT NOT NULL,            -- {"all": true} or {"labels": {...}}
        config TEXT NOT NULL,            -- the device layer every target gets
        policy TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,             -- running | paused | reverting | halted | completed | aborted
        wave INTEGER NOT NULL DEFAULT 0, -- the current wave (0-based)
        waves INTEGER NOT NULL,
        wave_published INTEGER NOT NULL DEFAULT 0,
        wave_started REAL,               -- time.time() when the current wave went out
        next_wave_at REAL,               -- after a pause
        reason TEXT,                     -- why it halted or was aborted
        revert INTEGER NOT NULL DEFAULT 0,
        finished_at TEXT,
        layer TEXT                       -- a staged layer change: {name, content, labels, priority}
    );
    CREATE TABLE rollout_devices (
        rollout TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
        device TEXT NOT NULL,
        wave INTEGER NOT NULL,
        prev_version INTEGER NOT NULL DEFAULT 0,  -- the version before the rollout changed it
        new_version INTEGER,                       -- the version the rollout stored (NULL: not yet)
        online_at_start INTEGER NOT NULL DEFAULT 0,
        reverted_version INTEGER,                  -- the version that brought the old config back
        revert_note TEXT,
        PRIMARY KEY (rollout, device)
    );
    CREATE INDEX rollout_devices_device ON rollout_devices (device);
    """,
    """
    CREATE TABLE lease (
        id INTEGER PRIMARY KEY,          -- one row: who may write (PostgreSQL, several instances)
        holder TEXT,
        token INTEGER NOT NULL DEFAULT 0,  -- the fencing token: +1 at every takeover
        expires REAL NOT NULL DEFAULT 0
    );
    INSERT INTO lease (id, token, expires) VALUES (1, 0, 0);
    """,
    """
    CREATE TABLE version_reports (       -- every version's own report: "why was v5 rejected?" stays answerable
        device TEXT NOT NULL,
        version INTEGER NOT NULL,
        status TEXT NOT NULL,            -- applied | rejected
        error TEXT,
        at TEXT NOT NULL,
        epoch INTEGER,                   -- the connection the report came in on
        PRIMARY KEY (device, version),
        FOREIGN KEY (device, version) REFERENCES config_versions (device, version) ON DELETE CASCADE
    );
    INSERT INTO version_reports (device, version, status, error, at)
        SELECT r.device, r.rejected_version, 'rejected', r.rejected_error, r.rejected_at FROM device_reports r
        JOIN config_versions v ON v.device = r.device AND v.version = r.rejected_version;
    INSERT INTO version_reports (device, version, status, error, at)
        SELECT r.device, r.applied_version, 'applied', NULL, r.applied_at FROM device_reports r
        JOIN config_versions v ON v.device = r.device AND v.version = r.applied_version
        WHERE r.rejected_version IS NULL OR r.rejected_version <> r.applied_version;
    ALTER TABLE rollout_devices ADD COLUMN outcome TEXT;        -- frozen when the wave is decided
    ALTER TABLE rollout_devices ADD COLUMN outcome_error TEXT;
    """,
    """
    CREATE TABLE mqtt_sessions (         -- persistent MQTT sessions (CleanSession 0, Session Expiry > 0)
        device TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        expiry INTEGER NOT NULL,         -- seconds it outlives its last connection
        subs TEXT NOT NULL,              -- [[filter, options], ...]
        ended_at REAL                    -- when its last connection ended (NULL: one is attached)
    );
    """,
    """
    ALTER TABLE devices ADD COLUMN bcrypt_hash TEXT;   -- NATS checks bcrypt (broker-config nats)
    ALTER TABLE admins ADD COLUMN bcrypt_hash TEXT;
    """,
    """
    CREATE TABLE reported (              -- what each device last said it is and runs (docs/protocol.md)
        device TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        document TEXT NOT NULL,          -- canonical JSON of the merged document
        config_sha256 TEXT,              -- its config_sha256 member (drift is a comparison in SQL)
        seq INTEGER NOT NULL,            -- +1 at every change of the document
        changed_at TEXT NOT NULL,        -- when it last changed
        at TEXT NOT NULL,                -- when the latest message arrived, changed or not
        epoch INTEGER                    -- the connection that message came in on
    );
    ALTER TABLE layers ADD COLUMN where_expr TEXT;  -- a filter over id, labels, reported (docs/where.md)
    CREATE TABLE reported_history (      -- the last reported_history documents of each device
        device TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        document TEXT NOT NULL,
        at TEXT NOT NULL,
        epoch INTEGER,
        PRIMARY KEY (device, seq)
    );
    """,
    """
    CREATE TABLE claims (                -- onboarding by claim: a credential a batch of devices shares
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        secret_hash TEXT NOT NULL,       -- SHA-256 of the claim secret (a random token)
        labels TEXT NOT NULL DEFAULT '{}',
        uses INTEGER NOT NULL,           -- devices it may create
        used INTEGER NOT NULL DEFAULT 0,
        expires_at REAL NOT NULL,        -- time.time()
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        revoked_at TEXT,
        ca_pem TEXT,                     -- a claim CA: devices with a certificate it signed may claim
        ca_subject TEXT                  -- its subject, as ssl decodes names (JSON), to know its certificates
    );
    CREATE TABLE claim_uses (            -- every nonce that claimed: a replay is refused
        nonce TEXT PRIMARY KEY,
        claim TEXT NOT NULL,
        device TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX claim_uses_claim ON claim_uses (claim);
    """,
    """
    -- A claim's secret as an external broker checks it (its user claim:ID there): Mosquitto's $7$
    -- (dynamic security) and bcrypt (NATS). NULL for claims made before: they work embedded only.
    ALTER TABLE claims ADD COLUMN broker_hash TEXT;
    ALTER TABLE claims ADD COLUMN bcrypt_hash TEXT;
    """,
    """
    CREATE TABLE fleet_series (          -- the fleet over time: one point a minute, a week kept (store/series.py)
        minute INTEGER PRIMARY KEY,      -- unix time // 60
        devices INTEGER NOT NULL,
        online INTEGER NOT NULL,
        in_sync INTEGER NOT NULL,
        pending INTEGER NOT NULL,
        rejected INTEGER NOT NULL,
        drift INTEGER NOT NULL,
        conflicts INTEGER NOT NULL
    );
    """,
    """
    CREATE TABLE presence_history (      -- each device's presence changes, kept a week (the console's timeline band)
        device TEXT NOT NULL,
        at REAL NOT NULL,                -- time.time()
        state TEXT NOT NULL,             -- online, offline, takeover (online again on a newer connection), conflict
        reason TEXT,
        epoch INTEGER
    );
    CREATE INDEX presence_history_device ON presence_history (device, at);
    CREATE INDEX presence_history_at ON presence_history (at);
    """,
    """
    -- Each device's session record out of its wide row: the epoch high-water mark (saved before
    -- every CONNACK) and the last sighting (at every disconnect, and the whole fleet's at shutdown)
    -- change far more often than its secret hashes and labels, and an UPDATE rewrites the whole
    -- row. devices keeps its old columns, unused (SQLite before 3.35 cannot drop a column).
    CREATE TABLE device_sessions (
        device TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        epoch INTEGER NOT NULL DEFAULT 0,
        last_seen REAL,
        last_remote TEXT,
        last_reason TEXT
    );
    INSERT INTO device_sessions (device, epoch, last_seen, last_remote, last_reason)
        SELECT id, epoch, last_seen, last_remote, last_reason FROM devices;
    """,
]


VERSION_COLUMNS = "device, version, config, sha256, message, created_at, actor, own, layers"
