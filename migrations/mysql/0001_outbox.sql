-- consign outbox on MySQL 8 / MariaDB 10.6+: the same table as on PostgreSQL
-- (migrations/postgres/0001_outbox.sql). `partition` and `key` are reserved
-- words here, hence the backquotes. Times are UTC (DATETIME(6) filled with
-- UTC_TIMESTAMP(6)), whatever the session's time zone.

CREATE TABLE consign_outbox (
    -- Insert order. The relay publishes the rows of one key in this order.
    seq             BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- Message id (UUID v7), sent as the Kafka header `consign-id`.
    id              BINARY(16)   NOT NULL,
    -- Stable hash of the key (or of the id for keyless rows) modulo 32.
    `partition`     SMALLINT     NOT NULL CHECK (`partition` >= 0 AND `partition` < 32),
    topic           VARCHAR(249) NOT NULL,
    -- Kafka message key (aggregate id). NULL: no key, no ordering.
    `key`           VARCHAR(4096),
    event_type      VARCHAR(255) NOT NULL,
    payload         LONGBLOB     NOT NULL,
    -- User headers as a JSON object of string values.
    headers         JSON         NOT NULL,
    -- W3C trace context of the writer, sent as headers of the same names.
    traceparent     VARCHAR(55),
    tracestate      VARCHAR(512),
    created_at      DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    -- Failed publish attempts so far, the last error, and when to retry.
    attempts        INT          NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at DATETIME(6),
    KEY consign_outbox_partition (`partition`, seq),
    KEY consign_outbox_failed (topic, `key`(191), seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'consign transactional outbox: events waiting to be published by consign-relay';
