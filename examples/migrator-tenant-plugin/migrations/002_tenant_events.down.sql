DROP TABLE IF EXISTS {db}.tenant_events
