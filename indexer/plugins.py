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
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin {entry!r}: {path} cannot be imported as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise PluginError(f"plugin {entry!r} failed to import: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(entry)
    except ModuleNotFoundError as exc:
        raise PluginError(f"plugin {entry!r}: no such module on the Python path ({exc})") from exc
    except Exception as exc:
        raise PluginError(f"plugin {entry!r} failed to import: {type(exc).__name__}: {exc}") from exc


def load_plugins(entries: Sequence[str]) -> list[ModuleType]:
    """Import the listed plugin modules, in order (see :func:`load_plugin`).

    Raises:
        PluginError: the first entry that cannot be imported.
    """
    return [load_plugin(entry) for entry in entries]
