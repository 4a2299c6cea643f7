"""Resumable, checkpointed, batched ClickHouse backfills: a plugin for `migrate`."""
from .manager import ClickHouseBackfillManager

__all__ = ["ClickHouseBackfillManager"]
