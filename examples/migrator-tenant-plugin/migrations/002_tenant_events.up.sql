-- The target: the same events labelled with the tenant they belong to. The dedup window lets
-- ClickHouse drop a replayed batch by its insert_deduplication_token (the backfill checks it).
CREATE TABLE {db}.tenant_events
(
    tenant String,
    id UInt64,
    kind LowCardinality(String),
    payload String
)
ENGINE = MergeTree
ORDER BY (tenant, id)
SETTINGS non_replicated_deduplication_window = 1000;
