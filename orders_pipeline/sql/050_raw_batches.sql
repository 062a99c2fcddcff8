-- The raw archive and the replay of time windows.
-- Idempotent: applied by `orders-pipeline init-db` every time, after 010-040.

------------------------------------------------------------------------------------------
-- Replay (`orders-pipeline replay`, Dagster asset `replayed_orders`).
--
-- A request (`replays`) selects the archived batches of a window whose ledger says promoted
-- and, in ONE transaction, writes one replay batch per archived batch into an outbox
-- (`replay_batches`, pushed_at NULL: pending), named `<replay_id>-<source batch id>`. Each
-- is then pushed to Redis under that id (an atomic MULTI that also leaves a marker, as for a
-- re-drive, so a retry never pushes it twice) and marked pushed; its payloads are read from
-- the archive when it is pushed. A reprocess request makes promotion replace the stored
-- values of the orders its batches recompute; `reprocessed_orders` keeps the values they
-- replaced (one row per order row changed).
------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS replays (
    replay_id    text PRIMARY KEY,
    requested_at timestamptz NOT NULL DEFAULT now(),
    window_from  timestamptz NOT NULL,
    window_to    timestamptz NOT NULL,
    reprocess    boolean NOT NULL,
    batches      integer NOT NULL,
    orders       bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS replay_batches (
    batch_id           text PRIMARY KEY,
    replay_id          text NOT NULL REFERENCES replays,
    source_batch_id    text NOT NULL,
    source_archived_at timestamptz NOT NULL,
    orders             integer NOT NULL,
    pushed_at          timestamptz
);
CREATE INDEX IF NOT EXISTS replay_batches_pending_idx ON replay_batches (batch_id)
    WHERE pushed_at IS NULL;
CREATE INDEX IF NOT EXISTS replay_batches_replay_idx ON replay_batches (replay_id);

-- The values a reprocess replaced: the whole previous row of each order it changed, under
-- the replay batch that changed it. Promotion also reads it to drop rollup rows whose last
-- order moved away (order_count 0), so that the views equal a recompute from `orders`.
CREATE TABLE IF NOT EXISTS reprocessed_orders (
    replay_batch_id text NOT NULL,
    reprocessed_at  timestamptz NOT NULL DEFAULT now(),
    LIKE orders,
    PRIMARY KEY (replay_batch_id, order_id)
);

------------------------------------------------------------------------------------------
-- Raw archive: every claimed batch's raw payloads, byte for byte, one row per batch.
--
-- Written by `archive_raw_batch` in the staging transaction that first records the batch in
-- the ledger, so a batch is archived exactly when its ledger row exists (a crash that takes
-- the one back takes the other). `payloads` holds the batch's payloads in claim order, each
-- as a 4-byte big-endian length and its bytes, the whole compressed with zlib
-- (postgres_patterns/archive.py). A replay batch is not archived again (its worker passes
-- none): its bytes are archived under the batch it replays.
--
-- Partitioned by the UTC day of `archived_at` (`raw_batches_YYYYMMDD`). The first batch
-- staged on a day that finds no partition for the next day creates it (and today's, if
-- missing) and drops whole days older than RAW_RETENTION_DAYS, except a day that holds a
-- batch a replay still has to push (`raw_batches_prune`; `orders-pipeline replay --prune`
-- runs it at once). So that is the one staging transaction a day that takes a lock on
-- `raw_batches` (creating and dropping partitions does): the others only insert.
------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS raw_batches (
    archived_at timestamptz NOT NULL,
    batch_id    text NOT NULL,
    orders      integer NOT NULL,
    raw_bytes   bigint NOT NULL,
    payloads    bytea NOT NULL,
    PRIMARY KEY (archived_at, batch_id)
) PARTITION BY RANGE (archived_at);

CREATE OR REPLACE FUNCTION raw_batches_partition(day date) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'raw_batches_' || to_char(day, 'YYYYMMDD') $$;

-- The partition of one UTC day, created if missing; returns its name.
CREATE OR REPLACE FUNCTION raw_batches_add_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    part text := raw_batches_partition(day);
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('orders_pipeline.raw_batches'));
    IF to_regclass(part) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF raw_batches FOR VALUES FROM (%L) TO (%L)',
                       part, day::timestamp AT TIME ZONE 'UTC',
                       (day + 1)::timestamp AT TIME ZONE 'UTC');
    END IF;
    RETURN part;
END $$;

-- Drop the partitions of the UTC days before today - keep_days, except a day that holds the
-- source of a replay batch not pushed yet; returns the partitions dropped.
CREATE OR REPLACE FUNCTION raw_batches_prune(keep_days integer) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    oldest date := (now() AT TIME ZONE 'UTC')::date - keep_days;
    part record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('orders_pipeline.raw_batches'));
    FOR part IN
        SELECT c.relname::text AS name, to_date(right(c.relname, 8), 'YYYYMMDD') AS day
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'raw_batches'::regclass AND c.relname ~ '^raw_batches_[0-9]{8}$'
        ORDER BY 2
    LOOP
        CONTINUE WHEN part.day >= oldest OR EXISTS (
            SELECT 1 FROM replay_batches b
            WHERE b.pushed_at IS NULL
              AND b.source_archived_at >= part.day::timestamp AT TIME ZONE 'UTC'
              AND b.source_archived_at < (part.day + 1)::timestamp AT TIME ZONE 'UTC');
        EXECUTE format('DROP TABLE %I', part.name);
        RETURN NEXT part.name;
    END LOOP;
END $$;

-- Archive one claimed batch (inside its staging transaction).
CREATE OR REPLACE FUNCTION archive_raw_batch(p_batch_id text, p_orders integer,
                                             p_raw_bytes bigint, p_payloads bytea,
                                             p_keep_days integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    IF to_regclass(raw_batches_partition(today + 1)) IS NULL THEN
        PERFORM raw_batches_add_partition(today);
        PERFORM raw_batches_add_partition(today + 1);
        PERFORM raw_batches_prune(p_keep_days);
    END IF;
    INSERT INTO raw_batches (archived_at, batch_id, orders, raw_bytes, payloads)
    VALUES (now(), p_batch_id, p_orders, p_raw_bytes, p_payloads);
END $$;
