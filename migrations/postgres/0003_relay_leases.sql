-- consign relay coordination: several relays share the outbox by leasing its
-- 32 partitions. A lease has an owner, an expiry and an epoch; the epoch
-- grows every time the partition changes hands and is checked by every
-- delete and error update a relay makes, so a relay that lost a lease (paused
-- past its expiry, cut off from the database) cannot touch rows it no longer
-- owns.

CREATE TABLE consign_relay_leases (
    partition   smallint    PRIMARY KEY CHECK (partition >= 0 AND partition < 32),
    -- Relay instance holding the lease; NULL when released.
    owner       text,
    -- Fencing token: incremented on every acquisition.
    epoch       bigint      NOT NULL DEFAULT 0,
    -- The lease is free for another relay after this time (database clock).
    expires_at  timestamptz,
    acquired_at timestamptz
);

INSERT INTO consign_relay_leases (partition) SELECT generate_series(0, 31);

-- Running relays, with a heartbeat. Each relay divides the partitions by the
-- number of live rows here to find its fair share.
CREATE TABLE consign_relays (
    instance     text        PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

-- One row naming this outbox: the default prefix of the Kafka
-- transactional.id in transactions mode, shared by all relays of this
-- database and distinct from other outboxes on the same Kafka cluster.
CREATE TABLE consign_outbox_identity (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    outbox_id uuid    NOT NULL DEFAULT gen_random_uuid()
);

INSERT INTO consign_outbox_identity DEFAULT VALUES;

COMMENT ON TABLE consign_relay_leases IS
    'consign: which relay publishes which outbox partition (lease with fencing epoch)';
