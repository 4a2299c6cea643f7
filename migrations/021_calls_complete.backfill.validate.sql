-- Validation for the calls_complete backfill: run by: migrate backfill validate 21.
-- One statement, rendered once per key range: {batch_range} is a predicate over the unqualified key
-- columns project_id, id, and sits directly on each table, so the primary key reads only the
-- granules of the range, and memory depends on the range size, never on the table size.
-- It returns one row per check: check (name), expected, actual, ok (1 when they agree). The
-- framework sums expected and actual over the ranges and names every range where a check failed.
--
-- The source side is the finalised calls_merged, restricted to what the backfill is responsible
-- for: completed calls (ended_at and started_at known) that started before the cutover (UTC).
-- Per range:
-- 1. missing_in_calls_complete: such calls with no calls_complete row (expected 0).
-- 2. duplicate_keys_in_calls_complete: keys of the range with more than one calls_complete row,
--    whoever wrote them (the new write path too, expected 0).
-- 3. source_count_equals_target_rows: the number of such calls against the calls_complete rows of
--    exactly those keys (missing keys lower it, duplicated keys raise it). Target rows of other keys
--    (calls the new write path wrote that started at or after the cutover) are not counted.
-- 4. rows_equal_source: of the calls that started before the dedup window (cutover minus
--    dedup_window_seconds), how many have a calls_complete row equal in all 21 columns the backfill
--    writes (expected: all of them). Calls that started within the window are left out of this
--    check only (they are in 1 to 3): the new write path may have written those, legitimately
--    with other values. A row is compared through a 64-bit hash of all 21 columns, the refs arrays
--    and NULLs included, so one wrong value in one column fails the check for that range (up to a
--    hash collision, about 1 in 2^64 per row).
--
-- The source finalises as the backfill does (any(), argMaxMerge(), array_concat_agg(), ifNull()
-- for trace_id and op_name), with one change that keeps memory small: the wide text columns are
-- hashed before any() instead of after, so the aggregation holds 8 bytes per column instead of the
-- payload. This is the same value: cityHash64(NULL) is NULL and any() skips NULLs, so
-- any(cityHash64(x)) = cityHash64(any(x)), and a hashed Nullable(String) equals the hash of the same
-- String. As in the backfill, a column that two parts of one call set to different non-NULL values
-- has no single right value (any() picks one), and the demo data and the trace server never do that.
-- 5. extra_keys_in_calls_complete: keys of calls_complete that are no such call of calls_merged and
--    that started before the dedup window (expected 0): only the backfill writes there, and it
--    copies only such calls. The framework's first range has no lower bound and its last no upper
--    bound (an empty source is one range with no bound), so a stray row anywhere lies in a range.
SELECT c.1 AS check, c.2 AS expected, c.3 AS actual, toUInt8(expected = actual) AS ok
FROM
(
    SELECT
        countIf(in_scope) AS source_calls,
        countIf(in_scope AND target_rows = 0) AS missing,
        sumIf(target_rows, in_scope) AS target_rows_of_source_calls,
        countIf(target_rows > 1) AS duplicate_keys,
        countIf(in_scope AND NOT in_window) AS compared,
        countIf(in_scope AND NOT in_window AND has(target_hashes, source_hash)) AS equal,
        countIf(NOT in_scope AND target_before_window) AS extra
    FROM
    (
        SELECT project_id, id,
            max(s) AS in_scope, max(w) AS in_window, max(sh) AS source_hash,
            sum(t) AS target_rows, groupArrayIf(th, t = 1) AS target_hashes, max(o) AS target_before_window
        FROM
        (
            SELECT project_id, id, toUInt8(1) AS s,
                toUInt8(started_at >= parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC') - toIntervalSecond({dedup_window_seconds})) AS w,
                cityHash64(tuple(ifNull(h_trace_id, cityHash64('')), h_parent_id, h_thread_id, h_turn_id, ifNull(h_op_name, cityHash64('')),
                    cityHash64(display_name), started_at, ended_at, h_exception, h_attributes_dump, h_inputs_dump, h_output_dump,
                    h_summary_dump, cityHash64(input_refs), cityHash64(output_refs), h_wb_user_id, h_wb_run_id, wb_run_step, wb_run_step_end)) AS sh,
                toUInt8(0) AS t, toUInt64(0) AS th, toUInt8(0) AS o
            FROM
            (
                SELECT project_id, id,
                    any(cityHash64(trace_id)) AS h_trace_id, any(cityHash64(parent_id)) AS h_parent_id,
                    any(cityHash64(thread_id)) AS h_thread_id, any(cityHash64(turn_id)) AS h_turn_id,
                    any(cityHash64(op_name)) AS h_op_name, argMaxMerge(display_name) AS display_name,
                    any(started_at) AS started_at, any(ended_at) AS ended_at, any(cityHash64(exception)) AS h_exception,
                    any(cityHash64(attributes_dump)) AS h_attributes_dump, any(cityHash64(inputs_dump)) AS h_inputs_dump,
                    any(cityHash64(output_dump)) AS h_output_dump, any(cityHash64(summary_dump)) AS h_summary_dump,
                    array_concat_agg(input_refs) AS input_refs, array_concat_agg(output_refs) AS output_refs,
                    any(cityHash64(wb_user_id)) AS h_wb_user_id, any(cityHash64(wb_run_id)) AS h_wb_run_id,
                    any(wb_run_step) AS wb_run_step, any(wb_run_step_end) AS wb_run_step_end
                FROM {db}.calls_merged
                WHERE {batch_range}
                GROUP BY project_id, id
            )
            WHERE ended_at IS NOT NULL
              AND started_at < parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC')
            UNION ALL
            SELECT project_id, id, toUInt8(0), toUInt8(0), toUInt64(0), toUInt8(1),
                cityHash64(tuple(cityHash64(trace_id), cityHash64(parent_id), cityHash64(thread_id), cityHash64(turn_id),
                    cityHash64(op_name), cityHash64(display_name), started_at, ended_at, cityHash64(exception),
                    cityHash64(attributes_dump), cityHash64(inputs_dump), cityHash64(output_dump), cityHash64(summary_dump),
                    cityHash64(input_refs), cityHash64(output_refs), cityHash64(wb_user_id), cityHash64(wb_run_id),
                    wb_run_step, wb_run_step_end)),
                toUInt8(started_at < parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC') - toIntervalSecond({dedup_window_seconds}))
            FROM {db}.calls_complete
            WHERE {batch_range}
        )
        GROUP BY project_id, id
    )
)
ARRAY JOIN [
    ('missing_in_calls_complete', toUInt64(0), missing),
    ('duplicate_keys_in_calls_complete', toUInt64(0), duplicate_keys),
    ('source_count_equals_target_rows', source_calls, target_rows_of_source_calls),
    ('rows_equal_source', compared, equal),
    ('extra_keys_in_calls_complete', toUInt64(0), extra)
] AS c
