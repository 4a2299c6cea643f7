-- Tracking table for resumable backfills. The backfill plugin also creates it when missing,
-- so this migration documents the table and makes it exist from the first deploy.
-- Rows are insert-only versions: the newest `version` of a backfill_id is its state.
CREATE DATABASE IF NOT EXISTS db_management;

CREATE TABLE IF NOT EXISTS db_management.backfills (
    backfill_id String,                        -- "{db_name}_{migration_version}"
    migration_version UInt64,
    db_name String,
    status String,                             -- pending, running, paused, completed, failed
    checkpoint_data String,                    -- JSON: position, in-flight range, params, lease, ...
    rows_processed UInt64,
    started_at Nullable(DateTime64(3)),
    updated_at DateTime64(3) DEFAULT now64(3),
    completed_at Nullable(DateTime64(3)),
    error_log Nullable(String),
    version UInt64,                            -- strictly increasing per write (ns), newest wins
    writer String DEFAULT ''                   -- who wrote this version (runner lease or operator)
) ENGINE = MergeTree
ORDER BY (db_name, migration_version, version);
