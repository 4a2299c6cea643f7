-- The tenant placeholder comes from the migrator-tenant-plugin; inside '...' the framework escapes it.
-- The batch range placeholder selects exactly this batch's keys of the source (checkpoint_columns: id).
INSERT INTO {db}.tenant_events (tenant, id, kind, payload)
SELECT '{tenant}', id, kind, payload
FROM {db}.events
WHERE {batch_range}
