"""docs/plugins.md documents every hookspec with its exact signature (and nothing that is not one)."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pluggy
import pytest

import backfill_plugin.hookspecs
import backfill_plugin.plugin
import migrator.hookspecs
from migrator.plugins import ensure_registered, pm

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
HEADING_RE = re.compile(r"^###\s+(\w+)\((.*)\)\s*$", re.MULTILINE)
ensure_registered(backfill_plugin.plugin, backfill_plugin.plugin.NAME)  # declares its hookspecs
SPEC_MODULES = [migrator.hookspecs, backfill_plugin.hookspecs]


def hookspecs() -> dict[str, object]:
    """Every function marked as a `migrator` hookspec, in the spec modules and on the live manager."""
    specs = {}
    for module in SPEC_MODULES:
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if getattr(fn, "migrator_spec", None) is not None:
                specs[name] = fn
    for name, caller in vars(pm.hook).items():  # catches specs added from anywhere else too
        if isinstance(caller, pluggy.HookCaller) and caller.spec is not None:
            specs.setdefault(name, caller.spec.function)
    return specs


def documented(path: Path = DOC) -> dict[str, str]:
    """`### name(args)` headings of the docs: hook name -> documented argument list."""
    text = path.read_text()
    found = {}
    for name, args in HEADING_RE.findall(text):
        assert name not in found, f"docs/plugins.md documents {name} twice"
        found[name] = args
    return found


def normalise(signature: str) -> str:
    return re.sub(r"\s+", "", signature)


def test_collects_the_known_hooks():
    names = set(hookspecs())
    assert {"register_commands", "after_migration_applied", "register_backfill", "after_migration_rolled_back",
            "backfill_placeholders", "backfill_batch_completed", "backfill_status_changed"} <= names


@pytest.mark.parametrize("name", sorted(hookspecs()))
def test_hookspec_is_documented_with_its_signature(name):
    spec = hookspecs()[name]
    docs = documented()
    assert name in docs, f"hookspec {name} is missing from docs/plugins.md (add a '### {name}(...)' section)"
    real = str(inspect.signature(spec))
    assert normalise(f"({docs[name]})") == normalise(real), (
        f"docs/plugins.md documents {name}({docs[name]}) but the hookspec is {name}{real}")


def test_no_stale_hook_sections():
    stale = set(documented()) - set(hookspecs())
    assert not stale, f"docs/plugins.md documents hooks that do not exist: {sorted(stale)}"


def test_each_hook_section_has_an_example():
    text = DOC.read_text()
    sections = re.split(r"^#{2,3} ", text, flags=re.MULTILINE)
    for name in hookspecs():
        body = next(s for s in sections if s.startswith(f"{name}("))
        assert "```python" in body and "@hookimpl" in body and f"def {name}(" in body, f"{name}: no example"


def test_packaging_and_operations_are_documented():
    text = DOC.read_text()
    for needle in ("[project.entry-points.migrator]", "MIGRATOR_DISABLE_PLUGINS=1", "pm.check_pending()",
                   "migrate plugins", "pm.register(", "pm.unregister("):
        assert needle in text, f"docs/plugins.md does not mention {needle}"


def test_the_checker_catches_a_wrong_signature(tmp_path):
    """The comparison above is not vacuous: a renamed argument is reported."""
    fake = tmp_path / "plugins.md"
    fake.write_text(DOC.read_text().replace("### register_backfill(context, migration)",
                                            "### register_backfill(ctx, migration)"))
    docs = documented(fake)
    real = str(inspect.signature(hookspecs()["register_backfill"]))
    assert real == "(context, migration)"
    assert normalise(f"({docs['register_backfill']})") != normalise(real)
