"""Output functions: what scalar of the model an attribution explains (DESIGN.md 1.1).

An :class:`OutputFunction` turns the model's raw output for one example into the scalar ``m(x, y)``
whose tangent features are indexed, and gives the likelihood weight ``beta_i`` and gradient term
``beta_i r_i`` of the Gaussian-process surrogate. The indexer never guesses a loss: built-ins cover
classification (the margin), regression and language models (the summed token margins,
:mod:`indexer.features.language`); custom ones subclass the base and are registered by name so that the
manifest can name them and the service can rebuild them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from indexer.enums import OutputKind

__all__ = [
    "OutputFunction",
    "ClassificationMargin",
    "RegressionOutput",
    "register_output_function",
    "output_function_from_spec",
    "gaussian_entropy",
    "label_margin",
    "sigmoid",
]


def gaussian_entropy(variance: np.ndarray | float) -> np.ndarray:
    """Differential entropy of a Gaussian, 0.5 log(2 pi e variance), in nats.

    Args:
        variance: `(n,)` (or a scalar) variances in output units squared, >= 0.

    Returns:
        `(n,)` float64 nats; -inf where the variance is 0 (a point mass).
    """
    v = np.asarray(variance, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 0.5 * np.log(2 * math.pi * math.e * v)


def label_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The margin of each label over the other classes, ``z_y - logsumexp_{c != y} z_c`` (DESIGN.md 1.1).

    Differentiable and vmap-safe; the one formula of :class:`ClassificationMargin` and of the per-token
    margins of :class:`~indexer.features.language.LanguageModelMargin`.

    Args:
        logits: `(..., n_classes)` float logits z.
        labels: `(...)` integer labels y. A label outside ``0 .. n_classes - 1`` (an ignored position)
            gives ``-logsumexp(z)``: finite, for the caller to mask out.

    Returns:
        `(...)` margins, in the logits' dtype.
    """
    is_label = torch.arange(logits.shape[-1], device=logits.device) == labels.unsqueeze(-1)
    z_y = torch.where(is_label, logits, torch.zeros_like(logits)).sum(-1)
    others = torch.where(is_label, torch.full_like(logits, -math.inf), logits)
    return z_y - torch.logsumexp(others, dim=-1)


