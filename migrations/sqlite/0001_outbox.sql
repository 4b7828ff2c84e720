-- consign outbox on SQLite: the same table as on PostgreSQL
-- (migrations/postgres/0001_outbox.sql). One writer at a time: a relay's
-- writes and the application's are serialized by SQLite's lock. Times are
-- UTC text in RFC 3339 with microseconds.

CREATE TABLE consign_outbox (
    -- Insert order. The relay publishes the rows of one key in this order.
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Message id (UUID v7, 16 bytes), sent as the Kafka header `consign-id`.
    id              BLOB    NOT NULL,
    -- Stable hash of the key (or of the id for keyless rows) modulo 32.
    "partition"     INTEGER NOT NULL CHECK ("partition" >= 0 AND "partition" < 32),
    topic           TEXT    NOT NULL,
    -- Kafka message key (aggregate id). NULL: no key, no ordering.
    "key"           TEXT,
    event_type      TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    -- User headers as a JSON object of string values.
    headers         TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(headers)),
    -- W3C trace context of the writer, sent as headers of the same names.
    traceparent     TEXT,
    tracestate      TEXT,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- Failed publish attempts so far, the last error, and when to retry.
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TEXT
) STRICT;

CREATE INDEX consign_outbox_partition ON consign_outbox ("partition", seq);
CREATE INDEX consign_outbox_failed ON consign_outbox (topic, "key", seq)
    WHERE next_attempt_at IS NOT NULL;
