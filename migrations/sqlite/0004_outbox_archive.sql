-- consign outbox archive on SQLite (optional, `relay.archive = true`; see
-- migrations/postgres/0004_outbox_archive.sql). A plain table: retention
-- deletes old rows in batches.

CREATE TABLE consign_outbox_archive (
    seq          INTEGER NOT NULL,
    id           BLOB    NOT NULL,
    "partition"  INTEGER NOT NULL,
    topic        TEXT    NOT NULL,
    "key"        TEXT,
    event_type   TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    headers      TEXT    NOT NULL,
    traceparent  TEXT,
    tracestate   TEXT,
    created_at   TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    published_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE INDEX consign_outbox_archive_id ON consign_outbox_archive (id);
CREATE INDEX consign_outbox_archive_published_at ON consign_outbox_archive (published_at);
