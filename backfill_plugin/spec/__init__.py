"""A backfill's own files: reading and checking the meta, rendering the SQL, fixing params.

Imports only `backfill_plugin.errors` and the migrator; nothing here talks to a run or a runner.
"""
