-- BACKFILL_VERSION: 2
-- CHECKPOINT_COLUMNS: project_id, id
-- DESCRIPTION: Copy completed calls that started before the cutover from calls_merged into calls_complete.
--
-- The framework owns the key range: each run of this statement covers exactly the keys selected
-- by the batch_range placeholder (a predicate over the unqualified key columns project_id, id),
-- all source rows of a key fall into one batch, and the framework, not this SQL, decides where
-- the next batch starts. Placeholders used: db, batch_range, retry_count, cutover_timestamp,
-- dedup_window_seconds. The cutover is read in UTC (an ISO text with a zone offset also works).
--
-- Why this differs from the original draft (its intent is kept, its defects are not):
-- 1. calls_merged columns are SimpleAggregateFunction(any, ...): the stored value is already the
--    plain value, so they finalise with any(). anyMerge() is rejected by the engine (it needs an
--    AggregateFunction state). Only display_name is a real argMax state: argMaxMerge().
--    The refs are SimpleAggregateFunction(array_concat_agg, ...): array_concat_agg() concatenates
--    the arrays of all parts, as a background merge would.
-- 2. The draft filtered with aggregates nested inside aggregates in HAVING. Here the finalised
--    values are computed once in a subquery and filtered by the outer WHERE.
-- 3. The draft had its own LIMIT batch_size and last-complete-group logic, which fought the
--    range of the framework (a LIMIT over raw parts can cut a call in half). That range
--    already keeps every part of a call in one batch, so there is no LIMIT here.
-- 4. The cutover of the draft, the minimum started_at over calls_merged minus one hour, lies before
--    every call, so it copied nothing. The cutover is now a param computed once at first start:
--    the earliest started_at the new write path already put into calls_complete, else the start
--    time of the backfill (see the backfill.meta file).
-- 5. The correlated NOT EXISTS per row against the whole target is replaced by one
--    set lookup restricted to the key range of this batch, which the primary key prunes.
--
-- Replays rely on the lookup above, not on insert_deduplication_token: a token deduplicates by
-- block number, not by content, and the lookup changes which rows land in which block, so a
-- replay must run without the token of the failed attempt (or with a token unique to the attempt).

INSERT INTO {db}.calls_complete
(
    project_id, id, trace_id, parent_id, thread_id, turn_id, op_name, display_name,
    started_at, ended_at, exception, attributes_dump, inputs_dump, output_dump, summary_dump,
    input_refs, output_refs, wb_user_id, wb_run_id, wb_run_step, wb_run_step_end
)
-- No aliases in this outer SELECT, on purpose: ClickHouse lets WHERE see SELECT aliases, so
-- assumeNotNull(ended_at) AS ended_at would turn the filter below into an always-true test.
-- The INSERT maps columns by position.
SELECT
    project_id, id,
    ifNull(trace_id, ''),
    parent_id, thread_id, turn_id,
    ifNull(op_name, ''),
    display_name,
    assumeNotNull(started_at),
    assumeNotNull(ended_at),
    exception, attributes_dump, inputs_dump, output_dump, summary_dump,
    input_refs, output_refs, wb_user_id, wb_run_id, wb_run_step, wb_run_step_end
FROM
(
    -- Finalise only the keys of this batch: the range predicate sits directly on the source table, so
    -- the (project_id, id) primary key selects just the granules of this batch. The parts of a call
    -- may still be separate rows (merges are asynchronous), hence the GROUP BY.
    SELECT
        project_id,
        id,
        any(trace_id) AS trace_id,
        any(parent_id) AS parent_id,
        any(thread_id) AS thread_id,
        any(turn_id) AS turn_id,
        any(op_name) AS op_name,
        argMaxMerge(display_name) AS display_name,
        any(started_at) AS started_at,
        any(ended_at) AS ended_at,
        any(exception) AS exception,
        any(attributes_dump) AS attributes_dump,
        any(inputs_dump) AS inputs_dump,
        any(output_dump) AS output_dump,
        any(summary_dump) AS summary_dump,
        array_concat_agg(input_refs) AS input_refs,
        array_concat_agg(output_refs) AS output_refs,
        any(wb_user_id) AS wb_user_id,
        any(wb_run_id) AS wb_run_id,
        any(wb_run_step) AS wb_run_step,
        any(wb_run_step_end) AS wb_run_step_end
    FROM {db}.calls_merged
    WHERE {batch_range}
    GROUP BY project_id, id
)
WHERE
    -- Completed calls only. A call with an end part but no start part is not complete either
    -- (its started_at is NULL, so the comparison below is not true).
    ended_at IS NOT NULL
    -- Calls that started at or after the cutover belong to the new write path.
    AND started_at < parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC')
    -- Never duplicate a call already present in calls_complete:
    -- * on a first attempt (retry_count = 0) only the new write path can have written keys of
    --   this range, and only for calls that started within the dedup window before the cutover,
    --   so only those target rows are looked up,
    -- * on a retry or a replay after a crash (retry_count > 0) an earlier attempt may have
    --   committed part of this very batch, so every target row of the range is looked up.
    -- Either way calls_complete is read only within the key range of this batch (primary key).
    AND (project_id, id) NOT IN
    (
        SELECT project_id, id
        FROM {db}.calls_complete
        WHERE {batch_range}
          AND (
                {retry_count} > 0
                OR started_at >= parseDateTime64BestEffort('{cutover_timestamp}', 3, 'UTC')
                                  - toIntervalSecond({dedup_window_seconds})
              )
    )
