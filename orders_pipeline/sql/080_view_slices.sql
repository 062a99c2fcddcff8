-- The dashboard views, sliced by UTC month (issue 10, item 2).
--
-- `sales_hourly` and `product_performance_daily` are plain views (same names, columns and
-- types as ever) that UNION ALL one materialized view per UTC month and view, e.g.
-- `sales_hourly_m202611` and `product_performance_daily_m202611`. Each month view selects
-- one month of its rollup by a range on the rollup's primary key, so a
-- `REFRESH MATERIALIZED VIEW CONCURRENTLY` of it reads and diffs that month only, and has the
-- unique index a concurrent refresh needs plus one on what dashboards filter by. Readers are
-- never blocked by a refresh. Freshness therefore costs time in proportion to the months a
-- batch changed, not to the history.
--
-- The month views are created, refreshed and re-pointed by `postgres_patterns/views.py`
-- (identifiers composed with psycopg's `sql.Identifier` from a validated month); this file
-- holds what Postgres itself must do:
-- * `view_slices`: the month views that exist (one row per view and month, with the
--   relation's name, whether the dashboard view reads it yet, when it was created and last
--   refreshed, and how often).
-- * `view_slices_stale`: which months changed since their view was last refreshed. Statement
--   level triggers on both rollups (with transition tables) add one row per month a
--   statement inserted, updated or deleted rollup rows of, whatever wrote them: promotion,
--   replay, re-drive, `rebuild_rollups` or a hand edit (TRUNCATE marks every month view of
--   that rollup). Rows are only ever inserted by writers (never updated), so concurrent
--   promotions never wait for each other here; a refresh deletes exactly the rows it read
--   before it refreshed (by `marked_seq`), so a mark added meanwhile survives.
-- * Migration of a database from before the slices: its materialized view `sales_hourly` is
--   renamed `sales_hourly_legacy`, and the plain view `sales_hourly` reads it as it is, so
--   dashboards see exactly what they saw; every month present in the rollup is marked. The
--   next refresh creates those months' views, points `sales_hourly` at them and drops the
--   legacy view (and likewise `product_performance_daily`). A new database starts the same
--   way with an empty legacy view. Applying this file again changes nothing.

CREATE TABLE IF NOT EXISTS view_slices (
    view_name     text NOT NULL
                  CHECK (view_name IN ('sales_hourly', 'product_performance_daily')),
    month         date NOT NULL CHECK (extract(day FROM month) = 1),
    relation_name text NOT NULL UNIQUE,
    in_union      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    refreshed_at  timestamptz,
    refreshes     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (view_name, month)
);

CREATE TABLE IF NOT EXISTS view_slices_stale (
    marked_seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    view_name  text NOT NULL,
    month      date NOT NULL,
    marked_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS view_slices_stale_slice_idx ON view_slices_stale (view_name, month);

-- The UTC month of a rollup key: the first day of that month.
CREATE OR REPLACE FUNCTION view_slice_month(hour timestamptz) RETURNS date
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_trunc('month', hour AT TIME ZONE 'UTC')::date $$;
CREATE OR REPLACE FUNCTION view_slice_month(day date) RETURNS date
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_trunc('month', day::timestamp)::date $$;

-- Statement-level trigger on a rollup: mark the months its transition tables touched (the
-- new rows of INSERT and UPDATE, the old rows of UPDATE and DELETE), one row per month, in
-- month order. TRUNCATE has no transition table: it marks every month view of the rollup.
CREATE OR REPLACE FUNCTION view_slices_mark() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    marked text := CASE TG_TABLE_NAME WHEN 'sales_hourly_rollup' THEN 'sales_hourly'
                                    ELSE 'product_performance_daily' END;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO view_slices_stale (view_name, month)
        SELECT view_name, month FROM view_slices WHERE view_name = marked ORDER BY month;
    ELSIF TG_TABLE_NAME = 'sales_hourly_rollup' THEN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO view_slices_stale (view_name, month)
            SELECT DISTINCT marked, view_slice_month(hour) FROM new_rows ORDER BY 2;
        ELSIF TG_OP = 'UPDATE' THEN
            INSERT INTO view_slices_stale (view_name, month)
            SELECT marked, m FROM (SELECT view_slice_month(hour) FROM new_rows
                                 UNION SELECT view_slice_month(hour) FROM old_rows) AS t(m)
            ORDER BY 2;
        ELSE
            INSERT INTO view_slices_stale (view_name, month)
            SELECT DISTINCT marked, view_slice_month(hour) FROM old_rows ORDER BY 2;
        END IF;
    ELSE
        IF TG_OP = 'INSERT' THEN
            INSERT INTO view_slices_stale (view_name, month)
            SELECT DISTINCT marked, view_slice_month(day) FROM new_rows ORDER BY 2;
        ELSIF TG_OP = 'UPDATE' THEN
            INSERT INTO view_slices_stale (view_name, month)
            SELECT marked, m FROM (SELECT view_slice_month(day) FROM new_rows
                                 UNION SELECT view_slice_month(day) FROM old_rows) AS t(m)
            ORDER BY 2;
        ELSE
            INSERT INTO view_slices_stale (view_name, month)
            SELECT DISTINCT marked, view_slice_month(day) FROM old_rows ORDER BY 2;
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- The triggers, created only when missing: CREATE OR REPLACE TRIGGER would lock the rollups
-- against promotion at every `init-db`.
DO $$
DECLARE
    rollup text;
    event record;
BEGIN
    FOREACH rollup IN ARRAY ARRAY['sales_hourly_rollup', 'product_daily_rollup'] LOOP
        FOR event IN
            SELECT * FROM (VALUES
                ('inserted', 'INSERT', 'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT'),
                ('updated', 'UPDATE',
                 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT'),
                ('deleted', 'DELETE', 'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT'),
                ('truncated', 'TRUNCATE', 'FOR EACH STATEMENT')) AS e(suffix, op, rest)
        LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_trigger
                           WHERE tgrelid = rollup::regclass
                             AND tgname = rollup || '_slices_' || event.suffix) THEN
                EXECUTE format('CREATE TRIGGER %I AFTER %s ON %I %s'
                               ' EXECUTE FUNCTION view_slices_mark()',
                               rollup || '_slices_' || event.suffix, event.op, rollup,
                               event.rest);
            END IF;
        END LOOP;
    END LOOP;
END $$;

-- The dashboard names. A materialized view of that name (a database from before the slices)
-- becomes `<name>_legacy`; a missing one (a new database, or one whose rollups were just
-- widened by 030_views.sql) gets a legacy view built from its rollup. The name then becomes
-- a plain view reading the legacy view, and every month of the rollup is marked, so the next
-- refresh moves the name onto month views. A plain view of that name is left as it is.
DO $$
DECLARE
    target record;
    kind "char";
BEGIN
    FOR target IN
        SELECT * FROM (VALUES
            ('sales_hourly', 'sales_hourly_rollup', 'hour, category',
             'view_slice_month(hour)'),
            ('product_performance_daily', 'product_daily_rollup', 'day, product_id',
             'view_slice_month(day)')) AS t(view_name, rollup, key_columns, month_of)
    LOOP
        SELECT c.relkind INTO kind FROM pg_class c
        WHERE c.oid = to_regclass(quote_ident(target.view_name));
        CONTINUE WHEN kind = 'v';
        IF kind = 'm' THEN
            EXECUTE format('ALTER MATERIALIZED VIEW %I RENAME TO %I',
                           target.view_name, target.view_name || '_legacy');
        ELSIF to_regclass(quote_ident(target.view_name || '_legacy')) IS NULL THEN
            EXECUTE format('CREATE MATERIALIZED VIEW %I AS'
                           ' SELECT %s, order_count, units_sold, revenue_usd FROM %I',
                           target.view_name || '_legacy', target.key_columns, target.rollup);
        END IF;
        EXECUTE format('CREATE VIEW %I AS'
                       ' SELECT %s, order_count, units_sold, revenue_usd FROM %I',
                       target.view_name, target.key_columns, target.view_name || '_legacy');
        EXECUTE format('INSERT INTO view_slices_stale (view_name, month)'
                       ' SELECT DISTINCT %L, %s FROM %I ORDER BY 2',
                       target.view_name, target.month_of, target.rollup);
    END LOOP;
END $$;
