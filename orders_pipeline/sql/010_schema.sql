-- Tables of the orders pipeline. Idempotent: applied by `orders-pipeline init-db` every time.

CREATE TABLE IF NOT EXISTS products (
    product_id  text PRIMARY KEY,
    name        text NOT NULL,
    category    text NOT NULL,
    base_price  numeric(12, 2) NOT NULL CHECK (base_price >= 0)
);

CREATE TABLE IF NOT EXISTS currencies (
    currency_code char(3) PRIMARY KEY,
    name          text NOT NULL,
    -- USD value of ONE unit of the currency (EUR ~ 1.08, JPY ~ 0.0067). Below 10^4 (the
    -- dearest currency, KWD, is ~3.3): the order contract's unit_price bound relies on it
    -- (orders_pipeline/contract.py).
    rate_to_usd   numeric(12, 8) NOT NULL CHECK (rate_to_usd > 0)
);
-- Databases created before that bound: narrow the column (fails loudly if a rate exceeds it).
DO $$
BEGIN
    IF (SELECT numeric_precision FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'currencies'
          AND column_name = 'rate_to_usd') <> 12 THEN
        ALTER TABLE currencies ALTER COLUMN rate_to_usd TYPE numeric(12, 8);
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS zip_codes (
    zip_code      text PRIMARY KEY,
    city          text NOT NULL,
    state         char(2) NOT NULL,
    region        text NOT NULL,
    shipping_zone smallint NOT NULL
);

-- Landing zone for COPY. UNLOGGED: fast, and emptied by a crash, which is why a batch stays
-- in Redis until its rows are promoted (see ingest_batches).
CREATE UNLOGGED TABLE IF NOT EXISTS orders_staging (
    batch_id         text NOT NULL,
    batch_position   integer NOT NULL,
    order_id         text NOT NULL,
    customer_id      bigint NOT NULL,
    product_id       text NOT NULL,
    quantity         integer NOT NULL,
    unit_price       numeric(18, 4) NOT NULL,
    currency         text NOT NULL,
    zip_code         text NOT NULL,
    order_timestamp  timestamptz NOT NULL,
    total_amount     numeric(24, 4) NOT NULL,
    total_amount_usd numeric(22, 2) NOT NULL,
    category         text NOT NULL,
    region           text NOT NULL,
    shipping_zone    smallint NOT NULL,
    staged_at        timestamptz NOT NULL DEFAULT now()
);

-- `orders` (partitioned by month) and its id guard `order_ids`: 015_partitioned_orders.sql.

-- Every rejected payload, byte for byte, with the reason. (batch_id, batch_position) makes a
-- retried batch write its rejects once.
CREATE TABLE IF NOT EXISTS orders_rejected (
    batch_id        text NOT NULL,
    batch_position  integer NOT NULL,
    raw_payload     bytea NOT NULL,
    reason          text NOT NULL,
    order_id        text,
    rejected_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, batch_position)
);
CREATE INDEX IF NOT EXISTS orders_rejected_rejected_at_idx ON orders_rejected (rejected_at);

-- Ledger of claimed batches (logged, unlike staging): which batches are staged, promoted,
-- were lost from staging by a crash and must be staged again, or are quarantined: their
-- promotion failed for a reason retrying cannot fix (SQLSTATE class 22 or 23), recorded in
-- quarantine_error, so they were set aside for `orders-pipeline readmit` instead of blocking
-- the other batches. quarantine_error and quarantined_at stay as history after a re-admission.
CREATE TABLE IF NOT EXISTS ingest_batches (
    batch_id         text PRIMARY KEY,
    status           text NOT NULL CONSTRAINT ingest_batches_status_check
                         CHECK (status IN ('staged', 'promoted', 'lost', 'quarantined')),
    claimed_rows     integer NOT NULL,
    staged_rows      integer NOT NULL,
    rejected_rows    integer NOT NULL,
    duplicate_rows   integer NOT NULL,
    attempts         integer NOT NULL DEFAULT 1,
    staged_at        timestamptz NOT NULL DEFAULT now(),
    promoted_at      timestamptz,
    quarantine_error text,
    quarantined_at   timestamptz
);
-- Databases created before quarantine existed: allow the status, add its columns.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'ingest_batches'
                     AND column_name = 'quarantine_error') THEN
        ALTER TABLE ingest_batches
            DROP CONSTRAINT ingest_batches_status_check,
            ADD CONSTRAINT ingest_batches_status_check
                CHECK (status IN ('staged', 'promoted', 'lost', 'quarantined')),
            ADD COLUMN quarantine_error text,
            ADD COLUMN quarantined_at timestamptz;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS ingest_batches_staged_idx ON ingest_batches (batch_id)
    WHERE status = 'staged';
CREATE INDEX IF NOT EXISTS ingest_batches_quarantined_idx ON ingest_batches (quarantined_at)
    WHERE status = 'quarantined';

-- Raw payloads of quarantined batches, byte for byte and in batch order (the whole claimed
-- batch, rejects and duplicates included), copied from the Redis batch list when the batch
-- was quarantined. `orders-pipeline readmit` restores the list from here if Redis lost it,
-- then deletes them.
CREATE TABLE IF NOT EXISTS quarantined_payloads (
    batch_id        text NOT NULL,
    batch_position  integer NOT NULL,
    raw_payload     bytea NOT NULL,
    PRIMARY KEY (batch_id, batch_position)
);

-- One row per promotion transaction; inserted < staged means ids already in `orders`.
CREATE TABLE IF NOT EXISTS promotions (
    promotion_id  bigserial PRIMARY KEY,
    promoted_at   timestamptz NOT NULL DEFAULT now(),
    batches       integer NOT NULL,
    staged_rows   bigint NOT NULL,
    inserted_rows bigint NOT NULL
);
