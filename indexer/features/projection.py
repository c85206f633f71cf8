"""Seeded random projections of tangent features (DESIGN.md 1.1, 1.7).

Two structures:

- :class:`DenseProjection`: ``phi = R^T g`` with R a `(n_params, k)` matrix of i.i.d. N(0, 1/k) (or
  +-1/sqrt(k)) entries, cut into row blocks of :data:`PROJECTION_BLOCK_ROWS` rows; block b is drawn from its
  own ``numpy`` generator seeded with ``(seed, b)``. The features depend only on (seed, distribution, k,
  n_params), never on how many blocks are held at once. It needs whole per-example gradients: the
  reference, for small models.
- :class:`KroneckerProjection`: per layer, ``phi_l = vec(R_row^T G R_col)`` for the 2-D gradient G of a
  weight matrix (DESIGN.md 1.7); the plan of blocks is made from the model by
  :func:`indexer.features.hooks.plan_kronecker` and applied by :class:`indexer.features.hooks.
  HookFeaturizer`. Each block's two matrices come from :func:`seeded_matrix`, keyed by (seed, parameter
  name), so features do not depend on batch size, device or the order in which layers run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from indexer.enums import BlockProjection, Distribution, parse_enum

__all__ = [
    "PROJECTION_BLOCK_ROWS",
    "DenseProjection",
    "LayerBlock",
    "RestBlock",
    "KroneckerProjection",
    "seeded_matrix",
]

PROJECTION_BLOCK_ROWS = 4096
"""Rows of the projection matrix generated per seeded block. Fixed so that features do not depend on
how many blocks are processed at a time (DESIGN.md 1.1: same seed, same model => same features)."""


def _entries(rng: np.random.Generator, shape: tuple[int, int], distribution: Distribution) -> np.ndarray:
    """i.i.d. standard entries (N(0, 1) or +-1) as float32, unscaled."""
    if distribution is Distribution.GAUSSIAN:
        return rng.standard_normal(shape, dtype=np.float32)
    return rng.integers(0, 2, size=shape, dtype=np.int8).astype(np.float32) * 2 - 1


def _name_words(name: str) -> list[int]:
    """The first 16 bytes of the sha256 of ``name`` as four uint32 words: a generator's seed material."""
    return [int(w) for w in np.frombuffer(hashlib.sha256(name.encode()).digest()[:16], dtype=np.uint32)]


def seeded_matrix(
    seed: int, name: str, rows: int, cols: int, distribution: Distribution | str = Distribution.GAUSSIAN
) -> np.ndarray:
    """A `(rows, cols)` float32 matrix with i.i.d. N(0, 1/cols) (or +-1/sqrt(cols)) entries, so that
    E[M M^T] = I, drawn from a generator seeded by ``seed`` and the sha256 of ``name``.

    Args:
        seed: non-negative projection seed.
        name: what the matrix is for, e.g. ``"0.weight/row"``; another name gives an independent matrix.
        rows, cols: its shape (both positive).
        distribution: ``"gaussian"`` or ``"rademacher"``.

    Returns:
        `(rows, cols)` float32, the same on every machine for the same arguments.

    Raises:
        ValueError: a non-positive shape, a negative seed, an unknown distribution.
    """
    if rows <= 0 or cols <= 0 or seed < 0:
        raise ValueError(f"rows and cols must be positive and seed non-negative; got {rows}, {cols}, {seed}")
    rng = np.random.default_rng([int(seed), *_name_words(name)])
    values = _entries(rng, (rows, cols), parse_enum(Distribution, distribution))
    values *= np.float32(1.0 / math.sqrt(cols))
    return values


