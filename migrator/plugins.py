"""One pluggy manager for the migrator and its plugins; entry points from group `migrator`."""
from __future__ import annotations

import os

import pluggy

from . import hookspecs

DISABLE_ENV = "MIGRATOR_DISABLE_PLUGINS"

pm = pluggy.PluginManager("migrator")
pm.add_hookspecs(hookspecs)
pm.hook.add_hookspecs.call_historic(kwargs={"pm": pm})  # every plugin, whenever it registers
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Load entry points once (unless MIGRATOR_DISABLE_PLUGINS=1); a misspelled hookimpl fails here.

    The unknown-hook check runs only after every entry point has registered (and declared its own
    hookspecs), so the order in which entry points load never matters.
    """
    global _loaded
    if not _loaded:
        _loaded = True
        if os.environ.get(DISABLE_ENV, "").lower() not in ("1", "true", "yes"):
            pm.load_setuptools_entrypoints("migrator")
        pm.check_pending()
    return pm


def ensure_registered(plugin, name: str) -> None:
    """Library use (no entry points, or plugins disabled) still needs a plugin's hooks declared."""
    load_plugins()
    if not pm.has_plugin(name) and not pm.is_registered(plugin):
        pm.register(plugin, name=name)


def declare_hookspecs(module) -> None:
    """A library user's manager calls a plugin's hooks before (or without) any entry point loading
    it: its hookspecs must be declared; a second declaration changes nothing."""
    load_plugins()
    try:
        pm.add_hookspecs(module)
    except ValueError:  # already declared, by the plugin's own `add_hookspecs` or an earlier call
        pass


def describe() -> list[dict]:
    """Installed plugins and the hooks each implements, for `migrate plugins`."""
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = next((d for p, d in pm.list_plugin_distinfo() if p is plugin), None)
        out.append({"name": name, "hooks": hooks,
                    "version": getattr(dist, "version", None) if dist else None})
    return out
