-- consign outbox archive on MySQL 8 / MariaDB 10.6+ (optional,
-- `relay.archive = true`; see migrations/postgres/0004_outbox_archive.sql).
-- A plain table: retention deletes old rows in batches (PostgreSQL drops
-- whole day partitions instead).

CREATE TABLE consign_outbox_archive (
    seq          BIGINT       NOT NULL,
    id           BINARY(16)   NOT NULL,
    `partition`  SMALLINT     NOT NULL,
    topic        VARCHAR(249) NOT NULL,
    `key`        VARCHAR(4096),
    event_type   VARCHAR(255) NOT NULL,
    payload      LONGBLOB     NOT NULL,
    headers      JSON         NOT NULL,
    traceparent  VARCHAR(55),
    tracestate   VARCHAR(512),
    created_at   DATETIME(6)  NOT NULL,
    attempts     INT          NOT NULL,
    published_at DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    KEY consign_outbox_archive_id (id),
    KEY consign_outbox_archive_published_at (published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
