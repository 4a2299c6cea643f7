-- Source trace schema, modelled on the Weave trace server: a call is written as separate parts
-- (a start part, later an end part, sometimes a rename part) into call_parts. The materialized
-- view folds each INSERT block into calls_merged, an AggregatingMergeTree that collapses parts of
-- the same (project_id, id) only when background merges happen. Readers must therefore always
-- finalise with GROUP BY project_id, id: any() for the SimpleAggregateFunction(any, ...) columns,
-- argMaxMerge() for display_name, array_concat_agg() / groupArrayArray() for the refs.

CREATE TABLE IF NOT EXISTS {db}.call_parts
(
    project_id String,
    id String,
    trace_id Nullable(String),
    parent_id Nullable(String),
    thread_id Nullable(String),
    turn_id Nullable(String),
    op_name Nullable(String),
    display_name Nullable(String),
    started_at Nullable(DateTime64(3)),
    ended_at Nullable(DateTime64(3)),
    exception Nullable(String),
    attributes_dump Nullable(String),
    inputs_dump Nullable(String),
    output_dump Nullable(String),
    summary_dump Nullable(String),
    input_refs Array(String),
    output_refs Array(String),
    wb_user_id Nullable(String),
    wb_run_id Nullable(String),
    wb_run_step Nullable(Int64),
    wb_run_step_end Nullable(Int64),
    created_at DateTime64(3) DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (project_id, id);

CREATE TABLE IF NOT EXISTS {db}.calls_merged
(
    project_id String,
    id String,
    trace_id SimpleAggregateFunction(any, Nullable(String)),
    parent_id SimpleAggregateFunction(any, Nullable(String)),
    thread_id SimpleAggregateFunction(any, Nullable(String)),
    turn_id SimpleAggregateFunction(any, Nullable(String)),
    op_name SimpleAggregateFunction(any, Nullable(String)),
    -- A rename is a later part carrying a new display_name: the value with the newest created_at
    -- wins. argMax skips NULL arguments, so an end part (display_name NULL) never erases a name.
    display_name AggregateFunction(argMax, Nullable(String), DateTime64(3)),
    started_at SimpleAggregateFunction(any, Nullable(DateTime64(3))),
    ended_at SimpleAggregateFunction(any, Nullable(DateTime64(3))),
    exception SimpleAggregateFunction(any, Nullable(String)),
    attributes_dump SimpleAggregateFunction(any, Nullable(String)),
    inputs_dump SimpleAggregateFunction(any, Nullable(String)),
    output_dump SimpleAggregateFunction(any, Nullable(String)),
    summary_dump SimpleAggregateFunction(any, Nullable(String)),
    input_refs SimpleAggregateFunction(array_concat_agg, Array(String)),
    output_refs SimpleAggregateFunction(array_concat_agg, Array(String)),
    wb_user_id SimpleAggregateFunction(any, Nullable(String)),
    wb_run_id SimpleAggregateFunction(any, Nullable(String)),
    wb_run_step SimpleAggregateFunction(any, Nullable(Int64)),
    wb_run_step_end SimpleAggregateFunction(any, Nullable(Int64)),
    -- Earliest known time of the call (start, else end, else write time): non-nullable, for sorting.
    sortable_datetime SimpleAggregateFunction(min, DateTime64(3))
)
ENGINE = AggregatingMergeTree
ORDER BY (project_id, id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.calls_merged_view TO {db}.calls_merged AS
SELECT
    project_id,
    id,
    anySimpleState(trace_id) AS trace_id,
    anySimpleState(parent_id) AS parent_id,
    anySimpleState(thread_id) AS thread_id,
    anySimpleState(turn_id) AS turn_id,
    anySimpleState(op_name) AS op_name,
    argMaxState(display_name, call_parts.created_at) AS display_name,
    anySimpleState(started_at) AS started_at,
    anySimpleState(ended_at) AS ended_at,
    anySimpleState(exception) AS exception,
    anySimpleState(attributes_dump) AS attributes_dump,
    anySimpleState(inputs_dump) AS inputs_dump,
    anySimpleState(output_dump) AS output_dump,
    anySimpleState(summary_dump) AS summary_dump,
    array_concat_aggSimpleState(input_refs) AS input_refs,
    array_concat_aggSimpleState(output_refs) AS output_refs,
    anySimpleState(wb_user_id) AS wb_user_id,
    anySimpleState(wb_run_id) AS wb_run_id,
    anySimpleState(wb_run_step) AS wb_run_step,
    anySimpleState(wb_run_step_end) AS wb_run_step_end,
    minSimpleState(coalesce(call_parts.started_at, call_parts.ended_at, call_parts.created_at)) AS sortable_datetime
FROM {db}.call_parts
GROUP BY project_id, id;
