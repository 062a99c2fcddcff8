-- `orders`, partitioned by UTC month of order_timestamp (issue 10, item 1), and `order_ids`,
-- the guard that keeps every order_id stored at most once across the partitions.
--
-- Why a guard. A partitioned table's unique keys must contain the partition key, so the key
-- of `orders` is (order_id, order_timestamp): it alone would store a late copy of an order
-- whose timestamp differs in another month. `order_ids` holds each stored id once, with the
-- timestamp of its stored row (so the row is found in one partition); promotion inserts a
-- batch's rows into `orders` and their ids into `order_ids` in one statement, and deletes, in
-- the same transaction, every row whose id the guard already held (postgres_patterns/
-- promotion.py). Lookups by id: `order_ids` gives the timestamp, then one partition.
--
-- Partitions are named `orders_pYYYYMM` and cover [first of the month, first of the next)
-- in UTC. `orders_ensure_months(months)` creates the missing ones (init-db creates the
-- current month and PARTITIONS_AHEAD after it; promotion creates those its rows need, so a
-- late or future-dated order always finds its month). `orders-pipeline retention` drops whole
-- months before a horizon (recorded in `orders_retention`) from `orders`, the rollups and the
-- month views, then their ids from `order_ids` (`partitions.apply_retention`); staging
-- rejects orders dated before it.
--
-- Migration: an unpartitioned `orders` (databases from before issue 10) is renamed, its
-- rows are copied into the partitioned table and the guard, and it is dropped, in the
-- transaction of `init-db`.

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class
               WHERE oid = to_regclass('orders') AND relkind = 'r') THEN
        -- Our view over `orders` would follow the renamed table; 040_redrive.sql makes it
        -- again over the partitioned one.
        DROP VIEW IF EXISTS redrive_outcomes;
        ALTER TABLE orders RENAME TO orders_unpartitioned;
        ALTER INDEX IF EXISTS orders_pkey RENAME TO orders_unpartitioned_pkey;
        ALTER INDEX IF EXISTS orders_order_timestamp_idx
            RENAME TO orders_unpartitioned_order_timestamp_idx;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS orders (
    order_id         text NOT NULL,
    customer_id      bigint NOT NULL,
    product_id       text NOT NULL,
    quantity         integer NOT NULL CHECK (quantity > 0),
    unit_price       numeric(18, 4) NOT NULL CHECK (unit_price >= 0),
    currency         text NOT NULL,
    zip_code         text NOT NULL,
    order_timestamp  timestamptz NOT NULL,
    total_amount     numeric(24, 4) NOT NULL,
    total_amount_usd numeric(22, 2) NOT NULL,
    category         text NOT NULL,
    region           text NOT NULL,
    shipping_zone    smallint NOT NULL,
    batch_id         text NOT NULL,
    promoted_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, order_timestamp)
) PARTITION BY RANGE (order_timestamp);
-- Time ranges within a month: a BRIN index costs next to nothing to keep (rows arrive in
-- about time order); a month is reached by partition pruning.
CREATE INDEX IF NOT EXISTS orders_order_timestamp_brin ON orders USING brin (order_timestamp);

CREATE TABLE IF NOT EXISTS order_ids (
    order_id        text PRIMARY KEY,
    order_timestamp timestamptz NOT NULL
);

-- The guard follows `orders` whatever changes it: an order deleted (by hand, or a replay's
-- rewrite) frees its id, so that a replay can bring it back; an order whose timestamp is
-- changed (a reprocess recomputing it) moves to its month's partition, and the guard keeps
-- its new timestamp. Statement-level, with transition tables: promotion's inserts pay
-- nothing. Retention drops whole partitions (no trigger fires) and deletes the ids itself.
CREATE OR REPLACE FUNCTION order_ids_follow_orders() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM order_ids g USING old_rows o
        WHERE g.order_id = o.order_id AND g.order_timestamp = o.order_timestamp;
    ELSE
        UPDATE order_ids g SET order_timestamp = n.order_timestamp
        FROM old_rows o JOIN new_rows n USING (order_id)
        WHERE g.order_id = o.order_id AND g.order_timestamp = o.order_timestamp
          AND n.order_timestamp <> o.order_timestamp;
    END IF;
    RETURN NULL;
END $$;

