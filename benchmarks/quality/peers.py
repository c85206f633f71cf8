"""Peer attribution methods behind one interface, each run through its own package's published API.

The quality benchmark compares infotrace with five peers on the same classifier and data
(key: method, package class, the argument the damping feeds):

- ``traker_trak``: TRAK, one checkpoint, ``trak.TRAKer``, ``lambda_reg``;
- ``dattri_tracin``: Grad-Dot, ``TracInAttributor`` with weight 1 and raw gradients, no damping;
- ``dattri_if_cg``: influence function by CG, ``IFAttributorCG``, ``regularization``;
- ``dattri_trak``: TRAK, one checkpoint, ``TRAKAttributor``, ``regularization``;
- ``captum_tracincp``: TracInCP, one checkpoint, ``captum.influence.TracInCP``, no damping.

Each damping is in its package's own units, which differ: traker adds ``lambda_reg I`` to
``Phi^T Phi`` with ``phi = R^T g / sqrt(P)`` and ``R`` standard normal, dattri's TRAK to the same
matrix with ``R`` scaled by ``1 / sqrt(k)`` (so k times smaller), dattri's IF to the Hessian of the
mean training loss.

Output function: the classification margin ``m = z_y - logsumexp_{c != y} z_c`` (DESIGN.md 1.1), the
quantity every query asks about. Where a package needs a training loss it gets the cross-entropy
written as ``softplus(-m)``, which equals ``-log softmax_y`` exactly and keeps the gradient
``-(1 - p) grad m`` accurate for confident examples (``softmax - onehot`` rounds to 0 there).
Because ``grad CE = -(1 - p) grad m``, a package that pairs a loss gradient on the training side with a
margin gradient on the query side returns ``-(1 - p_i) grad m_i . (...) grad m_q``: those adapters
flip the sign.

Sign convention of every :meth:`PeerMethod.scores`: positive = proponent, i.e. training on example i
raises the query's margin (lowers its loss).

EK-FAC (``IFAttributorEKFAC``) is not used: in dattri 0.3.0 its ``transform_test_rep`` reshapes the
concatenation ``[vec(W), b]`` to ``(out, in + 1)`` as if it were ``[W | b]`` row by row (so every
``nn.Linear`` with a bias gets scrambled coordinates), and it rotates with ``q @ V @ q.T`` where
``torch.linalg.eigh`` returns eigenvectors as columns (``q.T @ V @ q`` is the eigenbasis). On a
logistic regression of sklearn's digits the package's inverse-Fisher-vector products are off from the
exact ``(F + lambda I)^-1 v`` by a relative error of 1.5 (no bias) and 2.1 (bias), against 0.7 for
EK-FAC in the right basis. The influence function therefore runs as IF-CG.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import logging
import math
import shutil
import tempfile
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.quality.retrain import data_hash, margins

__all__ = [
    "PeerMethod",
    "TrakerTRAK",
    "DattriGradDot",
    "DattriInfluenceCG",
    "DattriTRAK",
    "CaptumTracInCP",
    "peer_methods",
    "missing_peers",
    "PEER_PACKAGES",
]

PEER_PACKAGES: dict[str, str] = {"traker": "trak", "dattri": "dattri", "captum": "captum.influence"}
"""Distribution name -> the module the adapters import from it."""

_BATCH = 1000
"""Training examples per per-example-gradient batch: 1,000 x 50,890 float32 gradients are 204 MB."""


def missing_peers() -> list[str]:
    """Distribution names of the peer packages that cannot be imported.

    Returns:
        e.g. ``["captum"]``; empty when all three import.
    """
    missing = []
    for dist, module in PEER_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing


def _package(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (not installed)"


# ---- output function and loss -------------------------------------------------------------------


def _batch_margins(model: nn.Module, params: Any, x: torch.Tensor, y: torch.Tensor, shape) -> torch.Tensor:
    """Margins of a batch, or of ONE example passed without (or with a size-1) batch axis.

    dattri calls per-example functions under ``vmap`` with ``x`` `(*shape)` or `(1, *shape)`; reshaping
    to `(-1, *shape)` serves both and full batches alike.

    Returns:
        `(n,)` margins.
    """
    logits = functional_call(model, params, (x.reshape(-1, *shape),))
    return margins(logits, y.reshape(-1))


class _MarginOutput(nn.Module):
    """Captum-style "loss" that is the summed margin of a batch: ``forward(logits, labels)`` -> `()`."""

    reduction = "sum"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margins(logits, labels).sum()


class _MarginCrossEntropy(nn.Module):
    """Summed cross-entropy of a batch written as ``softplus(-m)`` (exactly ``-log softmax_y``)."""

    reduction = "sum"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(-margins(logits, labels)).sum()


# ---- interface ----------------------------------------------------------------------------------


class PeerMethod(ABC):
    """A peer attribution method, run through its package on a fitted classifier.

    Attributes:
        key: short id, e.g. ``"traker_trak"``.
        name: row label for reports, e.g. ``"TRAK (traker)"``.
        package: distribution and installed version, e.g. ``"traker 0.3.2"``.
        damping_param: the package argument that :meth:`scores`' ``damping`` feeds, in the package's own
            units; None when the method has no damping.
    """

    key: str
    name: str
    package: str
    damping_param: str | None

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None

    @abstractmethod
    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        """Featurize or cache the training set with the package (the expensive step that can be reused).

        The adapter keeps its own copy of ``model``; the caller's module is left untouched.

        Args:
            model: trained classifier mapping `(n, *input_shape)` float32 to `(n, C)` logits.
            train_inputs: `(n_train, *input_shape)` float32.
            train_targets: `(n_train,)` int64 labels in ``0..C-1``.

        Raises:
            ValueError: the inputs and targets disagree in length, or the targets are not int64 `(n,)`.
        """

    @abstractmethod
    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        """Attribution scores of every training example for every query's margin.

        Args:
            query_inputs: `(n_query, *input_shape)` float32.
            query_targets: `(n_query,)` int64, the label whose margin each query asks about.
            damping: value of :attr:`damping_param` (None: the package default, 0); must be None for a
                method without damping.

        Returns:
            `(n_query, n_train)` float64; positive = proponent (training on i raises the query's margin).

        Raises:
            RuntimeError: :meth:`fit` has not been called.
            ValueError: bad query shapes or dtypes, or a damping the method cannot take.
        """

    @abstractmethod
    def self_scores(self, damping: float | None = None) -> np.ndarray:
        """Self-influence of every training example, larger = more self-influential.

        Computed with the package's own self-influence routine where it has one (its definition, which
        may use the loss on both sides), else as the example's score for itself as a query with its
        own label.

        Args:
            damping: as in :meth:`scores`.

        Returns:
            `(n_train,)` float64.

        Raises:
            RuntimeError: :meth:`fit` has not been called.
            ValueError: a damping the method cannot take.
        """

    def close(self) -> None:
        """Drop what :meth:`fit` kept (model copy, training tensors, files); fit again to reuse."""
        self._model = None
        self._train = None

    # -- shared checks and helpers --

    def _set_fitted(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        _check_pairs(train_inputs, train_targets, "train")
        self._model = copy.deepcopy(model).eval()
        self._train = (train_inputs.detach().float().contiguous(), train_targets.detach().contiguous())

    def _fitted(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        if self._model is None or self._train is None:
            raise RuntimeError(f"{self.name}: call fit(model, train_inputs, train_targets) first")
        return self._model, *self._train

    def _check_query(self, query_inputs: torch.Tensor, query_targets: torch.Tensor) -> None:
        _, train_inputs, _ = self._fitted()
        _check_pairs(query_inputs, query_targets, "query")
        if query_inputs.shape[1:] != train_inputs.shape[1:]:
            raise ValueError(
                f"query inputs must have shape (n, {', '.join(map(str, train_inputs.shape[1:]))}) like "
                f"the training inputs; got {tuple(query_inputs.shape)}"
            )

    def _check_damping(self, damping: float | None) -> float:
        if self.damping_param is None:
            if damping is not None:
                raise ValueError(f"{self.name} has no damping; pass damping=None (got {damping!r})")
            return 0.0
        if damping is None:
            return 0.0
        ok = isinstance(damping, int | float) and not isinstance(damping, bool)
        if not (ok and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping ({self.damping_param}) must be a finite number >= 0; got {damping!r}")
        return float(damping)

    @property
    def _shape(self) -> tuple[int, ...]:
        return tuple(self._fitted()[1].shape[1:])

    def _loader(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = _BATCH) -> DataLoader:
        dataset = TensorDataset(inputs.detach().float().contiguous(), targets.detach().contiguous())
        return DataLoader(dataset, batch_size=max(1, min(batch_size, len(dataset))), shuffle=False)

    def _per_example_margin(self) -> Callable:
        """``f(params, (x, y))`` -> summed margin: the margin of one example under dattri's vmap."""
        model, shape = self._fitted()[0], self._shape

        def margin(params, data):
            x, y = data
            return _batch_margins(model, params, x, y, shape).sum()

        return margin

    def _mean_cross_entropy(self) -> Callable:
        """``f(params, (x, y))`` -> mean ``softplus(-m)`` over the batch (one example under vmap)."""
        model, shape = self._fitted()[0], self._shape

        def cross_entropy(params, data):
            x, y = data
            return nn.functional.softplus(-_batch_margins(model, params, x, y, shape)).mean()

        return cross_entropy

    def _checkpoint(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._fitted()[0].state_dict().items()}


