-- The relay reads the rows waiting for a retry (next_attempt_at in the
-- future) before each batch. PostgreSQL and SQLite keep them in a partial
-- index (0001); MySQL has none, and without this index that read scanned the
-- whole outbox per batch. NULLs (rows not waiting) sort first and are never
-- in the range read.
CREATE INDEX consign_outbox_retry ON consign_outbox (next_attempt_at);
