-- Dashboard views, hours and days in UTC.
--
-- Promotion keeps two rollup tables up to date in the same transaction that inserts into
-- `orders` (only rows actually inserted count), so making the views fresh costs time in
-- proportion to the rollups (hours x categories, days x products), not to `orders`
-- (`orders-pipeline init-db` fills empty rollups from existing orders). The
-- materialized views are snapshots of the rollups; their unique indexes let
-- REFRESH MATERIALIZED VIEW CONCURRENTLY run without blocking readers.

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
-- them, keeping every row. The materialized views depend on these columns, so they are
-- dropped first and recreated (from the widened rollups) by the statements below; only when a
-- type differs, so applying this file again changes nothing.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid IN ('sales_hourly_rollup'::regclass,
                                  'product_daily_rollup'::regclass)
                 AND NOT attisdropped
                 AND ((attname = 'units_sold'
                       AND format_type(atttypid, atttypmod) <> 'numeric(38,0)')
                   OR (attname = 'revenue_usd'
                       AND format_type(atttypid, atttypmod) <> 'numeric(38,2)'))) THEN
        DROP MATERIALIZED VIEW IF EXISTS sales_hourly;
        DROP MATERIALIZED VIEW IF EXISTS product_performance_daily;
        ALTER TABLE sales_hourly_rollup
            ALTER COLUMN units_sold TYPE numeric(38, 0),
            ALTER COLUMN revenue_usd TYPE numeric(38, 2);
        ALTER TABLE product_daily_rollup
            ALTER COLUMN units_sold TYPE numeric(38, 0),
            ALTER COLUMN revenue_usd TYPE numeric(38, 2);
    END IF;
END $$;

CREATE MATERIALIZED VIEW IF NOT EXISTS sales_hourly AS
SELECT hour, category, order_count, units_sold, revenue_usd
FROM sales_hourly_rollup;
CREATE UNIQUE INDEX IF NOT EXISTS sales_hourly_hour_category_key
    ON sales_hourly (hour, category);

CREATE MATERIALIZED VIEW IF NOT EXISTS product_performance_daily AS
SELECT day, product_id, order_count, units_sold, revenue_usd
FROM product_daily_rollup;
CREATE UNIQUE INDEX IF NOT EXISTS product_performance_daily_day_product_key
    ON product_performance_daily (day, product_id);
