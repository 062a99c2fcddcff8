-- Promotion by queue shard (issue 12, item 4).
--
-- The queue and the dedup window are split over REDIS_SHARDS shards; each staged batch comes
-- from one of them, and the ledger records which (`stage_batch`, from the worker). Promotion
-- rounds of different shards run at the same time, each shard's rounds one at a time
-- (`promotion.promote_round(conn, shard=s)`). Batches staged before this column existed, and
-- batches of an unsharded deployment, are shard 0.
--
-- Only when the column is missing: ADD COLUMN IF NOT EXISTS would take an ACCESS EXCLUSIVE
-- lock on the ledger at every `init-db`, queueing every worker and promoter behind it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'ingest_batches'
                     AND column_name = 'shard') THEN
        ALTER TABLE ingest_batches ADD COLUMN shard smallint NOT NULL DEFAULT 0;
    END IF;
END $$;

-- A shard's staged batches, oldest first (what a shard's round reads and locks), and the
-- shards that have any (`promotion.staged_shards`). Partial: staged batches are few, however
-- long the ledger grows.
CREATE INDEX IF NOT EXISTS ingest_batches_staged_shard_idx
    ON ingest_batches (shard, staged_at, batch_id) WHERE status = 'staged';