def _check_pairs(inputs: torch.Tensor, targets: torch.Tensor, what: str) -> None:
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError(f"{what} inputs and targets must be torch tensors")
    if targets.ndim != 1 or targets.dtype != torch.int64:
        raise ValueError(
            f"{what} targets must be int64 of shape (n,); got {targets.dtype} {tuple(targets.shape)}"
        )
    if inputs.ndim < 2 or len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"{what} inputs must be (n, ...) with n = len(targets) = {len(targets)} > 0; "
            f"got {tuple(inputs.shape)}"
        )


def _as_scores(matrix: torch.Tensor | np.ndarray, n_query: int, n_train: int, sign: float) -> np.ndarray:
    """A package's `(n_train, n_query)` matrix as our `(n_query, n_train)` float64, times ``sign``."""
    out = np.asarray(matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else matrix)
    out = sign * out.astype(np.float64).T
    if out.shape != (n_query, n_train):
        raise RuntimeError(f"package returned scores of shape {out.T.shape}, expected {(n_train, n_query)}")
    return np.ascontiguousarray(out)


# ---- 1. TRAK (traker) ---------------------------------------------------------------------------


class TrakerTRAK(PeerMethod):
    """TRAK from ``traker`` with one checkpoint, on the CPU (its ``BasicProjector``, Gaussian entries).

    traker's ``image_classification`` model output is exactly the margin, and its out-to-loss term is
    ``1 - p_i``, so a score is ``(1 - p_i) phi_q^T (Phi^T Phi + lambda_reg I)^-1 phi_i`` with
    ``phi = R^T grad m / sqrt(P)``: positive = proponent as it comes. traker then divides the inverse by
    its mean absolute entry (its own float16 safeguard), so the overall scale varies with the damping;
    rankings do not. Arrays are kept in float32 (``use_half_precision=False``).

    :meth:`fit` featurizes (traker's ``featurize``: per-example gradients, projection). Each damping
    costs only ``finalize_features`` (the k x k inverse, from the projected gradients traker keeps) and
    ``finalize_scores``; the projected gradients of a query set are computed once and reused.

    Args:
        projection_dim: k, traker's ``proj_dim``.
        seed: traker's ``projector_seed``.
    """

    key = "traker_trak"
    name = "TRAK (traker)"
    damping_param = "lambda_reg"

    def __init__(self, projection_dim: int, seed: int = 0) -> None:
        super().__init__()
        self.package = _package("traker")
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        self._traker: Any = None
        self._save_dir: str | None = None
        self._cleanup: weakref.finalize | None = None
        self._lambda: float | None = None
        self._experiments: dict[str, str] = {}  # data_hash of a target set -> traker experiment

    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType

        self.close()
        self._set_fitted(model, train_inputs, train_targets)
        model_copy, x, y = self._fitted()
        self._save_dir = tempfile.mkdtemp(prefix="peers-traker-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._save_dir, ignore_errors=True)
        n_params = sum(p.numel() for p in model_copy.parameters())
        # traker's CPU projector regenerates its matrix block by block, except with a single block
        # (proj_dim <= block_size), where it keeps the matrix that finalize_features has just freed and
        # then fails on the next query; at least two blocks avoid that traker 0.3.2 bug.
        projector = BasicProjector(
            grad_dim=n_params,
            proj_dim=self.projection_dim,
            seed=self.seed,
            proj_type=ProjectionType.normal,
            device="cpu",
            block_size=min(100, max(1, math.ceil(self.projection_dim / 2))),
            dtype=torch.float32,
        )
        self._traker = TRAKer(
            model=model_copy,
            task="image_classification",
            train_set_size=len(x),
            save_dir=self._save_dir,
            load_from_save_dir=True,  # False skips creating experiments.json, which scoring needs
            device="cpu",
            projector=projector,
            proj_dim=self.projection_dim,
            logging_level=logging.WARNING,
            use_half_precision=False,
            projector_seed=self.seed,
            lambda_reg=0.0,
        )
        self._traker.load_checkpoint(self._checkpoint(), model_id=0)
        for start in range(0, len(x), _BATCH):
            batch = (x[start : start + _BATCH], y[start : start + _BATCH])
            self._traker.featurize(batch=batch, num_samples=len(batch[0]))
        self._lambda = None
        self._experiments = {}

    def _finalize(self, lambda_reg: float) -> None:
        if self._lambda == lambda_reg:
            return
        if self._traker.saver.model_ids[0]["is_finalized"]:
            # traker refuses to finalize a checkpoint twice; clearing its flag makes finalize_features
            # recompute (Phi^T Phi + lambda_reg I)^-1 from the projected gradients it keeps on disk.
            self._traker.saver.model_ids[0]["is_finalized"] = 0
        projector = self._traker.projector
        if not projector.proj_matrix_available:
            # finalize_features starts by freeing the projection matrix, and a second free with no
            # projection in between raises AttributeError (traker 0.3.2); regenerating it (seeded,
            # identical) makes the free valid.
            projector.generate_sketch_matrix(projector.generator_states[0])
        self._traker.score_computer.lambda_reg = lambda_reg
        self._traker.finalize_features(model_ids=[0])
        self._lambda = lambda_reg

    def _score_matrix(self, inputs: torch.Tensor, targets: torch.Tensor, lambda_reg: float) -> np.ndarray:
        """traker's `(n_train, n_targets)` scores; a target set's projected gradients are made once."""
        self._finalize(lambda_reg)  # traker scores only against finalized features
        digest = data_hash(inputs, targets)
        if digest not in self._experiments:
            exp_name = f"targets{len(self._experiments)}"
            self._traker.start_scoring_checkpoint(
                exp_name=exp_name, checkpoint=self._checkpoint(), model_id=0, num_targets=len(inputs)
            )
            for start in range(0, len(inputs), _BATCH):
                batch = (inputs[start : start + _BATCH].float(), targets[start : start + _BATCH])
                self._traker.score(batch=batch, num_samples=len(batch[0]))
            self._experiments[digest] = exp_name
        matrix = self._traker.finalize_scores(exp_name=self._experiments[digest], model_ids=[0])
        return np.array(matrix, dtype=np.float64)

    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        lambda_reg = self._check_damping(damping)
        self._check_query(query_inputs, query_targets)
        matrix = self._score_matrix(query_inputs, query_targets, lambda_reg)
        return _as_scores(matrix, len(query_inputs), len(self._fitted()[1]), sign=1.0)

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        """traker has no self-influence routine: the diagonal of the train-vs-train score matrix."""
        lambda_reg = self._check_damping(damping)
        _, x, y = self._fitted()
        return np.ascontiguousarray(np.diagonal(self._score_matrix(x, y, lambda_reg)), dtype=np.float64)

    def close(self) -> None:
        """Delete traker's save directory (projected gradients, features, score files)."""
        if self._cleanup is not None:
            self._cleanup()
        self._cleanup = None
        self._traker = None
        self._save_dir = None
        super().close()


# ---- 2. Grad-Dot (dattri TracIn) ----------------------------------------------------------------


def _projector_kwargs(projection_dim: int, seed: int) -> dict[str, Any]:
    # Every key is given: dattri's attributors .update() a module-level default dict in place, so
    # anything left out would silently come from whichever attributor was built before.
    return {
        "proj_dim": int(projection_dim),
        "proj_max_batch_size": 32,
        "proj_seed": int(seed),
        "proj_type": "normal",
        "device": "cpu",
    }


class DattriGradDot(PeerMethod):
    """Grad-Dot: dattri's ``TracInAttributor`` with one checkpoint, weight 1 and raw gradients.

    Training side: dattri's loss gradient, ``grad CE_i = -(1 - p_i) grad m_i``; query side: the margin
    gradient (``target_func``); both projected by dattri's Gaussian projector to ``projection_dim``
    (``proj_seed = seed``). dattri returns ``-(1 - p_i) phi_i . phi_q``; the sign is flipped.

    dattri's TracIn caches nothing, so :meth:`fit` only builds the task and every call recomputes the
    training gradients.

    Self-scores: dattri's ``self_attribute``, ``|R^T grad CE_i|^2 = (1 - p_i)^2 |phi_i|^2`` (loss on
    both sides, as in TracIn's self-influence), not the margin-query ``(1 - p_i) |phi_i|^2``.

    Args:
        projection_dim: dattri's ``proj_dim``.
        seed: dattri's ``proj_seed``.
    """

    key = "dattri_tracin"
    name = "Grad-Dot (dattri TracIn)"
    damping_param = None

    def __init__(self, projection_dim: int, seed: int = 0) -> None:
        super().__init__()
        self.package = _package("dattri")
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        self._attributor: Any = None

    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        from dattri.algorithm import TracInAttributor
        from dattri.task import AttributionTask

        self._set_fitted(model, train_inputs, train_targets)
        task = AttributionTask(
            loss_func=self._mean_cross_entropy(),
            model=self._fitted()[0],
            checkpoints=self._checkpoint(),
            target_func=self._per_example_margin(),
        )
        self._attributor = TracInAttributor(
            task=task,
            weight_list=torch.ones(1),
            normalized_grad=False,
            projector_kwargs=_projector_kwargs(self.projection_dim, self.seed),
            device="cpu",
        )

    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        self._check_damping(damping)
        self._check_query(query_inputs, query_targets)
        _, x, y = self._fitted()
        with torch.no_grad():
            matrix = self._attributor.attribute(
                self._loader(x, y), self._loader(query_inputs, query_targets, batch_size=len(query_inputs))
            )
        return _as_scores(matrix, len(query_inputs), len(x), sign=-1.0)

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        self._check_damping(damping)
        _, x, y = self._fitted()
        with torch.no_grad():
            values = self._attributor.self_attribute(self._loader(x, y))
        return values.detach().cpu().numpy().astype(np.float64)


# ---- 3. influence function (dattri IF-CG) -------------------------------------------------------


class DattriInfluenceCG(PeerMethod):
    """Influence function by conjugate gradients: dattri's ``IFAttributorCG``.

    Hessian H of the mean training cross-entropy ``softplus(-m)`` (over the whole training set, or over
    a seeded random subset of ``hessian_examples`` of it), with ``regularization * I`` added (the
    damping, in units of that per-example mean); ``max_iter`` CG iterations started from the
    right-hand side, ``rev-rev`` HVPs (dattri's scheme and defaults). Training side: ``grad CE_i``;
    query side: the margin gradient. dattri returns ``grad CE_i^T (H + lambda I)^-1 grad m_q
    = -(1 - p_i) grad m_i^T (H + lambda I)^-1 grad m_q``; the sign is flipped.

    No projection (dattri's IF works in the full parameter space). ``IFAttributorCG.cache`` only stores
    the Hessian's loader, so :meth:`fit` is cheap and every call re-solves CG for its queries; the
    training gradients come in one batch because dattri re-solves CG for every training batch.

    Self-scores: dattri's ``self_attribute``, each training example as a margin query (sign flipped):
    ``(1 - p_i) grad m_i^T (H + lambda I)^-1 grad m_i``, one CG solve per training example.

    On a non-convex model H is indefinite; a damping below its most negative eigenvalue leaves
    ``H + lambda I`` indefinite and CG unreliable. dattri's CG has no stopping rule, so a system it has
    solved to round-off within ``max_iter`` turns to 0/0 = NaN; such results raise ``RuntimeError``.

    Cost (2 CPU cores, 4,000 MNIST digits, 200 queries; seconds per damping for scores, then for
    self-scores): MLP 784-64-10, H on all, 10 iterations: 55-65 and about 880; H on 1,000,
    5 iterations: 11.5 and 148. Logistic regression: 12 and 202; H on 1,000, 5 iterations: 2 and 23.

    Args:
        max_iter: CG iterations (dattri's default 10).
        hessian_examples: estimate H on this many random training examples (None: all).
        seed: seed of that subset.

    Raises:
        ValueError: ``max_iter`` or ``hessian_examples`` < 1.
    """

    key = "dattri_if_cg"
    name = "Influence function, CG (dattri)"
    damping_param = "regularization"
    self_chunk = 200
    """Training examples per CG solve in :meth:`self_scores` (one vmapped CG over that many vectors)."""

    def __init__(self, max_iter: int = 10, hessian_examples: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.package = _package("dattri")
        if max_iter < 1 or (hessian_examples is not None and hessian_examples < 1):
            raise ValueError(
                f"max_iter and hessian_examples must be >= 1; got {max_iter}, {hessian_examples}"
            )
        self.max_iter = int(max_iter)
        self.hessian_examples = None if hessian_examples is None else int(hessian_examples)
        self.seed = int(seed)
        self._task: Any = None
        self._hessian_rows: torch.Tensor | None = None

    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        from dattri.task import AttributionTask

        self._set_fitted(model, train_inputs, train_targets)
        n_train = len(train_targets)
        self._hessian_rows = None
        if self.hessian_examples is not None and self.hessian_examples < n_train:
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.seed))
            self._hessian_rows = order[: self.hessian_examples].sort().values
        self._task = AttributionTask(
            loss_func=self._mean_cross_entropy(),
            model=self._fitted()[0],
            checkpoints=self._checkpoint(),
            target_func=self._per_example_margin(),
        )

    def _attributor(self, regularization: float) -> Any:
        from dattri.algorithm import IFAttributorCG

        _, x, y = self._fitted()
        attributor = IFAttributorCG(
            task=self._task, device="cpu", max_iter=self.max_iter, regularization=regularization
        )
        # One batch: dattri sums one inverse-HVP per batch of the loader it caches, which is the inverse
        # Hessian only when there is a single batch.
        rows = self._hessian_rows
        attributor.cache(
            self._loader(x, y, batch_size=len(x))
            if rows is None
            else self._loader(x[rows], y[rows], batch_size=len(rows))
        )
        return attributor

    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        regularization = self._check_damping(damping)
        self._check_query(query_inputs, query_targets)
        _, x, y = self._fitted()
        matrix = self._attributor(regularization).attribute(
            self._loader(x, y, batch_size=len(x)),
            self._loader(query_inputs, query_targets, batch_size=len(query_inputs)),
        )
        return self._finite(_as_scores(matrix, len(query_inputs), len(x), sign=-1.0))

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        regularization = self._check_damping(damping)
        _, x, y = self._fitted()
        attributor = self._attributor(regularization)
        # One single-batch loader per chunk: dattri 0.3.0's base self_attribute adds every batch's values
        # to the whole output vector (a shape error, or with batch size 1 a silent broadcast), so it is
        # only right for a loader with one batch; chunks bound the memory of the vmapped CG.
        step = self.self_chunk
        chunks = [
            attributor.self_attribute(self._loader(x[start : start + step], y[start : start + step], step))
            for start in range(0, len(x), step)
        ]
        return self._finite(-torch.cat(chunks).detach().cpu().numpy().astype(np.float64))

    def _finite(self, values: np.ndarray) -> np.ndarray:
        if not np.isfinite(values).all():
            raise RuntimeError(
                f"{self.name}: CG returned non-finite values (dattri's CG divides 0 by 0 once a system is "
                f"solved to round-off); use fewer iterations than max_iter={self.max_iter} or less damping"
            )
        return values


