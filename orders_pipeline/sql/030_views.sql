-- Dashboard views, hours and days in UTC.
--
-- Promotion keeps two rollup tables up to date in the same transaction that inserts into
-- `orders` (only rows actually inserted count), so making the views fresh costs time in
-- proportion to the rollups (hours x categories, days x products), not to `orders`
-- (`orders-pipeline init-db` fills empty rollups from existing orders). The dashboard names
-- `sales_hourly` and `product_performance_daily` are plain views over one materialized view
-- per UTC month of these rollups, each refreshed CONCURRENTLY when its month changed: see
-- 080_view_slices.sql and postgres_patterns/views.py.

-- Width of the sums. A rollup row adds up the orders of one UTC hour and category (or day and
-- product), and must hold the sum of every order that can be stored, however many fall into
-- one hour. Storage bounds how many: a Postgres table holds at most 32 TiB (2^32 pages of
-- 8 KiB = 2^45 bytes), and every row of `orders` takes at least 32 bytes of it (a 4-byte line
-- pointer and a 24-byte tuple header, before the 4 bytes of `quantity` alone), so `orders`
-- has fewer than 2^45 / 2^5 = 2^40 (about 1.1 x 10^12) rows, all of them in one hour at worst.
-- * revenue_usd: each order's total_amount_usd is numeric(22, 2), so below 10^20; a sum is
--   below 2^40 x 10^20 < 1.1 x 10^32. numeric(38, 2) holds anything below 10^36: room for a
--   thousand such tables (partitions of `orders`) all holding the same hour.
-- * units_sold: quantity is `integer`, below 2^31 (the contract accepts at most 10^6, but the
--   column, older rows and hand edits allow more), so a sum is below 2^71 (about 2.4 x 10^21),
--   more than bigint holds (2^63 - 1, about 9.2 x 10^18): numeric(38, 0), with the same room.
--   The rollup SQL sums quantity as bigint (postgres_patterns/views.py), which Postgres adds
--   up as numeric, so no intermediate sum overflows either.
-- * order_count: below 2^40, far inside bigint.
CREATE TABLE IF NOT EXISTS sales_hourly_rollup (
    hour         timestamptz NOT NULL,
    category     text NOT NULL,
    order_count  bigint NOT NULL,
    units_sold   numeric(38, 0) NOT NULL,
    revenue_usd  numeric(38, 2) NOT NULL,
    PRIMARY KEY (hour, category)
);

CREATE TABLE IF NOT EXISTS product_daily_rollup (
    day          date NOT NULL,
    product_id   text NOT NULL,
    order_count  bigint NOT NULL,
    units_sold   numeric(38, 0) NOT NULL,
    revenue_usd  numeric(38, 2) NOT NULL,
    PRIMARY KEY (day, product_id)
);

-- Databases created with narrower sums (units_sold bigint, revenue_usd numeric(22, 2)): widen
-- them, keeping every row. The views depend on these columns, so they are dropped first:
-- the dashboard names (a materialized view in databases from before the month slices, a
-- plain view since), the old whole-history materialized view kept during the migration to
-- slices, and every month slice (listed in `view_slices`). 080_view_slices.sql then rebuilds
-- the dashboard names from the widened rollups and marks every month for its slice to be
-- created again. Only when a type differs, so applying this file again changes nothing.
DO $$
DECLARE
    relation record;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid IN ('sales_hourly_rollup'::regclass,
                                  'product_daily_rollup'::regclass)
                 AND NOT attisdropped
                 AND ((attname = 'units_sold'
                       AND format_type(atttypid, atttypmod) <> 'numeric(38,0)')
                   OR (attname = 'revenue_usd'
                       AND format_type(atttypid, atttypmod) <> 'numeric(38,2)'))) THEN
        FOR relation IN
            SELECT c.relname::text AS name, c.relkind
            FROM pg_class c
            WHERE c.relnamespace = current_schema()::regnamespace
              AND c.relkind IN ('v', 'm')
              AND c.relname IN ('sales_hourly', 'product_performance_daily',
                                'sales_hourly_legacy', 'product_performance_daily_legacy')
            ORDER BY c.relkind DESC  -- the plain views (v) before what they read (m)
        LOOP
            EXECUTE format(CASE relation.relkind WHEN 'v' THEN 'DROP VIEW %I'
                                                 ELSE 'DROP MATERIALIZED VIEW %I' END,
                           relation.name);
        END LOOP;
        IF to_regclass('view_slices') IS NOT NULL THEN
            FOR relation IN SELECT relation_name AS name FROM view_slices LOOP
                EXECUTE format('DROP MATERIALIZED VIEW IF EXISTS %I', relation.name);
            END LOOP;
            DELETE FROM view_slices;
        END IF;
        ALTER TABLE sales_hourly_rollup
            ALTER COLUMN units_sold TYPE numeric(38, 0),
            ALTER COLUMN revenue_usd TYPE numeric(38, 2);
        ALTER TABLE product_daily_rollup
            ALTER COLUMN units_sold TYPE numeric(38, 0),
            ALTER COLUMN revenue_usd TYPE numeric(38, 2);
    END IF;
END $$;
