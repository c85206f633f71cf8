"""The indexes a service holds: every subfolder of the index root with a manifest, loaded and verified."""

from __future__ import annotations

import logging
import re
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

    Args:
        engines: name -> engine of each healthy index.
        failures: name -> why that index is not served.
        root: the index root they were loaded from.
    """

    def __init__(self, engines: dict[str, AttributionEngine], failures: dict[str, str], root: Path) -> None:
        self.engines = engines
        self.failures = failures
        self.root = root

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
        engines: dict[str, AttributionEngine] = {}
        failures: dict[str, str] = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (folder / MANIFEST_FILE).is_file():
                continue
            if not re.fullmatch(INDEX_NAME_PATTERN, folder.name):  # no URL could reach it
                failures[folder.name] = (
                    f"the folder name {folder.name!r} is not a valid index name ({INDEX_NAME_PATTERN}: ASCII "
                    "letters, digits, '_', '.', '-', at most 128 characters); rename the folder"
                )
                log.warning("index %s not loaded: %s", folder.name, failures[folder.name])
                continue
            try:
                engine = AttributionEngine(
                    load_index(folder),
                    projection_cache_bytes,
                    (checkpoints or {}).get(folder.name),
                    trusted_factories,
                    use_gpu,
                )
            except Exception as exc:  # any failure marks this index not ready; the others are served
                failures[folder.name] = f"{type(exc).__name__}: {exc}"
                log.warning("index %s not loaded: %s", folder.name, failures[folder.name])
                continue
            if engine.model_error is not None and engine.data.manifest.model.spec is not None:
                log.warning("index %s: raw-input queries refused: %s", folder.name, engine.model_error)
            engines[folder.name] = engine
        for name in sorted(set(checkpoints or {}) - set(engines) - set(failures)):
            log.warning("INFOTRACE_MODEL_CHECKPOINTS names %r, which is not an index under %s", name, root)
        log.info("serving %d index(es) from %s: %s", len(engines), root, sorted(engines))
        return cls(engines, failures, root)

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