# ---- 4. TRAK (dattri) ---------------------------------------------------------------------------


class DattriTRAK(PeerMethod):
    """TRAK from dattri (``TRAKAttributor``), one checkpoint.

    As in dattri's TRAK examples the task's "loss" is the margin (training side) and so is the target
    (query side); ``correct_probability_func`` is ``p = sigmoid(m)``, giving ``Q = 1 - p_i``. A score
    is ``(1 - p_i) phi_q^T (Phi^T Phi + regularization I)^-1 phi_i`` with ``phi = R^T grad m / sqrt(P)``
    (dattri's Gaussian projector, ``proj_seed = seed``): positive = proponent as it comes.

    dattri applies the regularization inside ``cache``, which it does not keep the gradients of, so a
    new damping re-featurizes the training set.

    Self-scores: the same formula with q = i. (``TRAKAttributor.self_attribute`` fails once ``cache``
    has run in dattri 0.3.0: with no loader it reads ``.sampler`` of None, with one it refuses a loader
    next to the cached one; so an uncached attributor's ``self_attribute`` is used, which
    re-featurizes.)

    Args:
        projection_dim: dattri's ``proj_dim``.
        seed: dattri's ``proj_seed``.
    """

    key = "dattri_trak"
    name = "TRAK (dattri)"
    damping_param = "regularization"

    def __init__(self, projection_dim: int, seed: int = 0) -> None:
        super().__init__()
        self.package = _package("dattri")
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        self._cached: Any = None
        self._cached_regularization: float | None = None

    def _new_attributor(self, regularization: float) -> Any:
        from dattri.algorithm import TRAKAttributor
        from dattri.task import AttributionTask

        model, shape = self._fitted()[0], self._shape
        margin = self._per_example_margin()
        task = AttributionTask(
            loss_func=margin, model=model, checkpoints=self._checkpoint(), target_func=margin
        )

        def correct_probability(params, data):
            x, y = data
            return torch.sigmoid(_batch_margins(model, params, x, y, shape)).sum()

        return TRAKAttributor(
            task=task,
            correct_probability_func=correct_probability,
            projector_kwargs=_projector_kwargs(self.projection_dim, self.seed),
            device="cpu",
            regularization=regularization,
        )

    def _cache(self, regularization: float) -> Any:
        if self._cached is None or self._cached_regularization != regularization:
            _, x, y = self._fitted()
            attributor = self._new_attributor(regularization)
            with torch.no_grad():
                attributor.cache(self._loader(x, y))
            self._cached, self._cached_regularization = attributor, regularization
        return self._cached

    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        """Featurize at dattri's default regularization 0 (kept if the next call asks for 0)."""
        self._set_fitted(model, train_inputs, train_targets)
        self._cached, self._cached_regularization = None, None
        try:
            self._cache(0.0)
        except torch.linalg.LinAlgError:  # Phi^T Phi singular (k > n_train): featurize per damping
            self._cached, self._cached_regularization = None, None

    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        regularization = self._check_damping(damping)
        self._check_query(query_inputs, query_targets)
        attributor = self._cache(regularization)
        with torch.no_grad():
            matrix = attributor.attribute(
                self._loader(query_inputs, query_targets, batch_size=len(query_inputs))
            )
        return _as_scores(matrix, len(query_inputs), len(self._fitted()[1]), sign=1.0)

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        regularization = self._check_damping(damping)
        _, x, y = self._fitted()
        with torch.no_grad():
            values = self._new_attributor(regularization).self_attribute(self._loader(x, y))
        return values.detach().cpu().numpy().astype(np.float64).reshape(-1)


