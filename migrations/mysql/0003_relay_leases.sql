-- consign relay coordination on MySQL 8 / MariaDB 10.6+
-- (see migrations/postgres/0003_relay_leases.sql).

CREATE TABLE consign_relay_leases (
    `partition` SMALLINT     NOT NULL PRIMARY KEY CHECK (`partition` >= 0 AND `partition` < 32),
    owner       VARCHAR(255),
    epoch       BIGINT       NOT NULL DEFAULT 0,
    expires_at  DATETIME(6),
    acquired_at DATETIME(6)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'consign: which relay publishes which outbox partition (lease with fencing epoch)';

INSERT INTO consign_relay_leases (`partition`)
WITH RECURSIVE p (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM p WHERE n < 31)
SELECT n FROM p;

CREATE TABLE consign_relays (
    instance     VARCHAR(255) NOT NULL PRIMARY KEY,
    host         VARCHAR(255) NOT NULL,
    pid          INT          NOT NULL,
    version      VARCHAR(64)  NOT NULL,
    started_at   DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    heartbeat_at DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    expires_at   DATETIME(6)  NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE consign_outbox_identity (
    singleton TINYINT    NOT NULL PRIMARY KEY DEFAULT 1 CHECK (singleton = 1),
    outbox_id BINARY(16) NOT NULL
) ENGINE = InnoDB;

-- A UUID naming this outbox (MySQL's and MariaDB's UUID() is version 1).
INSERT INTO consign_outbox_identity (outbox_id) VALUES (UNHEX(REPLACE(UUID(), '-', '')));
