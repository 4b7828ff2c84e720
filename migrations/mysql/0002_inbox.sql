-- consign inbox on MySQL 8 / MariaDB 10.6+ (see migrations/postgres/0002_inbox.sql).

CREATE TABLE consign_inbox (
    consumer    VARCHAR(255) NOT NULL,
    message_id  BINARY(16)   NOT NULL,
    handled_at  DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (consumer, message_id),
    KEY consign_inbox_handled_at (handled_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'consign inbox: message ids each consumer has handled';

CREATE TABLE consign_inbox_offsets (
    consumer_group VARCHAR(255) NOT NULL,
    topic          VARCHAR(249) NOT NULL,
    `partition`    INT          NOT NULL,
    next_offset    BIGINT       NOT NULL,
    updated_at     DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (consumer_group, topic, `partition`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'consign inbox: next Kafka offset per consumer group and partition';

CREATE TABLE consign_dead_letters (
    id          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    consumer    VARCHAR(255) NOT NULL,
    -- NULL when the message carried no usable `consign-id` header.
    message_id  BINARY(16),
    topic       VARCHAR(249) NOT NULL,
    `partition` INT          NOT NULL,
    `offset`    BIGINT       NOT NULL,
    `key`       BLOB,
    -- Kafka headers as [{"name": ..., "value": ...}] or {"name": ..., "base64": ...}.
    headers     JSON         NOT NULL,
    payload     LONGBLOB,
    error       TEXT         NOT NULL,
    attempts    INT          NOT NULL,
    failed_at   DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    KEY consign_dead_letters_consumer (consumer, failed_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'consign inbox: messages that could not be handled, with the reason';
