-- Re-driving rejected orders, and the change counters of the lookup tables.
-- Idempotent: applied by `orders-pipeline init-db` every time, after 010-030.

------------------------------------------------------------------------------------------
-- Re-drive (`orders-pipeline requeue-rejected`, Dagster job `redrive_rejected`).
--
-- A request selects rows of `orders_rejected` by its filters and, in ONE transaction, records
-- itself (`redrives`), marks each selected row with the batch and position it goes back under
-- (`redriven_rows`; the primary key lets a rejected row be re-driven at most once, ever) and
-- writes those batches into an outbox (`redrive_batches`, pushed_at NULL: pending). Each
-- batch is then pushed to Redis under its own id (an atomic MULTI that also leaves a marker,
-- so a retry never pushes it twice) and marked pushed. Whatever dies when, the next request
-- (or promotion) pushes what is still pending. The outcome of each row is the view
-- `redrive_outcomes`.
------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS redrives (
    redrive_id    text PRIMARY KEY,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    filters       jsonb NOT NULL,
    selected_rows integer NOT NULL,
    batches       integer NOT NULL
);

CREATE TABLE IF NOT EXISTS redrive_batches (
    batch_id    text PRIMARY KEY,
    redrive_id  text NOT NULL REFERENCES redrives,
    rows        integer NOT NULL,
    pushed_at   timestamptz
);
CREATE INDEX IF NOT EXISTS redrive_batches_pending_idx ON redrive_batches (batch_id)
    WHERE pushed_at IS NULL;
CREATE INDEX IF NOT EXISTS redrive_batches_redrive_idx ON redrive_batches (redrive_id);

-- (batch_id, batch_position): the rejected row (key of `orders_rejected`);
-- (redrive_batch_id, redrive_position): where its payload went back into the pipeline, which
-- is also where a new reject of it is recorded. The raw payload (byte for byte) and order id
-- are copied here when the row is marked, so a pending batch never depends on its rejected
-- rows still being there when it is pushed.
CREATE TABLE IF NOT EXISTS redriven_rows (
    batch_id         text NOT NULL,
    batch_position   integer NOT NULL,
    redrive_batch_id text NOT NULL
        REFERENCES redrive_batches DEFERRABLE INITIALLY DEFERRED,
    redrive_position integer NOT NULL,
    raw_payload      bytea NOT NULL,
    order_id         text,
    PRIMARY KEY (batch_id, batch_position),
    UNIQUE (redrive_batch_id, redrive_position)
);

-- What became of each re-driven row: pending (not pushed yet), queued (pushed, not promoted
-- yet), promoted, rejected (again, with new_reason), duplicate (its order_id was already
-- taken: dropped by the dedup window or a promotion conflict), quarantined.
CREATE OR REPLACE VIEW redrive_outcomes AS
SELECT d.redrive_id, x.batch_id, x.batch_position, x.order_id, r.reason,
       x.redrive_batch_id, x.redrive_position,
       CASE WHEN d.pushed_at IS NULL THEN 'pending'
            WHEN again.batch_id IS NOT NULL THEN 'rejected'
            WHEN o.order_id IS NOT NULL THEN 'promoted'
            WHEN l.status = 'promoted' THEN 'duplicate'
            WHEN l.status = 'quarantined' THEN 'quarantined'
            ELSE 'queued' END AS outcome,
       again.reason AS new_reason
FROM redriven_rows x
JOIN redrive_batches d ON d.batch_id = x.redrive_batch_id
LEFT JOIN orders_rejected r ON r.batch_id = x.batch_id AND r.batch_position = x.batch_position
LEFT JOIN orders_rejected again
    ON again.batch_id = x.redrive_batch_id AND again.batch_position = x.redrive_position
LEFT JOIN orders o ON o.order_id = x.order_id AND o.batch_id = x.redrive_batch_id
LEFT JOIN ingest_batches l ON l.batch_id = x.redrive_batch_id;

------------------------------------------------------------------------------------------
-- Change counters of the lookup tables: the lookup snapshot follows its sources.
--
-- Every statement that changes rows of products, currencies or zip_codes (or truncates one)
-- adds 1 to that table's `version` and logs the change with its time. The counter row is
-- updated under its row lock, so versions grow in commit order: a snapshot that records the
-- versions it read before copying the tables covers at least those changes, and a reader
-- that sees a higher version knows the snapshot is behind (`lookup_sources_sensor`).
------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS lookup_source_versions (
    table_name text PRIMARY KEY,
    version    bigint NOT NULL DEFAULT 0,
    changed_at timestamptz
);
INSERT INTO lookup_source_versions (table_name)
VALUES ('products'), ('currencies'), ('zip_codes')
ON CONFLICT (table_name) DO NOTHING;

CREATE TABLE IF NOT EXISTS lookup_source_changes (
    table_name text NOT NULL,
    version    bigint NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (table_name, version)
);

CREATE OR REPLACE FUNCTION lookup_source_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_version bigint;
BEGIN
    -- `changed` is the statement's transition table (absent for TRUNCATE): a statement that
    -- changed no row (e.g. the seed's ON CONFLICT DO NOTHING on a second init-db) is no change.
    IF TG_OP <> 'TRUNCATE' THEN
        IF NOT EXISTS (SELECT 1 FROM changed) THEN
            RETURN NULL;
        END IF;
    END IF;
    UPDATE lookup_source_versions SET version = version + 1, changed_at = now()
    WHERE table_name = TG_TABLE_NAME
    RETURNING version INTO new_version;
    INSERT INTO lookup_source_changes (table_name, version, changed_at)
    VALUES (TG_TABLE_NAME, new_version, now());
    RETURN NULL;
END $$;

DO $$
DECLARE
    source text;
    event record;
BEGIN
    FOREACH source IN ARRAY ARRAY['products', 'currencies', 'zip_codes'] LOOP
        FOR event IN
            SELECT * FROM (VALUES ('inserted', 'INSERT', 'REFERENCING NEW TABLE AS changed'),
                                  ('updated', 'UPDATE', 'REFERENCING NEW TABLE AS changed'),
                                  ('deleted', 'DELETE', 'REFERENCING OLD TABLE AS changed'),
                                  ('truncated', 'TRUNCATE', '')) AS e(suffix, op, transition)
        LOOP
            EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER %s ON %I %s FOR EACH STATEMENT'
                           ' EXECUTE FUNCTION lookup_source_changed()',
                           source || '_' || event.suffix, event.op, source, event.transition);
        END LOOP;
    END LOOP;
END $$;
