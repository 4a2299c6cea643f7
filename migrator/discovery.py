"""Find migration files and refuse an ambiguous directory before anything touches the database."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MigrateError

NAME_RE = re.compile(r"^(\d+)_([A-Za-z0-9][A-Za-z0-9_\-]*)\.(up\.sql|down\.sql|backfill\.sql|backfill\.meta|backfill\.validate\.sql)$")
KINDS = {"up.sql": "up", "down.sql": "down", "backfill.sql": "backfill_sql",
         "backfill.meta": "backfill_meta", "backfill.validate.sql": "backfill_validate"}


@dataclass
class Migration:
    """One version's files; the backfill ones are optional and come as a pair."""

    version: int
    name: str
    up: Path | None = None
    down: Path | None = None
    backfill_sql: Path | None = None
    backfill_meta: Path | None = None
    backfill_validate: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def has_backfill(self) -> bool:
        return self.backfill_sql is not None


def discover(directory: str | Path) -> dict[int, Migration]:
    """Map version -> Migration; any stray, duplicate or half-present file is a one-line error."""
    root = Path(directory)
    if not root.is_dir():
        raise MigrateError(f"migrations directory {root} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.is_dir() or not path.name.endswith((".sql", ".meta")):
            continue
        match = NAME_RE.match(path.name)
        if not match:
            raise MigrateError(f"{path}: malformed migration file name; expected NNN_name.up.sql, "
                               ".down.sql, .backfill.sql or .backfill.meta")
        version, name, kind = int(match.group(1)), match.group(2), KINDS[match.group(3)]
        if version == 0:  # 0 means "nothing applied": such a file would be skipped silently forever
            raise MigrateError(f"{path}: version 0 is reserved for 'nothing applied'; start at 1")
        mig = found.setdefault(version, Migration(version, name))
        if mig.name != name:
            raise MigrateError(f"{path}: duplicate version {version} (also {mig.files[0].name})")
        if getattr(mig, kind) is not None:
            raise MigrateError(f"{path}: duplicate version {version} (also {getattr(mig, kind).name})")
        setattr(mig, kind, path)
        mig.files.append(path)
    for mig in found.values():
        _check_complete(mig, root)
    return dict(sorted(found.items()))


def _check_complete(mig: Migration, root: Path) -> None:
    stem = root / mig.files[0].name.split(".")[0]
    pairs = [("up", "down", ".up.sql", ".down.sql"),
             ("backfill_sql", "backfill_meta", ".backfill.sql", ".backfill.meta")]
    for have, need, _have_ext, need_ext in pairs + [(b, a, be, ae) for a, b, ae, be in pairs]:
        if getattr(mig, have) is not None and getattr(mig, need) is None:
            raise MigrateError(f"{getattr(mig, have)}: missing its pair {stem}{need_ext}")
    if mig.up is None:
        raise MigrateError(f"{mig.files[0]}: version {mig.version} has no {stem}.up.sql")
    if mig.backfill_validate is not None and mig.backfill_sql is None:
        raise MigrateError(f"{mig.backfill_validate}: a validate file needs {stem}.backfill.sql")


def read_text(path: Path) -> str:
    """A migration file's text; a file that is not UTF-8 is a one-line error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MigrateError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise MigrateError(f"{path}: cannot read ({exc.strerror})") from None


def next_migration_number(directory: str | Path) -> int:
    """The version `migrate new` gives: one past the highest present."""
    found = discover(directory) if Path(directory).is_dir() else {}
    return (max(found) if found else 0) + 1