# ---- 5. TracInCP (Captum) -----------------------------------------------------------------------


class CaptumTracInCP(PeerMethod):
    """Captum's ``TracInCP`` with one checkpoint (learning rate 1): Grad-Dot without projection.

    Training side: Captum's ``loss_fn``, the summed cross-entropy ``softplus(-m)``; query side:
    ``test_loss_fn``, the summed margin; per-example gradients by Captum's sample-wise trick
    (``sample_wise_grads_per_batch=True``). Captum returns ``grad m_q . grad CE_i
    = -(1 - p_i) grad m_q . grad m_i``; the sign is flipped.

    Captum's TracInCP caches nothing: :meth:`fit` builds the object and every call recomputes the
    training gradients.

    Self-scores: Captum's ``self_influence``, ``|grad CE_i|^2 = (1 - p_i)^2 |grad m_i|^2`` (``loss_fn``
    on both sides).
    """

    key = "captum_tracincp"
    name = "TracInCP (Captum)"
    damping_param = None

    def __init__(self) -> None:
        super().__init__()
        self.package = _package("captum")
        self._tracin: Any = None

    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        from captum.influence import TracInCP

        self._set_fitted(model, train_inputs, train_targets)
        model_copy, x, y = self._fitted()

        def load(module: nn.Module, checkpoint: dict[str, torch.Tensor]) -> float:
            module.load_state_dict(checkpoint)
            module.eval()
            return 1.0  # the checkpoint's weight ("learning rate"): 1 makes TracInCP Grad-Dot

        self._tracin = TracInCP(
            model=model_copy,
            train_dataset=self._loader(x, y),
            checkpoints=[self._checkpoint()],
            checkpoints_load_func=load,
            loss_fn=_MarginCrossEntropy(),
            test_loss_fn=_MarginOutput(),
            sample_wise_grads_per_batch=True,
        )

    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        self._check_damping(damping)
        self._check_query(query_inputs, query_targets)
        n_train = len(self._fitted()[1])
        with warnings.catch_warnings():
            # Captum switches on requires_grad of the query inputs itself and says so every call
            warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
            matrix = self._tracin.influence(
                (query_inputs.detach().float(), query_targets), show_progress=False
            )
        return _as_scores(matrix.T, len(query_inputs), n_train, sign=-1.0)

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        self._check_damping(damping)
        values = self._tracin.self_influence(inputs=None, show_progress=False)
        return values.detach().cpu().numpy().astype(np.float64)


