"""Plugin modules: the operator's way to bring custom output functions and model factories.

A plugin is a Python module that registers what it defines when it is imported
(:func:`~indexer.features.tasks.register_output_function`, :func:`~indexer.features.models.register_model`).
The indexer imports the plugins its command line lists (``infotrace-index build --plugin ...``) and the
service those ``INFOTRACE_PLUGINS`` lists, before any index is built or loaded, so that a manifest can name
a registered output function or model. The trust rule is the one of model factories: only modules an
operator lists are imported; a name in an index file is looked up among the registered ones and never
imported.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["PluginError", "load_plugin", "load_plugins"]


class PluginError(ImportError):
    """A listed plugin module could not be imported (the message names it and says why)."""


def load_plugin(entry: str) -> ModuleType:
    """Import one plugin module.

    Args:
        entry: a module name on the Python path (``"my_team.infotrace_tasks"``) or the path of a ``.py`` file
            (``"/opt/plugins/tasks.py"``; imported under a name derived from its resolved path, once).

    Returns:
        The imported module (the same object when imported before).

    Raises:
        PluginError: no such module or file, or importing it raised (the cause is chained).
    """
    entry = entry.strip()
    if not entry:
        raise PluginError("a plugin entry is empty; give a module name or the path of a .py file")
    if entry.endswith(".py") or "/" in entry or "\\" in entry:
        path = Path(entry).expanduser().resolve()
        if not path.is_file() or path.suffix != ".py":
            raise PluginError(f"plugin {entry!r}: no such .py file ({path})")
        name = f"infotrace_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return sys.modules[name]
        known = _imported_from(path)
        if known is not None:  # listed before by its module name
            return known
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin {entry!r}: {path} cannot be imported as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # a plugin's sys.exit() must not end the server silently
            del sys.modules[name]
            raise PluginError(f"plugin {entry!r} failed to import: {_why(exc)}") from exc
        return module
    try:
        found = importlib.util.find_spec(entry)
        if found is not None and found.origin and entry not in sys.modules:
            known = _imported_from(Path(found.origin).resolve())
            if known is not None:  # listed before by its path
                return known
        return importlib.import_module(entry)
    except ModuleNotFoundError as exc:
        raise PluginError(f"plugin {entry!r}: no such module on the Python path ({exc})") from exc
    except (Exception, SystemExit) as exc:
        raise PluginError(f"plugin {entry!r} failed to import: {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}) while being imported"
    return f"{type(exc).__name__}: {exc}"


def _imported_from(path: Path) -> ModuleType | None:
    """The module already imported from the file ``path`` (resolved), if any."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == path:
            return module
    return None


def load_plugins(entries: Sequence[str]) -> list[ModuleType]:
    """Import the listed plugin modules, in order (see :func:`load_plugin`).

    Raises:
        PluginError: the first entry that cannot be imported.
    """
    return [load_plugin(entry) for entry in entries]
