"""The developer guide's pytest example ("Testing a backfill locally") runs here as written, with the
fixtures of the plugin shipped in the package: if the guide or the plugin changes so that it breaks,
this fails."""
from __future__ import annotations

import re

from tests.conftest import REPO

GUIDE = REPO / "docs" / "backfill_developer_guide.md"
MARKER = "<!-- run by tests/test_guide_example.py -->"  # the line before the block (tests/test_docs.py)


def example() -> str:
    text = GUIDE.read_text()
    assert MARKER in text, f"{GUIDE}: the marked example is gone"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.DOTALL)
    assert match, f"{GUIDE}: no python block after the example marker"
    return match.group(1)


exec(compile(example(), str(GUIDE), "exec"))  # defines the guide's tests in this module
