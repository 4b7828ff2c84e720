-- consign inbox: what a consumer has handled, where it stands in each Kafka
-- partition, and what it could not handle.

-- One row per (consumer, message id) handled, written in the same transaction
-- as the handler's own writes: a redelivered message finds its row and is
-- skipped, so its effect happens once.
CREATE TABLE consign_inbox (
    consumer    text        NOT NULL,
    message_id  uuid        NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- For retention by age.
CREATE INDEX consign_inbox_handled_at ON consign_inbox (handled_at);

-- The next Kafka offset to read, per consumer group and partition, committed
-- with the handlers' writes. A consumer that is assigned a partition starts
-- here, so restarts and rebalances resume exactly where the database stands.
CREATE TABLE consign_inbox_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Messages a consumer gave up on, with the reason. Nothing is dropped silently.
CREATE TABLE consign_dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer    text        NOT NULL,
    -- NULL when the message carried no usable `consign-id` header.
    message_id  uuid,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    key         bytea,
    -- Kafka headers as [{"name": ..., "value": ...}] (value is a UTF-8 string)
    -- or {"name": ..., "base64": ...} for binary values, in their order.
    headers     jsonb       NOT NULL DEFAULT '[]'::jsonb,
    payload     bytea,
    error       text        NOT NULL,
    attempts    integer     NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX consign_dead_letters_consumer ON consign_dead_letters (consumer, failed_at);

COMMENT ON TABLE consign_inbox IS 'consign inbox: message ids each consumer has handled';
COMMENT ON TABLE consign_inbox_offsets IS 'consign inbox: next Kafka offset per consumer group and partition';
COMMENT ON TABLE consign_dead_letters IS 'consign inbox: messages that could not be handled, with the reason';
