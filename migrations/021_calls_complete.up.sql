-- calls_complete: one plain row per completed call, so readers need no GROUP BY finalisation.
-- Columns and types as specified for the new write path (ended_at NOT nullable: only completed
-- calls live here). non_replicated_deduplication_window lets the deterministic
-- insert_deduplication_token drop a replayed block on a single server, as Replicated tables do.
CREATE TABLE IF NOT EXISTS {db}.calls_complete
(
    project_id String,
    id String,
    trace_id String,
    parent_id Nullable(String),
    thread_id Nullable(String),
    turn_id Nullable(String),
    op_name String,
    display_name Nullable(String),
    started_at DateTime64(3),
    ended_at DateTime64(3),
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
    wb_run_step_end Nullable(Int64)
)
ENGINE = MergeTree
ORDER BY (project_id, id)
SETTINGS non_replicated_deduplication_window = 1000;
