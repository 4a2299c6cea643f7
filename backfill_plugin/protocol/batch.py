"""A batch: one key range of the source, as the checkpoint records it before it runs (write-ahead)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass
class Batch:
    """The keys in (start, end] of the source; `start` None is the beginning of the key space.

    `replay` is true when an earlier attempt of this range may have committed rows (a crash, a
    retry, a takeover): the SQL then sees `{retry_count}` > 0 and earlier attempts are killed first.
    """

    start: list | None
    end: list
    rows: int
    batch_size: int
    replay: bool = False
    first_attempt_at: float | None = None  # when this range first ran: a replay must stay in the dedup window

    def to_json(self) -> dict:
        """The form stored in the checkpoint's `in_flight`."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Batch:
        """Read an `in_flight` range back; fields older checkpoints lack get defaults."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{"rows": 0, "batch_size": 0, **known})

    def token(self, backfill_id: str) -> str:
        """Derived from backfill and range only, so every attempt of this range carries the same one."""
        digest = hashlib.sha256(json.dumps([backfill_id, self.start, self.end], default=str).encode()).hexdigest()
        return f"backfill-{digest[:32]}"

    def event(self, number: int, seconds: float, next_batch_size: int, rows_processed: int) -> dict:
        """What `backfill_batch_completed` hooks and `on_batch` callers hear of a committed batch."""
        return {"number": number, "range_start": self.start, "range_end": self.end, "rows": self.rows,
                "seconds": round(seconds, 3), "batch_size": self.batch_size, "next_batch_size": next_batch_size,
                "rows_processed": rows_processed}
