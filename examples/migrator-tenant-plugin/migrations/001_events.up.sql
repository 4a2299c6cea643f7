-- The source: a table that already holds data when the backfill migration ships.
CREATE TABLE {db}.events
(
    id UInt64,
    kind LowCardinality(String),
    payload String
)
ENGINE = MergeTree
ORDER BY id;

INSERT INTO {db}.events
SELECT number, ['click', 'view', 'buy'][number % 3 + 1], concat('payload ''', toString(number), '''')
FROM numbers(1000);
