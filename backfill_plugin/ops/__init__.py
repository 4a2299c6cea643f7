"""What an operator calls: the `migrate backfill` commands, validate, control files, signals, the demo.

May import every layer below (`protocol`, `pacing`, `spec`); only `plugin.py` imports this.
"""
