"""Resumable, checkpointed, batched ClickHouse backfills: a plugin for `migrate`."""
from .protocol.manager import ClickHouseBackfillManager

__all__ = ["ClickHouseBackfillManager"]
