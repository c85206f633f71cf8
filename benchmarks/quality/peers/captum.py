"""Captum's TracInCP (one checkpoint) behind :class:`~.base.PeerMethod`."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.quality.peers.base import MarginCrossEntropy, MarginOutput, PeerMethod, as_scores

__all__ = ["CaptumTracInCP"]


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
    distribution = "captum"
    damping_param = None

    def __init__(self) -> None:
        super().__init__()
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
            loss_fn=MarginCrossEntropy(),
            test_loss_fn=MarginOutput(),
            sample_wise_grads_per_batch=True,
        )

    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        _, x, _ = self._checked_query(query_inputs, query_targets, damping)
        n_train = len(x)
        with warnings.catch_warnings():
            # Captum switches on requires_grad of the query inputs itself and says so every call
            warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
            matrix = self._tracin.influence(
                (query_inputs.detach().float(), query_targets), show_progress=False
            )
        return as_scores(matrix.T, len(query_inputs), n_train, sign=-1.0)

    def self_scores(self, damping: float | None = None) -> np.ndarray:
        self._check_damping(damping)
        values = self._tracin.self_influence(inputs=None, show_progress=False)
        return values.detach().cpu().numpy().astype(np.float64)
