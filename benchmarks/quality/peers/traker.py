"""TRAK from ``traker`` (one checkpoint, on the CPU) behind :class:`~.base.PeerMethod`."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.quality.peers.base import BATCH, ProjectedPeerMethod, as_scores
from benchmarks.quality.retrain import data_hash

__all__ = ["TrakerTRAK"]


# ---- 1. TRAK (traker) ---------------------------------------------------------------------------


class TrakerTRAK(ProjectedPeerMethod):
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
    distribution = "traker"
    damping_param = "lambda_reg"

    def __init__(self, projection_dim: int, seed: int = 0) -> None:
        super().__init__(projection_dim, seed)
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
        for start in range(0, len(x), BATCH):
            batch = (x[start : start + BATCH], y[start : start + BATCH])
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
            for start in range(0, len(inputs), BATCH):
                batch = (inputs[start : start + BATCH].float(), targets[start : start + BATCH])
                self._traker.score(batch=batch, num_samples=len(batch[0]))
            self._experiments[digest] = exp_name
        matrix = self._traker.finalize_scores(exp_name=self._experiments[digest], model_ids=[0])
        return np.array(matrix, dtype=np.float64)

    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        lambda_reg, x, _ = self._checked_query(query_inputs, query_targets, damping)
        matrix = self._score_matrix(query_inputs, query_targets, lambda_reg)
        return as_scores(matrix, len(query_inputs), len(x), sign=1.0)

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        """traker has no self-influence routine: the diagonal of the train-vs-train score matrix."""
        lambda_reg, x, y = self._checked_self(damping)
        return np.ascontiguousarray(np.diagonal(self._score_matrix(x, y, lambda_reg)), dtype=np.float64)

    def close(self) -> None:
        """Delete traker's save directory (projected gradients, features, score files)."""
        if self._cleanup is not None:
            self._cleanup()
        self._cleanup = None
        self._traker = None
        self._save_dir = None
        super().close()
