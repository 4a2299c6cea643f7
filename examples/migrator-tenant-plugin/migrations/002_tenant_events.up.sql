-- The target: the same events labelled with the tenant they belong to.
CREATE TABLE {db}.tenant_events
(
    tenant String,
    id UInt64,
    kind LowCardinality(String),
    payload String
)
ENGINE = MergeTree
ORDER BY (tenant, id);
