"""FAISS in one place: build an inner-product index over score vectors, write and read it, place it on GPUs.

The vectors are those of DESIGN.md 1.3 (vector form): every single-example score is monotone in
``<a_q, z_i>`` (or its magnitude), so exact top-k is maximum-inner-product search.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from indexer.exceptions import IndexCorruptError

__all__ = [
    "check_factory",
    "make_faiss_index",
    "write_faiss_index",
    "read_faiss_index",
    "stores_inverted_lists",
    "merged_shards",
    "shards_of",
    "gpu_count",
    "to_gpus",
    "max_norm",
]


def check_factory(k: int, factory: str) -> None:
    """Refuse a factory string FAISS cannot build for dimension ``k`` (before any featurization).

    Raises:
        ValueError: FAISS rejects the string (the message quotes FAISS).
    """
    try:
        faiss.index_factory(int(k), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS rejects the factory string {factory!r} for dimension {k}: {exc}") from exc


def make_faiss_index(vectors: np.ndarray, factory: str) -> faiss.Index:
    """A FAISS inner-product index over ``vectors``.

    Args:
        vectors: `(n, k)` vectors (stored as float32).
        factory: ``faiss.index_factory`` string, e.g. ``"Flat"`` (exact) or ``"IVF64,Flat"``.

    Returns:
        The trained, filled index (metric: inner product).

    Raises:
        ValueError: FAISS rejects the factory string.
    """
    z = np.ascontiguousarray(vectors, dtype=np.float32)
    try:
        index = faiss.index_factory(z.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS rejects the factory string {factory!r}: {exc}") from exc
    if not index.is_trained:
        index.train(z)
    index.add(z)
    return index


def write_faiss_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` in FAISS's own format (no pickle)."""
    faiss.write_index(index, str(path))


def stores_inverted_lists(factory: str, k: int) -> bool:
    """Whether ``factory`` builds an IVF index (beneath any pre-transform) for dimension ``k``: which of
    FAISS's mmap IO flags applies to its file (DESIGN.md 2.1). Builds the empty index once.

    Raises:
        ValueError: FAISS rejects the factory string.
    """
    try:
        empty = faiss.index_factory(int(k), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS rejects the factory string {factory!r} for dimension {k}: {exc}") from exc
    try:
        faiss.extract_index_ivf(empty)
    except RuntimeError:
        return False
    return True


def read_faiss_index(path: Path, n: int, k: int, factory: str, memory_map: bool = True) -> faiss.Index:
    """Read a FAISS index and check that it holds ``n`` vectors of dimension ``k``.

    Memory-mapped by default (DESIGN.md 2.1), read-only: an IVF index gets FAISS's ``IO_FLAG_MMAP`` (its
    inverted lists become an ``OnDiskInvertedLists`` over the file), any other (HNSW's storage, flat and
    scalar-quantised codes) ``IO_FLAG_MMAP_IFC`` (its flat codes are mapped). Pages of the file are read
    when a search touches them and belong to the page cache, shared by every process serving the index.
    The mapped lists' prefetch threads are turned off (they cost more than the search). FAISS aborts the
    process when a read-only mapped index is modified: read with ``memory_map=False`` for an index to add
    to or clone.

    Args:
        path: the index file (its checksum is verified by the reader before this is called).
        n: expected number of vectors; k: expected dimension.
        factory: the manifest's factory string (which mapping applies).
        memory_map: map the file (True) or read it into RAM (False, a modifiable index).

    Returns:
        The index, on the CPU.

    Raises:
        IndexCorruptError: FAISS cannot read the file, or its size disagrees with the manifest.
    """
    flags, ivf = 0, False
    if memory_map:
        try:
            ivf = stores_inverted_lists(factory, k)
        except ValueError as exc:
            raise IndexCorruptError(f"{path}: {exc}") from exc
        flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC)
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise IndexCorruptError(f"{path} is not a FAISS index FAISS can read: {exc}") from exc
    if index.d != k or index.ntotal != n:
        raise IndexCorruptError(
            f"{path} holds {index.ntotal} vectors of dimension {index.d}; expected {n} x {k}"
        )
    if memory_map and ivf:
        # the mapped lists' prefetch starts 32 threads per search: 2.2 ms against 0.9 ms for IVF1024,Flat
        # at N = 100,000 on one thread; the pages come from the page cache on demand instead
        lists = faiss.extract_index_ivf(index).invlists
        mapped = faiss.downcast_InvertedLists(lists) if lists is not None else None
        if isinstance(mapped, faiss.OnDiskInvertedLists):
            mapped.prefetch_nthread = 0
    return index


def merged_shards(shards: Sequence[faiss.Index]) -> faiss.Index:
    """One index over ``shards`` (FAISS ``IndexShards``, ids numbered on across the shards in order):
    a search asks every shard for its top-k and keeps the best k (DESIGN.md 2.1, 2.3). Shards trained alike
    (the same IVF quantizer) answer as one index holding every vector would; the sole shard itself for one.
    ``d`` of the result is the shards' dimension k; ``ntotal`` the sum of theirs.

    Raises:
        ValueError: no shards, or shards of different dimensions.
    """
    if not shards:
        raise ValueError("merged_shards needs at least one shard")
    if len(shards) == 1:
        return shards[0]
    d = shards[0].d
    if any(shard.d != d for shard in shards):
        raise ValueError(f"shards of dimensions {[shard.d for shard in shards]}; they must agree")
    merged = faiss.IndexShards(d)  # FAISS's defaults: not threaded, successive ids
    for shard in shards:
        merged.add_shard(shard)  # faiss keeps a reference to each shard
    return merged


def shards_of(index: faiss.Index) -> list[faiss.Index]:
    """The shards of a merged index (:func:`merged_shards`), downcast, in id order; ``[index]`` (downcast)
    for any other (DESIGN.md 2.1). Raises nothing."""
    inner = faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexShards):
        return [inner]
    at = getattr(inner, "at")  # noqa: B009  # IndexShards.at and .count are absent from faiss's type stubs
    return [faiss.downcast_index(at(j)) for j in range(getattr(inner, "count")())]  # noqa: B009


def gpu_count() -> int:
    """GPUs that FAISS can use: 0 with faiss-cpu, which has no GPU support."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


def to_gpus(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` spread over every GPU FAISS sees (faiss-gpu, the ``gpu`` extra).

    Raises:
        ValueError: FAISS sees no GPU (faiss-cpu, or no device).
    """
    if gpu_count() == 0:
        raise ValueError(
            "FAISS sees no GPU (faiss-cpu, or no device): install the gpu extra on a GPU machine, or search "
            "on the CPU"
        )
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexShards):  # each shard copied on its own, merged again
        return merged_shards([faiss.index_cpu_to_all_gpus(shard) for shard in shards_of(inner)])
    return faiss.index_cpu_to_all_gpus(index)


def max_norm(index: faiss.Index) -> float:
    """Largest Euclidean norm of the vectors a flat index holds (0 for an empty one), read back from it.

    Used for the float32 slack of the exactness bound of retrieval; only flat indexes can reconstruct
    their vectors exactly.
    """
    return float(np.linalg.norm(index.reconstruct_n(0, index.ntotal), axis=1).max(initial=0.0))
