"""The package's shape is a promise too: imports run one way and never in a circle.

Every import is read from the source (module level and inside functions alike), so a lazy import
cannot hide a circle. Inside `backfill_plugin/` the layers run ops -> protocol -> pacing -> spec ->
errors/hookspecs, with `plugin.py` (and the package's `__init__`/`__main__`) on top.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("migrator", "backfill_plugin")
# The rank of each folder of backfill_plugin: a module may import only its own rank or lower ones.
RANK = {"errors": 0, "hookspecs": 0, "spec": 1, "pacing": 2, "protocol": 3, "ops": 4,
        "plugin": 5, "__init__": 5, "__main__": 5, "testing": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every project module this file imports, resolved to a module (not a name inside one)."""
    name, tree = module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules, found = {module_name(p) for p in sources()}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module; `from module import name`, the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sources()}


def test_no_module_imports_a_module_that_imports_it_back():
    edges = graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    circles = sorted(m for m in edges if m in reach(m))
    assert circles == [], f"modules in an import circle: {circles}"


def _is_parent(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def rank(module: str) -> int:
    parts = module.split(".")
    return RANK["__init__"] if len(parts) == 1 else RANK[parts[1]]


def test_backfill_plugin_imports_only_its_own_layer_or_lower():
    upward = []
    for module, targets in graph().items():
        if not module.startswith("backfill_plugin"):
            continue
        for target in targets:
            if target.startswith("backfill_plugin") and rank(target) > rank(module) and not _is_parent(target, module) \
                    and target != "backfill_plugin":
                upward.append(f"{module} -> {target}")
            if target == "backfill_plugin" and rank(module) < RANK["plugin"]:
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports from a layer above: " + ", ".join(sorted(upward))


def test_the_checker_sees_lazy_imports():
    """A function-level import counts: the check itself must not go blind to the form it exists for."""
    assert "backfill_plugin.protocol.manager" in imports(REPO / "backfill_plugin" / "ops" / "control.py")
    tree_edges = graph()
    assert "backfill_plugin.ops.cli" in tree_edges["backfill_plugin.plugin"]


def test_help_of_every_command_unchanged():
    """The reshaping promised no behaviour change: every command's --help, as recorded before it."""
    from tests.help_snapshot import snapshot
    assert snapshot() == (REPO / "tests" / "data" / "help.txt").read_text()
