-- Validation for the calls_complete backfill: run by: migrate backfill validate 21, after it completes.
-- Each statement returns one row: check (name), expected, actual, ok (1 when they agree).
-- The source side is always the finalised calls_merged (GROUP BY project_id, id, with any() for the
-- SimpleAggregateFunction columns), restricted to what the backfill is responsible for:
-- completed calls (ended_at and started_at known) that started before the cutover (UTC).
-- Checks 1 to 3 scan the key columns of both tables and hold a hash set of keys (about
-- 300 MB for 2M calls), check 4 reads only a few granules of the wide columns.

-- 1. Every completed-before-cutover call is in calls_complete (expected 0 missing).
SELECT
    'missing_in_calls_complete' AS check,
    toUInt64(0) AS expected,
    count() AS actual,
    toUInt8(actual = expected) AS ok
FROM
(
    SELECT project_id, id
    FROM {db}.calls_merged
    GROUP BY project_id, id
    HAVING any(ended_at) IS NOT NULL
       AND any(started_at) < parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC')
) AS src
LEFT ANTI JOIN {db}.calls_complete AS dst USING (project_id, id);

-- 2. No (project_id, id) appears twice in calls_complete, whoever wrote it (expected 0 keys).
SELECT
    'duplicate_keys_in_calls_complete' AS check,
    toUInt64(0) AS expected,
    count() AS actual,
    toUInt8(actual = expected) AS ok
FROM
(
    SELECT project_id, id
    FROM {db}.calls_complete
    GROUP BY project_id, id
    HAVING count() > 1
);

-- 3. Row counts: the completed-before-cutover calls of the source against the calls_complete
--    rows of exactly that key set (missing keys lower it, duplicated keys raise it).
SELECT
    'source_count_equals_target_rows' AS check,
    (SELECT count() FROM
        (
            SELECT project_id, id
            FROM {db}.calls_merged
            GROUP BY project_id, id
            HAVING any(ended_at) IS NOT NULL
               AND any(started_at) < parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC')
        )
    ) AS expected,
    (SELECT count() FROM {db}.calls_complete AS dst
        LEFT SEMI JOIN
        (
            SELECT project_id, id
            FROM {db}.calls_merged
            GROUP BY project_id, id
            HAVING any(ended_at) IS NOT NULL
               AND any(started_at) < parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC')
        ) AS src USING (project_id, id)
    ) AS actual,
    toUInt8(actual = expected) AS ok;

-- 4. A deterministic sample of about 1000 calls compared column by column with the finalised
--    source. Calls are bucketed by project and the first two characters of the id, and the buckets
--    with the smallest cityHash64 come first. A bucket is a contiguous key range, so on a large
--    table the sample touches a few granules instead of one per sampled key (random keys would
--    make this a full scan), while small tables still get up to 1000 calls from many buckets.
--    Calls that started within the dedup window before the cutover are left out: the new write
--    path may have written those, legitimately with other values. A sampled call counts as a
--    mismatch when no identical row exists in calls_complete (missing or altered). EXCEPT
--    compares whole rows and treats NULL as equal to NULL.
WITH sample AS
(
    SELECT DISTINCT project_id, id
    FROM
    (
        SELECT project_id, id
        FROM {db}.calls_merged
        -- End parts (or merged rows) that ended before the window: sampled calls are mostly complete.
        WHERE ended_at IS NOT NULL
          AND sortable_datetime < parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC')
                                  - toIntervalSecond({dedup_window_seconds})
        ORDER BY cityHash64(project_id, substring(id, 1, 2)), project_id, id
        LIMIT 1000
    )
)
SELECT
    'sample_rows_equal_source' AS check,
    toUInt64(0) AS expected,
    count() AS actual,
    toUInt8(actual = expected) AS ok
FROM
(
    -- No aliases here: WHERE would see them and test assumeNotNull(ended_at) instead of ended_at.
    SELECT
        project_id, id,
        ifNull(trace_id, ''), parent_id, thread_id, turn_id,
        ifNull(op_name, ''), display_name,
        assumeNotNull(started_at), assumeNotNull(ended_at),
        exception, attributes_dump, inputs_dump, output_dump, summary_dump,
        input_refs, output_refs, wb_user_id, wb_run_id, wb_run_step, wb_run_step_end
    FROM
    (
        SELECT
            project_id, id,
            any(trace_id) AS trace_id, any(parent_id) AS parent_id,
            any(thread_id) AS thread_id, any(turn_id) AS turn_id,
            any(op_name) AS op_name, argMaxMerge(display_name) AS display_name,
            any(started_at) AS started_at, any(ended_at) AS ended_at,
            any(exception) AS exception, any(attributes_dump) AS attributes_dump,
            any(inputs_dump) AS inputs_dump, any(output_dump) AS output_dump,
            any(summary_dump) AS summary_dump,
            array_concat_agg(input_refs) AS input_refs, array_concat_agg(output_refs) AS output_refs,
            any(wb_user_id) AS wb_user_id, any(wb_run_id) AS wb_run_id,
            any(wb_run_step) AS wb_run_step, any(wb_run_step_end) AS wb_run_step_end
        FROM {db}.calls_merged
        WHERE (project_id, id) IN (SELECT project_id, id FROM sample)
        GROUP BY project_id, id
    )
    WHERE ended_at IS NOT NULL
      AND started_at < parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC')
                       - toIntervalSecond({dedup_window_seconds})

    EXCEPT

    SELECT
        project_id, id, trace_id, parent_id, thread_id, turn_id, op_name, display_name,
        started_at, ended_at, exception, attributes_dump, inputs_dump, output_dump, summary_dump,
        input_refs, output_refs, wb_user_id, wb_run_id, wb_run_step, wb_run_step_end
    FROM {db}.calls_complete
    WHERE (project_id, id) IN (SELECT project_id, id FROM sample)
)
