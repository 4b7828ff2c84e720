-- Version 5 on every backend: MySQL indexes next_attempt_at here (it has no
-- partial indexes). On PostgreSQL the partial index consign_outbox_failed of
-- 0001 already serves the relay's read of rows waiting for a retry; this
-- only documents it.
COMMENT ON INDEX consign_outbox_failed IS
    'consign: rows waiting for a retry, read by the relay before each batch';
