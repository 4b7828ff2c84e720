-- consign inbox on SQLite (see migrations/postgres/0002_inbox.sql).

CREATE TABLE consign_inbox (
    consumer    TEXT NOT NULL,
    message_id  BLOB NOT NULL,
    handled_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer, message_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX consign_inbox_handled_at ON consign_inbox (handled_at);

CREATE TABLE consign_inbox_offsets (
    consumer_group TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    "partition"    INTEGER NOT NULL,
    next_offset    INTEGER NOT NULL,
    updated_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, topic, "partition")
) STRICT, WITHOUT ROWID;

CREATE TABLE consign_dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer    TEXT    NOT NULL,
    -- NULL when the message carried no usable `consign-id` header.
    message_id  BLOB,
    topic       TEXT    NOT NULL,
    "partition" INTEGER NOT NULL,
    "offset"    INTEGER NOT NULL,
    "key"       BLOB,
    -- Kafka headers as [{"name": ..., "value": ...}] or {"name": ..., "base64": ...}.
    headers     TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(headers)),
    payload     BLOB,
    error       TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    failed_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE INDEX consign_dead_letters_consumer ON consign_dead_letters (consumer, failed_at);
