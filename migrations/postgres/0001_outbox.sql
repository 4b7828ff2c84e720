-- consign outbox: one row per event, written in the same transaction as the
-- business rows it describes. The relay reads rows in `seq` order, publishes
-- them, and deletes them once the broker has acknowledged.

CREATE TABLE consign_outbox (
    -- Insert order. The relay publishes the rows of one key in this order.
    seq             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Message id (UUID v7), sent as the Kafka header `consign-id`.
    id              uuid        NOT NULL,
    -- Stable hash of the key (or of the id for keyless rows) modulo 32.
    -- Relays divide work by outbox partition; all rows of a key share one.
    partition       smallint    NOT NULL CHECK (partition >= 0 AND partition < 32),
    topic           text        NOT NULL,
    -- Kafka message key (aggregate id). NULL: no key, no ordering.
    key             text,
    event_type      text        NOT NULL,
    payload         bytea       NOT NULL,
    -- User headers as a JSON object of string values.
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- W3C trace context of the writer, sent as headers of the same names.
    traceparent     text,
    tracestate      text,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Failed publish attempts so far, the last error, and when to retry.
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz
);

-- Rows that failed to publish: small, used to hold back later rows of the
-- same key while an earlier one waits for its retry, and by `status`.
CREATE INDEX consign_outbox_failed
    ON consign_outbox (topic, key, seq)
    WHERE next_attempt_at IS NOT NULL;

COMMENT ON TABLE consign_outbox IS
    'consign transactional outbox: events waiting to be published by consign-relay';