class OutputFunction(ABC):
    """Base class of output functions.

    Subclasses implement :meth:`output` (differentiable, per example, vmap-safe), :meth:`likelihood_weight`
    and :meth:`grad_term`; :meth:`predict` and :meth:`default_target` have classification defaults. One
    whose beta_i and beta_i r_i need more of the forward pass than m_i (the per-token margins of a sequence,
    DESIGN.md 1.8) overrides :meth:`likelihood_terms`.
    """

    name: ClassVar[str]
    """Registry name written to the manifest."""

    @abstractmethod
    def output(self, model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar output function of one example.

        Args:
            model_output: `(n_outputs,)` raw model output (logits) of ONE example; called under vmap.
            target: `()` the example's target.

        Returns:
            `()` tensor, m(x, y; theta).
        """

    @abstractmethod
    def likelihood_weight(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Noise precision beta_i of the surrogate (DESIGN.md 1.1).

        Args:
            outputs: `(n,)` float64 output-function values m_i.
            targets: `(n,)` targets.

        Returns:
            `(n,)` float64, beta_i >= 0.
        """

    @abstractmethod
    def grad_term(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """beta_i r_i: derivative of log p(y_i | f_i) w.r.t. f_i at theta* (DESIGN.md 1.3, influence).

        Args:
            outputs: `(n,)` float64 output-function values m_i.
            targets: `(n,)` targets.

        Returns:
            `(n,)` float64.
        """

    def likelihood_terms(
        self, model_outputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """beta_i and beta_i r_i of a batch, from the forward pass that the featurizer differentiates.

        The featurizers call this once per batch on the detached results of their one forward pass, so
        that an output function whose surrogate terms need more than m_i (the language-model margin needs
        its per-token margins, DESIGN.md 1.8) computes them without a second pass. The default is
        :meth:`likelihood_weight` and :meth:`grad_term` of the outputs m_i.

        Args:
            model_outputs: `(n, n_outputs)` raw model outputs (logits), flattened per example, detached.
            targets: `(n, ...)` targets.
            outputs: `(n,)` output-function values m_i.

        Returns:
            ``(beta, grad_term)``: `(n,)` float64 beta_i >= 0 and `(n,)` float64 beta_i r_i.
        """
        del model_outputs  # m_i is all the default needs
        m = outputs.detach().double().cpu().numpy()
        y = targets.detach().cpu().numpy()
        return self.likelihood_weight(m, y), self.grad_term(m, y)

    def summarize(self, model_outputs: torch.Tensor) -> torch.Tensor:
        """What an index keeps of each example's raw model outputs (the ``model_output`` array): the input
        of :meth:`predict`, :meth:`default_target` and :meth:`predictive_entropy`.

        The default keeps the logits themselves. An output function whose raw outputs are large overrides
        it (a language model's `(T, vocab)` logits are T * vocab floats per example; it keeps the greedy
        token and the next-token entropy at each position, DESIGN.md 1.8).

        Args:
            model_outputs: `(n, n_outputs)` raw model outputs, flattened per example, detached.

        Returns:
            `(n, n_summary)` float32.
        """
        return model_outputs.float()

    def params(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments, written to the manifest."""
        return {}

    def check_targets(self, targets: torch.Tensor, n_outputs: int) -> None:
        """Refuse targets this output function cannot explain, before any work is done.

        Args:
            targets: `(n,)` targets.
            n_outputs: width of the model's output.

        Raises:
            ValueError: says what was expected.
        """
        del targets, n_outputs  # the base accepts any target; the built-ins check theirs

    def predict(self, model_outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Prediction from raw model outputs.

        Args:
            model_outputs: `(n, n_outputs)` float logits.

        Returns:
            `(n,)` predicted class (int64) and `(n, n_outputs)` float64 softmax probabilities.
        """
        z = model_outputs.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p.argmax(axis=1).astype(np.int64), p

    def default_target(self, model_outputs: np.ndarray) -> np.ndarray:
        """The target to explain when a query gives none: the predicted class.

        Args:
            model_outputs: `(n, n_outputs)` float logits.

        Returns:
            `(n,)` targets.
        """
        return self.predict(model_outputs)[0]

    def predictive_entropy(self, model_outputs: np.ndarray, posterior_variance: np.ndarray) -> np.ndarray:
        """Entropy of the predictive distribution of the label, in nats.

        Args:
            model_outputs: `(n, n_outputs)` logits.
            posterior_variance: `(n,)` v_q (unused by the categorical default).

        Returns:
            `(n,)` float64 nats: -sum_c p_c log p_c of the softmax.
        """
        _, p = self.predict(model_outputs)
        if p is None:
            raise NotImplementedError(
                f"{type(self).__name__} predicts no probabilities: override predictive_entropy"
            )
        return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)


class ClassificationMargin(OutputFunction):
    """m = z_y - logsumexp_{c != y} z_c, so p_i = sigmoid(m_i) is the softmax probability of the label.

    beta_i = p_i (1 - p_i) and beta_i r_i = 1 - p_i (DESIGN.md 1.1, 1.3).
    """

    name = OutputKind.CLASSIFICATION_MARGIN.value

    def check_targets(self, targets: torch.Tensor, n_outputs: int) -> None:
        """Integer class indices in ``0 .. n_outputs - 1`` of a model with at least 2 logits.

        Raises:
            ValueError: says which rule the targets break.
        """
        if n_outputs < 2:
            raise ValueError(
                f"classification needs a model with at least 2 outputs (logits); it has {n_outputs}"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dtype.is_complex:
            raise ValueError(
                f"classification targets must be integer class indices; got dtype {targets.dtype}"
            )
        if targets.ndim != 1:
            raise ValueError(
                f"classification targets must have shape (n,): one class index per example; got "
                f"{list(targets.shape)}"
            )
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= n_outputs):
            raise ValueError(
                f"classification targets must lie in 0..{n_outputs - 1} (the model has {n_outputs} outputs); "
                f"got values from {int(targets.min())} to {int(targets.max())}"
            )

    def output(self, model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`()` the margin z_y - logsumexp_{c != y} z_c of `(n_classes,)` logits at class ``target``."""
        return label_margin(model_output, target)

    def likelihood_weight(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """`(n,)` float64 beta_i = p_i (1 - p_i) with p_i = sigmoid(m_i) (DESIGN.md 1.1)."""
        # p (1 - p) written via the two tails so that saturated examples give a tiny positive, not 1 - 1
        return sigmoid(outputs) * sigmoid(-outputs)

    def grad_term(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """`(n,)` float64 beta_i r_i = 1 - p_i (DESIGN.md 1.3)."""
        return sigmoid(-outputs)


class RegressionOutput(OutputFunction):
    """The model's scalar output, Gaussian likelihood with noise standard deviation ``sigma``.

    beta_i = 1 / sigma^2 and beta_i r_i = (y_i - m_i) / sigma^2 (DESIGN.md 1.1, 1.3).

    Args:
        sigma: noise standard deviation, in output units; must be positive and finite.

    Raises:
        ValueError: ``sigma`` is not a positive finite number.
    """

    name = OutputKind.REGRESSION.value

    def __init__(self, sigma: float = 1.0) -> None:
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number; got {sigma!r}")
        self.sigma = float(sigma)

    def params(self) -> dict[str, Any]:
        """``{"sigma": sigma}``."""
        return {"sigma": self.sigma}

    def check_targets(self, targets: torch.Tensor, n_outputs: int) -> None:
        """Finite targets of a model with exactly one output.

        Raises:
            ValueError: says which rule the targets or the model break.
        """
        if n_outputs != 1:
            raise ValueError(f"regression explains a model with exactly 1 output; it has {n_outputs}")
        if targets.ndim != 1:
            raise ValueError(
                f"regression targets must have shape (n,): one value per example; got {list(targets.shape)}"
            )
        if not bool(torch.isfinite(targets.double()).all()):
            raise ValueError("regression targets must be finite numbers")
        if bool((targets.double().abs() > torch.finfo(torch.float32).max).any()):
            raise ValueError(
                "regression targets must fit float32 (|y| <= 3.4e38): the residuals are taken in the model's "
                "precision"
            )

    def output(self, model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`()` the model's single output (the target enters through the residual only)."""
        return model_output.reshape(-1)[0]

    def likelihood_weight(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """`(n,)` float64 beta_i = 1 / sigma^2."""
        return np.full(outputs.shape, 1.0 / self.sigma**2)

    def grad_term(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """`(n,)` float64 beta_i r_i = (y_i - m_i) / sigma^2."""
        return (targets.astype(np.float64) - outputs) / self.sigma**2

    def predict(self, model_outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`(n,)` float64 predicted values and None (no class probabilities)."""
        return model_outputs.reshape(len(model_outputs), -1)[:, 0].astype(np.float64), None

    def default_target(self, model_outputs: np.ndarray) -> np.ndarray:
        """`(n,)` the predicted values: explaining the prediction itself."""
        return self.predict(model_outputs)[0]

    def predictive_entropy(self, model_outputs: np.ndarray, posterior_variance: np.ndarray) -> np.ndarray:
        """Differential entropy of y_q ~ N(m_q, sigma^2 + v_q), in nats."""
        return gaussian_entropy(self.sigma**2 + np.asarray(posterior_variance, dtype=np.float64))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function in float64, written as ``exp(-log(1 + exp(-x)))`` so that no |x| overflows.

    Args:
        x: `(...)` numbers.

    Returns:
        `(...)` float64 values in [0, 1].
    """
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


_REGISTRY: dict[str, type[OutputFunction]] = {
    ClassificationMargin.name: ClassificationMargin,
    RegressionOutput.name: RegressionOutput,
}


def register_output_function(cls: type[OutputFunction]) -> type[OutputFunction]:
    """Register a custom output function under ``cls.name`` (usable as a class decorator).

    Raises:
        ValueError: the name is already taken by another class.
    """
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"output function name {cls.name!r} is already registered to {existing.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def output_function_from_spec(name: str, params: dict[str, Any] | None = None) -> OutputFunction:
    """Rebuild an output function from its manifest entry.

    Args:
        name: registry name, e.g. ``"classification_margin"``.
        params: constructor arguments (see :meth:`OutputFunction.params`).

    Raises:
        ValueError: unknown name (the message lists the registered ones) or bad parameters.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(
            f"unknown output function {name!r}; registered: {sorted(_REGISTRY)} (a custom one is registered "
            "by its plugin module: list it in INFOTRACE_PLUGINS, or --plugin for infotrace-index)"
        )
    try:
        return cls(**(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters {params!r} for output function {name!r}: {exc}") from exc