-- TRUNCATE orders (the whole table) empties the guard too (by DELETE: a TRUNCATE here would
-- collide with a TRUNCATE statement that names both tables). A partition truncated or
-- dropped by hand leaves its ids in the guard: the next copy of such an id is refused (and,
-- if dated as the stored row was, its refusal frees the id), never doubled; retention
-- removes every id dated before its horizon, whatever became of its row.
CREATE OR REPLACE FUNCTION order_ids_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM order_ids;
    RETURN NULL;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'orders'::regclass
                   AND tgname = 'orders_free_ids') THEN
        CREATE TRIGGER orders_free_ids AFTER DELETE ON orders
            REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
            EXECUTE FUNCTION order_ids_follow_orders();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'orders'::regclass
                   AND tgname = 'orders_truncate_ids') THEN
        CREATE TRIGGER orders_truncate_ids AFTER TRUNCATE ON orders
            FOR EACH STATEMENT EXECUTE FUNCTION order_ids_truncate();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'orders'::regclass
                   AND tgname = 'orders_move_ids') THEN
        CREATE TRIGGER orders_move_ids AFTER UPDATE ON orders
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
            EXECUTE FUNCTION order_ids_follow_orders();
    END IF;
END $$;

-- The retention horizon: orders dated before `horizon` (a first of a month, UTC) were dropped
-- and are rejected when staged; `dropped_orders` counts every order retention dropped (a term
-- of conservation). One row at most.
CREATE TABLE IF NOT EXISTS orders_retention (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    horizon        date NOT NULL CHECK (extract(day FROM horizon) = 1),
    applied_at     timestamptz NOT NULL DEFAULT now(),
    dropped_orders bigint NOT NULL DEFAULT 0
);

-- The partition of `orders` for the UTC month of `month` (a name, not yet a relation).
CREATE OR REPLACE FUNCTION orders_partition_name(month date) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT 'orders_p' || to_char(date_trunc('month', month), 'YYYYMM') $$;

-- The months of `months` (any day of a month stands for it; firsts of months returned,
-- ascending) that have no partition of `orders` and are not before the retention horizon.
-- Takes no lock.
CREATE OR REPLACE FUNCTION orders_missing_months(months date[]) RETURNS SETOF date
LANGUAGE sql STABLE
AS $$
    SELECT DISTINCT date_trunc('month', m)::date FROM unnest(months) AS m
    WHERE m IS NOT NULL
      AND to_regclass(quote_ident(orders_partition_name(m))) IS NULL
      AND date_trunc('month', m)::date
          >= coalesce((SELECT horizon FROM orders_retention), '-infinity'::date)
    ORDER BY 1
$$;

-- Create the partitions of `orders` missing for the months of `months` (as
-- `orders_missing_months`); returns how many it created. Checks without a lock first: the
-- usual call, where every month exists, takes none. A creation is serialised by an advisory
-- lock (two creators of one month would otherwise collide in the catalog) and locks `orders`
-- until the caller commits.
CREATE OR REPLACE FUNCTION orders_ensure_months(months date[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    month date;
    created integer := 0;
BEGIN
    FOR month IN SELECT orders_missing_months(months)
    LOOP
        PERFORM pg_advisory_xact_lock(hashtext('orders_pipeline.orders_partitions'));
        BEGIN  -- another creator may have committed it while we waited for the lock
            EXECUTE format('CREATE TABLE %I PARTITION OF orders FOR VALUES FROM (%L) TO (%L)',
                           orders_partition_name(month), month::timestamp AT TIME ZONE 'UTC',
                           (month + interval '1 month')::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        EXCEPTION WHEN duplicate_table THEN
            NULL;
        END;
    END LOOP;
    RETURN created;
END $$;

DO $$
BEGIN
    IF to_regclass('orders_unpartitioned') IS NOT NULL THEN
        PERFORM orders_ensure_months(ARRAY(
            SELECT DISTINCT date_trunc('month', order_timestamp AT TIME ZONE 'UTC')::date
            FROM orders_unpartitioned));
        INSERT INTO orders (order_id, customer_id, product_id, quantity, unit_price, currency,
                            zip_code, order_timestamp, total_amount, total_amount_usd,
                            category, region, shipping_zone, batch_id, promoted_at)
        SELECT order_id, customer_id, product_id, quantity, unit_price, currency, zip_code,
               order_timestamp, total_amount, total_amount_usd, category, region,
               shipping_zone, batch_id, promoted_at
        FROM orders_unpartitioned;
        INSERT INTO order_ids (order_id, order_timestamp)
        SELECT order_id, order_timestamp FROM orders_unpartitioned;
        DROP TABLE orders_unpartitioned;
    END IF;
END $$;

-- Created ahead: this month and the next three (promotion adds any other month it needs).
SELECT orders_ensure_months(ARRAY(
    SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + n * interval '1 month')::date
    FROM generate_series(0, 3) AS n));
