-- Transactional outbox of promoted orders (fan-out, README "Fan-out"). Promotion writes one
-- row per promoted batch, listing the order ids that batch inserted into `orders`, in the
-- transaction that inserts them; so a row exists exactly when its orders are in `orders`.
-- The relay (`orders-pipeline relay`, and every promotion after it commits) adds one entry
-- per order to the Redis stream `{P}:promoted`, oldest row first, and deletes the row once
-- its entries are in Redis: a relay killed in between publishes that row again (at least
-- once; each copy carries the order id as its idempotency key).
CREATE TABLE IF NOT EXISTS promoted_outbox (
    outbox_id  bigserial PRIMARY KEY,
    batch_id   text NOT NULL,
    order_ids  text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
