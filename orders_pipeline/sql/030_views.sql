-- Dashboard views, hours and days in UTC.
--
-- Promotion keeps two rollup tables up to date in the same transaction that inserts into
-- `orders` (only rows actually inserted count), so making the views fresh costs time in
-- proportion to the rollups (hours x categories, days x products), not to `orders`
-- (`orders-pipeline init-db` fills empty rollups from existing orders). The
-- materialized views are snapshots of the rollups; their unique indexes let
-- REFRESH MATERIALIZED VIEW CONCURRENTLY run without blocking readers.

CREATE TABLE IF NOT EXISTS sales_hourly_rollup (
    hour         timestamptz NOT NULL,
    category     text NOT NULL,
    order_count  bigint NOT NULL,
    units_sold   bigint NOT NULL,
    revenue_usd  numeric(22, 2) NOT NULL,
    PRIMARY KEY (hour, category)
);

CREATE TABLE IF NOT EXISTS product_daily_rollup (
    day          date NOT NULL,
    product_id   text NOT NULL,
    order_count  bigint NOT NULL,
    units_sold   bigint NOT NULL,
    revenue_usd  numeric(22, 2) NOT NULL,
    PRIMARY KEY (day, product_id)
);

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