class DenseProjection:
    """The dense projection R of DESIGN.md 1.1, generated block by block.

    Args:
        n_params: P, length of the tangent feature (number of model parameters).
        k: projected dimension.
        seed: non-negative integer seed.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        cache_bytes: keep generated blocks in memory while their total stays within this many bytes
            (0: regenerate on every call, so memory stays at one block). The service caches small
            projections to featurize queries in milliseconds; the indexer keeps memory bounded.

    Raises:
        ValueError: non-positive ``n_params`` or ``k``, negative ``seed``, unknown ``distribution``.
    """

    def __init__(
        self,
        n_params: int,
        k: int,
        seed: int = 0,
        distribution: Distribution | str = Distribution.GAUSSIAN,
        cache_bytes: int = 0,
    ) -> None:
        if n_params <= 0 or k <= 0:
            raise ValueError(f"n_params and k must be positive; got n_params={n_params}, k={k}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative; got {seed}")
        self.n_params = int(n_params)
        self.k = int(k)
        self.seed = int(seed)
        self.distribution = parse_enum(Distribution, distribution)
        self.n_blocks = math.ceil(self.n_params / PROJECTION_BLOCK_ROWS)
        whole_bytes = self.n_params * self.k * 4
        self._cache: list[np.ndarray] | None = [] if 0 < whole_bytes <= cache_bytes else None

    def block(self, b: int) -> np.ndarray:
        """Transposed block b of R.

        Args:
            b: block number, ``0 <= b < n_blocks``.

        Returns:
            `(k, rows_b)` float32, the rows ``[b * PROJECTION_BLOCK_ROWS, ...)`` of R, transposed so that
            ``block @ g_chunk`` is a contiguous matrix product.
        """
        if self._cache is not None and b < len(self._cache):
            return self._cache[b]
        start = b * PROJECTION_BLOCK_ROWS
        rows = min(PROJECTION_BLOCK_ROWS, self.n_params - start)
        rng = np.random.default_rng([self.seed, b])
        values = _entries(rng, (self.k, rows), self.distribution)
        values *= np.float32(1.0 / math.sqrt(self.k))
        if self._cache is not None and b == len(self._cache):
            self._cache.append(values)
        return values

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(row_slice, block)`` for every block of R, in order (see :meth:`block`)."""
        for b in range(self.n_blocks):
            start = b * PROJECTION_BLOCK_ROWS
            yield slice(start, min(start + PROJECTION_BLOCK_ROWS, self.n_params)), self.block(b)

    def project(self, gradients: np.ndarray) -> np.ndarray:
        """phi = R^T g for a batch of tangent features.

        Args:
            gradients: `(n, n_params)` float32 (other float dtypes are cast) tangent features g.

        Returns:
            `(n, k)` float32 projected features.

        Raises:
            ValueError: the second dimension is not ``n_params``.
        """
        g = np.asarray(gradients)
        if g.ndim != 2 or g.shape[1] != self.n_params:
            raise ValueError(f"gradients must have shape (n, {self.n_params}); got {g.shape}")
        # torch's matmul on the numpy buffers (no copies): it shares the thread pool that computed the
        # gradients, where numpy's BLAS threads would contend with torch's (3x slower per query, measured)
        g_t = torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))
        out = torch.zeros((g_t.shape[0], self.k), dtype=torch.float32)
        for rows, block in self.blocks():
            out.addmm_(g_t[:, rows], torch.from_numpy(block).T)
        return out.numpy()

    def matrix(self) -> np.ndarray:
        """The whole of R as `(n_params, k)` float32: for tests on small problems only."""
        return np.concatenate([block.T for _, block in self.blocks()], axis=0)


@dataclass(frozen=True)
class LayerBlock:
    """One per-layer block (DESIGN.md 1.7): the 2-D gradient ``G`` `(rows, cols)` of one weight matrix (its
    bias, when the layer has one, is one more column on the input side) projected to
    ``R_row^T G R_col`` `(k_row, k_col)`, flattened row-major into ``k_row * k_col`` features; or, for a
    small layer (projected whole), ``R^T vec(G)`` with one `(rows * cols, k_row)` matrix R (``k_col = 1``):
    a count sketch (:meth:`count_sketch`) by default, a seeded Gaussian one in indexes built before it.

    Why whole blocks: a two-sided block estimates an inner product of two gradients as the product of two
    sketches, one of each side, of ``k_row`` and ``k_col`` dimensions, so its relative error is about
    ``1/sqrt(k_row) + 1/sqrt(k_col)`` where one sketch of vec(G) with the same ``k`` features has
    ``1/sqrt(k)`` (Johnson-Lindenstrauss). On the quality harness's MLP 784-64-10 at k = 512 the two-sided
    first layer (64 x 785 -> 16 x 16) cost 0.06 of LDS against the dense projection; projected whole per
    layer (the same 256 features) it is within 0.01 (benchmarks/results/QUALITY.md). A count sketch of
    ``x`` estimates ``<x, y>`` without bias and with a variance ``(|x|^2 |y|^2 + <x, y>^2 - 2 sum_i x_i^2
    y_i^2) / k``, never above a Gaussian sketch's ``(|x|^2 |y|^2 + <x, y>^2) / k`` (Charikar et al. 2002;
    Weinberger et al. 2009), for one add per entry instead of k multiply-adds and no matrix to hold. A
    whole block forms G per example, so it is used only below a parameter count
    (:func:`~indexer.features.plan.plan_kronecker`'s ``small_params``).

    Attributes:
        name: the weight's parameter name (``model.named_parameters()``), the seeding key.
        layer: the module kind: ``linear``, ``conv1d``, ``conv2d``, ``conv3d``, ``embedding`` or
            ``gpt2_conv1d`` (transformers' ``Conv1D``, weight `(d_in, d_out)`).
        params: the parameters the block covers (the weight, and the bias if any).
        rows, cols: the shape of G: for ``linear`` and ``conv*`` (d_out, d_in [+ 1]); ``embedding``
            (num_embeddings, dim); ``gpt2_conv1d`` (d_in [+ 1], d_out).
        k_row, k_col: the projected sizes (a whole block: its ``k`` features and 1).
        projection: two-sided (``kronecker``) or whole (``count_sketch``, ``dense``).
    """

    name: str
    layer: str
    params: tuple[str, ...]
    rows: int
    cols: int
    k_row: int
    k_col: int
    projection: BlockProjection = BlockProjection.KRONECKER

    def __post_init__(self) -> None:
        """Accept the projection as its string value too (``"count_sketch"``).

        Raises:
            ValueError: an unknown projection (the message lists the allowed ones).
        """
        object.__setattr__(self, "projection", parse_enum(BlockProjection, self.projection))

    @property
    def k(self) -> int:
        """Features of this block, ``k_row * k_col``."""
        return self.k_row * self.k_col

    @property
    def whole(self) -> bool:
        """Whether the block projects vec(G) as one vector (its two sides are identities)."""
        return self.projection is not BlockProjection.KRONECKER

    def matrices(self, seed: int, distribution: Distribution) -> tuple[np.ndarray, np.ndarray]:
        """``(R_row, R_col)``: `(rows, k_row)` and `(cols, k_col)` float32, seeded by (seed, name).

        Raises:
            ValueError: a whole block (its sides are identities, never formed: :meth:`whole_matrix`).
        """
        if self.whole:
            raise ValueError(f"block {self.name!r} is projected whole: it has no side matrices")
        return (
            seeded_matrix(seed, f"{self.name}/row", self.rows, self.k_row, distribution),
            seeded_matrix(seed, f"{self.name}/col", self.cols, self.k_col, distribution),
        )

    def count_sketch(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A count-sketch block's R as ``(columns, signs)``: `(rows * cols,)` int64 in ``[0, k)`` and
        `(rows * cols,)` float32 +-1, entry i of vec(G) (row-major) added with its sign to feature
        ``columns[i]``; drawn from a generator seeded by ``seed`` and the sha256 of ``"<name>/count_sketch"``
        (columns first, then signs), the same on every machine.

        Raises:
            ValueError: the block is not a count sketch, or a negative seed.
        """
        if self.projection is not BlockProjection.COUNT_SKETCH:
            raise ValueError(f"block {self.name!r} is {self.projection.value}, not count_sketch")
        if seed < 0:
            raise ValueError(f"seed must be non-negative; got {seed}")
        rng = np.random.default_rng([int(seed), *_name_words(f"{self.name}/count_sketch")])
        n = self.rows * self.cols
        columns = rng.integers(0, self.k, size=n, dtype=np.int64)
        signs = rng.integers(0, 2, size=n, dtype=np.int8).astype(np.float32) * 2 - 1
        return columns, signs

    def whole_matrix(self, seed: int, distribution: Distribution) -> np.ndarray:
        """A whole block's R, `(rows * cols, k)` float32, applied to vec(G) flattened row-major: the count
        sketch's as a matrix (for tests: the hooks apply it as a scatter-add), or the Gaussian (or
        Rademacher) N(0, 1/k) entries seeded by (seed, ``"<name>/dense"``).

        Raises:
            ValueError: a two-sided block (it has two matrices: :meth:`matrices`).
        """
        if self.projection is BlockProjection.COUNT_SKETCH:
            columns, signs = self.count_sketch(seed)
            r = np.zeros((self.rows * self.cols, self.k), dtype=np.float32)
            r[np.arange(len(columns)), columns] = signs
            return r
        if self.projection is BlockProjection.DENSE:
            return seeded_matrix(seed, f"{self.name}/dense", self.rows * self.cols, self.k, distribution)
        raise ValueError(f"block {self.name!r} is two-sided: it has no whole matrix")

    def project_whole(self, vec_g: np.ndarray, seed: int, distribution: Distribution) -> np.ndarray:
        """``R^T vec(G)`` `(k,)` float64 of a whole block for one example's `(rows * cols,)` gradient, without
        forming a count sketch's R (one weighted bincount).

        Raises:
            ValueError: a two-sided block.
        """
        g = np.asarray(vec_g, dtype=np.float64).reshape(-1)
        if self.projection is BlockProjection.COUNT_SKETCH:
            columns, signs = self.count_sketch(seed)
            return np.bincount(columns, weights=signs * g, minlength=self.k)
        return g @ self.whole_matrix(seed, distribution).astype(np.float64)

    def to_json(self) -> dict[str, Any]:
        """The manifest's record of this block."""
        return {
            "name": self.name,
            "layer": self.layer,
            "params": list(self.params),
            "rows": self.rows,
            "cols": self.cols,
            "k_row": self.k_row,
            "k_col": self.k_col,
            "projection": self.projection.value,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> LayerBlock:
        """Inverse of :meth:`to_json`; a record from before whole blocks (no ``projection``) is two-sided.

        Raises:
            KeyError, TypeError, ValueError: a record without these fields, or another projection.
        """
        return cls(
            name=str(record["name"]),
            layer=str(record["layer"]),
            params=tuple(str(p) for p in record["params"]),
            rows=int(record["rows"]),
            cols=int(record["cols"]),
            k_row=int(record["k_row"]),
            k_col=int(record["k_col"]),
            projection=parse_enum(BlockProjection, record.get("projection", "kronecker")),
        )


@dataclass(frozen=True)
class RestBlock:
    """The parameters outside supported layers (DESIGN.md 1.7): their per-example gradients (in
    ``params`` order) dense-projected to ``k`` features, or left out (``k = 0``).

    Attributes:
        params: the parameter names, in ``model.named_parameters()`` order.
        sizes: their element counts.
        k: features (0: left out).
    """

    params: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    k: int = 0

    @property
    def n_params(self) -> int:
        """Total number of parameters in the rest block."""
        return int(sum(self.sizes))


@dataclass(frozen=True)
class KroneckerProjection:
    """The plan of a per-layer, two-sided projection: its blocks, in model order, then the rest block.

    Attributes:
        seed: projection seed.
        distribution: entries of the matrices.
        blocks: the :class:`LayerBlock` of every covered weight.
        rest: the :class:`RestBlock` of every other trainable parameter.
        n_params: P, all trainable parameters of the model.
    """

    seed: int
    distribution: Distribution
    blocks: tuple[LayerBlock, ...]
    rest: RestBlock = field(default_factory=RestBlock)
    n_params: int = 0

    @property
    def k(self) -> int:
        """Total projected dimension: the blocks' features, then the rest block's."""
        return sum(b.k for b in self.blocks) + self.rest.k

    @property
    def covered(self) -> int:
        """Parameters whose gradient reaches the features (the blocks', and the rest's when projected)."""
        return self.n_params - (0 if self.rest.k else self.rest.n_params)

    @classmethod
    def from_coverage_json(
        cls, seed: int, distribution: Distribution | str, record: dict[str, Any]
    ) -> KroneckerProjection:
        """The plan recorded by :meth:`coverage_json` (in the manifest).

        Raises:
            KeyError, TypeError, ValueError: a record without these fields.
        """
        rest = record["rest"]
        return cls(
            seed=int(seed),
            distribution=parse_enum(Distribution, distribution),
            blocks=tuple(LayerBlock.from_json(b) for b in record["blocks"]),
            rest=RestBlock(
                tuple(str(p["name"]) for p in rest["params"]),
                tuple(int(p["numel"]) for p in rest["params"]),
                int(rest["k"]),
            ),
            n_params=int(record["n_params"]),
        )

    def coverage_json(self) -> dict[str, Any]:
        """The manifest's coverage record: every block, every other parameter and what became of it."""
        return {
            "blocks": [b.to_json() for b in self.blocks],
            "rest": {
                "params": [
                    {"name": n, "numel": s} for n, s in zip(self.rest.params, self.rest.sizes, strict=True)
                ],
                "treatment": "dense" if self.rest.k else ("omit" if self.rest.params else "none"),
                "k": self.rest.k,
            },
            "n_params": self.n_params,
            "covered_fraction": self.covered / self.n_params if self.n_params else 1.0,
        }
