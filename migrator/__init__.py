"""ClickHouse schema migrations, extended through pluggy plugins (`from migrator import hookimpl`)."""
import pluggy

__version__ = "0.1.0"
hookimpl = pluggy.HookimplMarker("migrator")

__all__ = ["hookimpl", "__version__"]
