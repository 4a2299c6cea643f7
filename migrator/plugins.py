"""One pluggy manager for the migrator and its plugins; entry points from group `migrator`."""
from __future__ import annotations

import os

import pluggy

from . import hookspecs

DISABLE_ENV = "MIGRATOR_DISABLE_PLUGINS"

pm = pluggy.PluginManager("migrator")
pm.add_hookspecs(hookspecs)
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Load entry points once (unless MIGRATOR_DISABLE_PLUGINS=1); a misspelled hookimpl fails here."""
    global _loaded
    if not _loaded:
        _loaded = True
        if os.environ.get(DISABLE_ENV, "").lower() not in ("1", "true", "yes"):
            pm.load_setuptools_entrypoints("migrator")
        pm.check_pending()
    return pm


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
