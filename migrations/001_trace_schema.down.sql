-- The view first: dropping calls_merged under a live view would break inserts into call_parts.
DROP VIEW IF EXISTS {db}.calls_merged_view;
DROP TABLE IF EXISTS {db}.calls_merged;
DROP TABLE IF EXISTS {db}.call_parts;
