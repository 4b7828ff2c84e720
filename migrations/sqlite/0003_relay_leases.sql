-- consign relay coordination on SQLite (see
-- migrations/postgres/0003_relay_leases.sql). Relays on one host share the
-- file; SQLite's single writer serializes their lease rounds.

CREATE TABLE consign_relay_leases (
    "partition" INTEGER PRIMARY KEY CHECK ("partition" >= 0 AND "partition" < 32),
    owner       TEXT,
    epoch       INTEGER NOT NULL DEFAULT 0,
    expires_at  TEXT,
    acquired_at TEXT
) STRICT;

WITH RECURSIVE p (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM p WHERE n < 31)
INSERT INTO consign_relay_leases ("partition") SELECT n FROM p;

CREATE TABLE consign_relays (
    instance     TEXT    PRIMARY KEY,
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT    NOT NULL,
    started_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    heartbeat_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    expires_at   TEXT    NOT NULL
) STRICT;

CREATE TABLE consign_outbox_identity (
    singleton INTEGER PRIMARY KEY DEFAULT 1 CHECK (singleton = 1),
    -- 16 random bytes naming this outbox (read as a UUID).
    outbox_id BLOB    NOT NULL DEFAULT (randomblob(16))
) STRICT;

INSERT INTO consign_outbox_identity DEFAULT VALUES;
