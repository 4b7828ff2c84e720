-- consign outbox archive (optional, `relay.archive = true`): published rows
-- are moved here instead of deleted, into one partition per UTC day of
-- publication. Retention drops whole partitions (`DROP TABLE`), never
-- deletes row by row, so it costs nothing however large the archive is.

CREATE TABLE consign_outbox_archive (
    seq          bigint      NOT NULL,
    id           uuid        NOT NULL,
    partition    smallint    NOT NULL,
    topic        text        NOT NULL,
    key          text,
    event_type   text        NOT NULL,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL,
    traceparent  text,
    tracestate   text,
    created_at   timestamptz NOT NULL,
    attempts     integer     NOT NULL,
    -- When the broker acknowledged it (the partition key).
    published_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (published_at);

CREATE INDEX consign_outbox_archive_id ON consign_outbox_archive (id);

-- Catches rows of days whose partition was not created in time (the relay
-- creates today's and the next two days' partitions every hour).
CREATE TABLE consign_outbox_archive_default PARTITION OF consign_outbox_archive DEFAULT;

-- Creates the partition of one UTC day, consign_outbox_archive_YYYYMMDD, if
-- it does not exist. Returns its name, or NULL when the default partition
-- already holds rows of that day (they stay there; retention deletes them).
CREATE FUNCTION consign_archive_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'consign_outbox_archive_' || to_char(day, 'YYYYMMDD');
    low  timestamptz := day::timestamp AT TIME ZONE 'UTC';
    high timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN name;
    END IF;
    IF EXISTS (SELECT 1 FROM consign_outbox_archive_default
               WHERE published_at >= low AND published_at < high) THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS %I PARTITION OF consign_outbox_archive FOR VALUES FROM (%L) TO (%L)',
        name, low, high);
    RETURN name;
END
$$;

COMMENT ON TABLE consign_outbox_archive IS
    'consign: published outbox rows, partitioned by UTC day of publication (relay.archive)';
