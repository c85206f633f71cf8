"""infotrace as a benchmarked method: every score of DESIGN.md 1.3, from the library's own functions.

:class:`InfotraceFeatures` featurizes the training set once per model (tangent features of the margin,
seeded projection, likelihood weights: :func:`indexer.features.stream.tangent_features`), fits the
surrogate (:func:`indexer.gp.surrogate.fit_surrogate`) once per prior precision tau, and scores queries
with :meth:`indexer.gp.surrogate.Surrogate.scores`. :class:`InfotraceMethod` exposes one score with the
interface of the peer adapters (:mod:`benchmarks.quality.peers`): ``fit``, ``scores``, ``self_scores``. The
damping of infotrace is the prior precision tau (DESIGN.md 1.1); ``inner_product`` and ``cosine`` do
not depend on it.

Signs: ``scores`` returns each score as DESIGN.md 1.3 defines it (the information scores are unsigned);
``signed_scores`` gives the unsigned ones the sign of ``influence`` (positive: proponent), the
convention of the signed metrics (LDS, counterfactual removal).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import torch
from torch import nn

from indexer.data import Dataset
from indexer.enums import ProjectionKind, Score
from indexer.features.featurize import DenseFeaturizer, Features, count_parameters
from indexer.features.hooks import HookFeaturizer
from indexer.features.plan import plan_kronecker
from indexer.features.projection import DenseProjection, KroneckerProjection
from indexer.features.stream import tangent_features
from indexer.features.tasks import ClassificationMargin
from indexer.gp.scores import signed_score
from indexer.gp.surrogate import Surrogate, fit_surrogate

__all__ = ["InfotraceFeatures", "InfotraceMethod", "infotrace_methods"]

_TAU_DEPENDENT = (Score.INFORMATION_LOSS, Score.INFORMATION_GAIN, Score.INFLUENCE)


@dataclass
class _Train:
    phi: np.ndarray  # (n_train, k) float32
    phi64: np.ndarray  # (n_train, k) float64: the same values, converted once rather than per query
    beta: np.ndarray  # (n_train,) float64
    grad_term: np.ndarray  # (n_train,) float64


class InfotraceFeatures:
    """Training features of one model, and surrogates and query features cached by key.

    Args:
        k: projection dimension; seed: projection seed.
        projection: ``dense`` (one P x k matrix, the harness's original) or ``kronecker`` (the library's
            default: per layer, from hooks; its plan's k may differ from ``k`` by a few features).

    Attributes:
        default_tau: the library's default prior precision (mean eigenvalue of Phi^T B Phi) once fitted.
    """

    def __init__(self, k: int, seed: int, projection: ProjectionKind = ProjectionKind.DENSE) -> None:
        self.k = k
        self.seed = seed
        self.projection = projection
        self.output_fn = ClassificationMargin()
        self._model: nn.Module | None = None
        self._plan: KroneckerProjection | None = None
        self._train: _Train | None = None
        self._surrogates: dict[float, Surrogate] = {}
        self._queries: dict[str, np.ndarray] = {}
        self.default_tau: float | None = None

    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        """Tangent features, likelihood weights and residual terms of the training set (DESIGN.md 1.1).

        Args:
            model: the trained network; train_inputs: `(n_train, 784)` float32; train_targets: `(n_train,)`.
        """
        self._model = model.eval()
        if self.projection is ProjectionKind.KRONECKER:
            self._plan = plan_kronecker(model, self.k, self.seed)
        feats = self._features(train_inputs, train_targets)
        self._train = _Train(
            phi=feats.phi,
            phi64=feats.phi.astype(np.float64),
            beta=feats.beta,
            grad_term=feats.grad_term,
        )
        self._surrogates.clear()
        self._queries.clear()
        self.default_tau = fit_surrogate(
            self._train.phi, self._train.beta, self._train.grad_term
        ).prior_precision

    def _features(self, inputs: torch.Tensor, targets: torch.Tensor) -> Features:
        """Projected tangent features of examples with the configured projection (hooks removed after)."""
        if self._model is None:
            raise RuntimeError("call fit() before scoring")
        data = Dataset(inputs, targets)
        if self._plan is None:
            dense = DenseFeaturizer(
                self._model, DenseProjection(count_parameters(self._model), self.k, self.seed)
            )
            return tangent_features(dense, self.output_fn, data)
        with HookFeaturizer(self._model, self._plan) as hooks:
            return tangent_features(hooks, self.output_fn, data)

    def fitted_for(self, model: nn.Module) -> bool:
        """Whether :meth:`fit` last ran on this very ``model`` object (so its features can be reused)."""
        return self._model is model and self._train is not None

    @property
    def train(self) -> _Train:
        """The fitted training features.

        Raises:
            RuntimeError: :meth:`fit` has not run.
        """
        if self._train is None:
            raise RuntimeError("call fit() before scoring")
        return self._train

    def surrogate(self, tau: float) -> Surrogate:
        """The surrogate at prior precision ``tau`` (cached)."""
        if tau not in self._surrogates:
            t = self.train
            # fitted on the float64 copy (the same values), so that scoring never converts the features again
            self._surrogates[tau] = fit_surrogate(t.phi64, t.beta, t.grad_term, prior_precision=tau)
        return self._surrogates[tau]

    def query_phi(self, inputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """Projected tangent features of queries, cached by their bytes.

        Args:
            inputs: `(n_query, 784)` float32; targets: `(n_query,)` int64 labels the margin is taken at.

        Returns:
            `(n_query, k)` float32.
        """
        digest = hashlib.sha256(inputs.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()
        if digest not in self._queries:
            feats = self._features(inputs, targets)
            self._queries[digest] = feats.phi
        return self._queries[digest]

    def all_scores(
        self, inputs: torch.Tensor, targets: torch.Tensor, tau: float
    ) -> list[dict[Score, np.ndarray]]:
        """Every score of every training example for each query (DESIGN.md 1.3).

        Returns:
            One ``{Score: (n_train,) float64}`` per query.
        """
        phi_q = self.query_phi(inputs, targets)
        sur = self.surrogate(tau)
        return [sur.scores(sur.query_terms(phi)) for phi in phi_q]

    def self_scores(self, tau: float) -> list[dict[Score, np.ndarray]]:
        """Each training example's scores for itself as the query (with its training label).

        Returns:
            One ``{Score: (1,) float64}`` per training example.
        """
        sur = self.surrogate(tau)
        return [sur.scores(sur.query_terms(sur.phi[i]), slice(i, i + 1)) for i in range(sur.n_train)]


class InfotraceMethod:
    """One infotrace score as a benchmarked method (the interface of :mod:`benchmarks.quality.peers`).

    Args:
        score: which score of DESIGN.md 1.3; features: the shared :class:`InfotraceFeatures` (fitted
            once for all five scores).
    """

    def __init__(self, score: Score, features: InfotraceFeatures) -> None:
        self.score = score
        self.features = features
        kronecker = features.projection is ProjectionKind.KRONECKER
        self.key = f"infotrace_kronecker_{score.value}" if kronecker else f"infotrace_{score.value}"
        self.name = f"infotrace kronecker {score.value}" if kronecker else f"infotrace {score.value}"
        self.package = f"infotrace {version('infotrace')}"
        self.damping_param = "prior precision tau" if score in _TAU_DEPENDENT else None

    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        """Featurize the training set (shared by the five scores: only the first call does work)."""
        if not self.features.fitted_for(model):
            self.features.fit(model, train_inputs, train_targets)

    def _tau(self, damping: float | None) -> float:
        if damping is not None:
            return float(damping)
        if self.features.default_tau is None:
            raise RuntimeError("call fit() before scoring")
        return self.features.default_tau

    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None
    ) -> np.ndarray:
        """The score as DESIGN.md 1.3 defines it (information scores unsigned, in nats).

        Args:
            query_inputs: `(n_query, 784)`; query_targets: `(n_query,)`; damping: tau (None: the default).

        Returns:
            `(n_query, n_train)` float64.
        """
        rows = self.features.all_scores(query_inputs, query_targets, self._tau(damping))
        return np.stack([r[self.score] for r in rows])

    def signed_scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None
    ) -> np.ndarray:
        """The score with the sign of influence (positive: proponent), DESIGN.md 1.3.

        Returns:
            `(n_query, n_train)` float64.
        """
        rows = self.features.all_scores(query_inputs, query_targets, self._tau(damping))
        return np.stack([signed_score(self.score, r) for r in rows])

    def self_scores(self, damping: float | None) -> np.ndarray:
        """Each training example's score for itself (larger: more self-influential).

        Returns:
            `(n_train,)` float64.
        """
        return np.concatenate([r[self.score] for r in self.features.self_scores(self._tau(damping))])


def infotrace_methods(
    k: int, seed: int, projections: tuple[ProjectionKind, ...] = (ProjectionKind.DENSE,)
) -> list[InfotraceMethod]:
    """The five infotrace scores per projection, each projection's five sharing one
    :class:`InfotraceFeatures` (``k``, ``seed``); the dense ones first (their keys are ``infotrace_<score>``,
    the Kronecker ones' ``infotrace_kronecker_<score>``)."""
    out = []
    for projection in projections:
        features = InfotraceFeatures(k, seed, projection)
        out += [InfotraceMethod(score, features) for score in Score]
    return out
