"""The batch loop and its promises: key ranges, write-ahead, dedup tokens, attempts, lease, checkpoint.

`manager.py` holds the decisions; every other module here holds one promise. May import `pacing`,
`spec`, `errors` and `hookspecs`; never `ops` or `plugin`.
"""