# ---- entry point --------------------------------------------------------------------------------


def peer_methods(
    projection_dim: int,
    seed: int = 0,
    *,
    cg_max_iter: int = 10,
    cg_hessian_examples: int | None = None,
) -> list[PeerMethod]:
    """The five peers in report order: traker TRAK, dattri Grad-Dot, dattri IF-CG, dattri TRAK, Captum.

    Args:
        projection_dim: k of the projected methods (traker TRAK, dattri Grad-Dot, dattri TRAK); IF-CG
            and Captum TracInCP work unprojected.
        seed: projection seed of the projected methods (and of IF-CG's Hessian subset); results are
            deterministic given it.
        cg_max_iter, cg_hessian_examples: IF-CG's CG iterations and Hessian sample (None: the whole
            training set); see :class:`DattriInfluenceCG` for what they cost.

    Returns:
        Unfitted adapters.

    Raises:
        ValueError: ``projection_dim`` < 1.
    """
    if int(projection_dim) < 1:
        raise ValueError(f"projection_dim must be >= 1; got {projection_dim}")
    return [
        TrakerTRAK(projection_dim, seed),
        DattriGradDot(projection_dim, seed),
        DattriInfluenceCG(max_iter=cg_max_iter, hessian_examples=cg_hessian_examples, seed=seed),
        DattriTRAK(projection_dim, seed),
        CaptumTracInCP(),
    ]
