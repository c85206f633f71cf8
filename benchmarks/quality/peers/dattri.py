"""dattri's Grad-Dot (TracIn), influence function by CG and TRAK behind :class:`~.base.PeerMethod`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.quality.peers.base import PeerMethod, ProjectedPeerMethod, as_scores, batch_margins

__all__ = ["DattriGradDot", "DattriInfluenceCG", "DattriTRAK"]


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


class DattriGradDot(ProjectedPeerMethod):
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
    distribution = "dattri"
    damping_param = None

    def __init__(self, projection_dim: int, seed: int = 0) -> None:
        super().__init__(projection_dim, seed)
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
        _, x, y = self._checked_query(query_inputs, query_targets, damping)
        with torch.no_grad():
            matrix = self._attributor.attribute(
                self._loader(x, y), self._loader(query_inputs, query_targets, batch_size=len(query_inputs))
            )
        return as_scores(matrix, len(query_inputs), len(x), sign=-1.0)

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        _, x, y = self._checked_self(damping)
        with torch.no_grad():
            values = self._attributor.self_attribute(self._loader(x, y))
        return values.detach().cpu().numpy().astype(np.float64)


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
    distribution = "dattri"
    damping_param = "regularization"
    self_chunk = 200
    """Training examples per CG solve in :meth:`self_scores` (one vmapped CG over that many vectors)."""

    def __init__(self, max_iter: int = 10, hessian_examples: int | None = None, seed: int = 0) -> None:
        super().__init__()
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
        regularization, x, y = self._checked_query(query_inputs, query_targets, damping)
        matrix = self._attributor(regularization).attribute(
            self._loader(x, y, batch_size=len(x)),
            self._loader(query_inputs, query_targets, batch_size=len(query_inputs)),
        )
        return self._finite(as_scores(matrix, len(query_inputs), len(x), sign=-1.0))

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        regularization, x, y = self._checked_self(damping)
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


class DattriTRAK(ProjectedPeerMethod):
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
    distribution = "dattri"
    damping_param = "regularization"

    def __init__(self, projection_dim: int, seed: int = 0) -> None:
        super().__init__(projection_dim, seed)
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
            return torch.sigmoid(batch_margins(model, params, x, y, shape)).sum()

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
        regularization, x, _ = self._checked_query(query_inputs, query_targets, damping)
        attributor = self._cache(regularization)
        with torch.no_grad():
            matrix = attributor.attribute(
                self._loader(query_inputs, query_targets, batch_size=len(query_inputs))
            )
        return as_scores(matrix, len(query_inputs), len(x), sign=1.0)

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        regularization, x, y = self._checked_self(damping)
        with torch.no_grad():
            values = self._new_attributor(regularization).self_attribute(self._loader(x, y))
        return values.detach().cpu().numpy().astype(np.float64).reshape(-1)
