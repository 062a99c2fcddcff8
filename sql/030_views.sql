-- Dashboard rollups, hours and days in UTC. The unique indexes let
-- REFRESH MATERIALIZED VIEW CONCURRENTLY run without blocking readers.

CREATE MATERIALIZED VIEW IF NOT EXISTS sales_hourly AS
SELECT date_trunc('hour', order_timestamp, 'UTC') AS hour,
       category,
       count(*)::bigint                    AS order_count,
       sum(quantity)::bigint               AS units_sold,
       sum(total_amount_usd)::numeric(22, 2) AS revenue_usd
FROM orders
GROUP BY 1, 2;
CREATE UNIQUE INDEX IF NOT EXISTS sales_hourly_hour_category_key
    ON sales_hourly (hour, category);

CREATE MATERIALIZED VIEW IF NOT EXISTS product_performance_daily AS
SELECT (order_timestamp AT TIME ZONE 'UTC')::date AS day,
       product_id,
       count(*)::bigint                    AS order_count,
       sum(quantity)::bigint               AS units_sold,
       sum(total_amount_usd)::numeric(22, 2) AS revenue_usd
FROM orders
GROUP BY 1, 2;
CREATE UNIQUE INDEX IF NOT EXISTS product_performance_daily_day_product_key
    ON product_performance_daily (day, product_id);
