"""FAISS in one place: build an inner-product index over score vectors, write and read it, place it on GPUs.

The vectors are those of DESIGN.md 1.3 (vector form): every single-example score is monotone in
``<a_q, z_i>`` (or its magnitude), so exact top-k is maximum-inner-product search.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from indexer.exceptions import IndexCorruptError

__all__ = [
    "check_factory",
    "make_faiss_index",
    "write_faiss_index",
    "read_faiss_index",
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


def read_faiss_index(path: Path, n: int, k: int) -> faiss.Index:
    """Read a FAISS index and check that it holds ``n`` vectors of dimension ``k``.

    Args:
        path: the index file (its checksum is verified by the reader before this is called).
        n: expected number of vectors; k: expected dimension.

    Returns:
        The index, on the CPU.

    Raises:
        IndexCorruptError: FAISS cannot read the file, or its size disagrees with the manifest.
    """
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexCorruptError(f"{path} is not a FAISS index FAISS can read: {exc}") from exc
    if index.d != k or index.ntotal != n:
        raise IndexCorruptError(
            f"{path} holds {index.ntotal} vectors of dimension {index.d}; expected {n} x {k}"
        )
    return index


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
    return faiss.index_cpu_to_all_gpus(index)


def max_norm(index: faiss.Index) -> float:
    """Largest Euclidean norm of the vectors a flat index holds (0 for an empty one), read back from it.

    Used for the float32 slack of the exactness bound of retrieval; only flat indexes can reconstruct
    their vectors exactly.
    """
    return float(np.linalg.norm(index.reconstruct_n(0, index.ntotal), axis=1).max(initial=0.0))
