-- Version 5 on every backend: MySQL indexes next_attempt_at here (it has no
-- partial indexes). On SQLite the partial index consign_outbox_failed of 0001
-- already serves the relay's read of rows waiting for a retry (the relay
-- names it with INDEXED BY); nothing to add.
CREATE INDEX IF NOT EXISTS consign_outbox_failed ON consign_outbox (topic, "key", seq)
    WHERE next_attempt_at IS NOT NULL;
