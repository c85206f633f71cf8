"""The indexes a service holds: every subfolder of the index root with a manifest, loaded and verified."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from indexer.exceptions import IndexNotFoundError, IndexNotReadyError
from indexer.store.layout import INDEX_NAME_PATTERN, MANIFEST_FILE
from indexer.store.reader import load_index
from service.core.settings import DEFAULT_PROJECTION_CACHE_BYTES
from service.engine.engine import AttributionEngine

__all__ = ["IndexRegistry"]

log = logging.getLogger("infotrace.service")


class IndexRegistry:
    """Loaded indexes by name, and the reason for each index that could not be loaded.

    A new version of an index (written by an update, DESIGN.md 2.1) is picked up by :meth:`refresh`, which
    the service calls every ``INFOTRACE_RELOAD_INTERVAL`` seconds: the new version is loaded and verified
    whole, then swapped in with one assignment; requests already running finish on the engine they
    started with (its files stay readable after the old folder is deleted: memory maps and open file
    descriptors keep them), new requests get the new one. A version that fails to load (caught mid-switch,
    or corrupt) leaves the old one served and is tried again.

    Args:
        engines: name -> engine of each healthy index.
        failures: name -> why that index is not served.
        root: the index root they were loaded from.
        loader: makes the engine of one index folder (None: no refresh).
    """

    def __init__(
        self,
        engines: dict[str, AttributionEngine],
        failures: dict[str, str],
        root: Path,
        loader: Callable[[Path], AttributionEngine] | None = None,
    ) -> None:
        self.engines = engines
        self.failures = failures
        self.root = root
        self._loader = loader
        self._versions: dict[str, tuple[int, int, int] | None] = {}

    @classmethod
    def load(
        cls,
        root: Path,
        projection_cache_bytes: int = DEFAULT_PROJECTION_CACHE_BYTES,
        checkpoints: dict[str, Path] | None = None,
        trusted_factories: frozenset[str] = frozenset(),
        use_gpu: bool | None = None,
    ) -> IndexRegistry:
        """Load every ``<root>/<name>/manifest.json`` index; a broken one is recorded, not fatal.

        Args:
            root: the index root.
            projection_cache_bytes: see :class:`~service.engine.query.QueryFeaturizer` .
            checkpoints: index name -> checkpoint to featurize raw queries with instead of the index's copy.
            trusted_factories: import-path model factories (``pkg.module:fn``) that manifests may name.
            use_gpu: search FAISS on the GPUs; None: when FAISS sees one.

        Raises:
            IndexNotFoundError: ``root`` is not a folder.
        """
        root = Path(root)
        if not root.is_dir():
            raise IndexNotFoundError(f"index root {root} is not a folder")

        def loader(folder: Path) -> AttributionEngine:
            return AttributionEngine(
                load_index(folder),
                projection_cache_bytes,
                (checkpoints or {}).get(folder.name),
                trusted_factories,
                use_gpu,
            )

        registry = cls({}, {}, root, loader)
        for folder in _index_folders(root):
            version = _version(folder)  # before loading: a version written meanwhile is picked up later
            outcome = _load_one(folder, loader)
            if isinstance(outcome, str):
                registry.failures[folder.name] = outcome
            else:
                registry.engines[folder.name] = outcome
            registry._versions[folder.name] = version if _version(folder) == version else None
        for name in sorted(set(checkpoints or {}) - set(registry.engines) - set(registry.failures)):
            log.warning("INFOTRACE_MODEL_CHECKPOINTS names %r, which is not an index under %s", name, root)
        log.info("serving %d index(es) from %s: %s", len(registry.engines), root, sorted(registry.engines))
        return registry

    def refresh(self) -> list[str]:
        """Load the indexes whose manifest changed since they were loaded (a new version) and the new
        folders; swap each in once it loaded and verified.

        Returns:
            The names whose engine (or failure) was replaced.
        """
        if self._loader is None:
            return []
        changed = []
        for folder in _index_folders(self.root):
            name = folder.name
            version = _version(folder)
            if version is None or self._versions.get(name) == version:
                continue
            outcome = _load_one(folder, self._loader)
            if _version(folder) != version:  # replaced again while loading (files of two versions): retry
                continue
            if isinstance(outcome, str):
                self._versions[name] = version  # tried again only once it changes
                if name in self.engines:  # a new version that does not load: keep serving the old one
                    log.warning("index %s: new version not loaded, the old one is served: %s", name, outcome)
                    continue
                self.failures[name] = outcome
            else:
                self.engines[name] = outcome  # one assignment: a request sees the old engine or the new one
                self.failures.pop(name, None)
                log.info("index %s: now serving the version of %s", name, folder / MANIFEST_FILE)
            self._versions[name] = version
            changed.append(name)
        return changed

    def get(self, name: str) -> AttributionEngine:
        """The engine of a healthy index.

        Raises:
            IndexNotReadyError: the index is present but failed to load or verify (says why).
            IndexNotFoundError: no index of that name (the message lists the served ones).
        """
        if name in self.failures:
            raise IndexNotReadyError(f"index {name!r} is not ready: {self.failures[name]}")
        engine = self.engines.get(name)
        if engine is None:
            raise IndexNotFoundError(f"no index named {name!r}; served indexes: {sorted(self.engines)}")
        return engine


def _version(folder: Path) -> tuple[int, int, int] | None:
    """What identifies one written version of an index: its manifest's inode, mtime and size (every version
    is a new folder, so a new manifest file), or None when there is none (mid-switch)."""
    try:
        st = (folder / MANIFEST_FILE).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _index_folders(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
    )


def _load_one(folder: Path, loader: Callable[[Path], AttributionEngine]) -> AttributionEngine | str:
    """The engine of one index folder, or why it is not served."""
    if not re.fullmatch(INDEX_NAME_PATTERN, folder.name):  # no URL could reach it
        why = (
            f"the folder name {folder.name!r} is not a valid index name ({INDEX_NAME_PATTERN}: ASCII "
            "letters, digits, '_', '.', '-', at most 128 characters); rename the folder"
        )
        log.warning("index %s not loaded: %s", folder.name, why)
        return why
    try:
        engine = loader(folder)
    except Exception as exc:  # any failure marks this index not ready; the others are served
        why = f"{type(exc).__name__}: {exc}"
        log.warning("index %s not loaded: %s", folder.name, why)
        return why
    if engine.model_error is not None and engine.data.manifest.model.spec is not None:
        log.warning("index %s: raw-input queries refused: %s", folder.name, engine.model_error)
    return engine
