"""Sequence output functions (DESIGN.md 1.8): a language model explained through its target tokens.

:class:`LanguageModelMargin` takes a model whose output for one example is `(T, vocab)` logits (a batch:
`(n, T, vocab)`, as transformers' ``*ForCausalLM`` give) and `(T,)` int64 target token ids per example, with
:data:`IGNORE_INDEX` (-100, transformers' value) at every position that is not a target (the prompt,
padding, the last position of a causal model). The output is the sum of the target tokens' margins
``m = sum_t m_t``; the surrogate's terms come from the per-token margins of the same forward pass
(:meth:`LanguageModelMargin.likelihood_terms`).

Alignment (the causal shift): ``targets[t]`` is the token that the logits at position t are scored
against; the output function never shifts. A causal language model's logits at t predict the token at
t + 1, so its targets are the input ids shifted left by one: :func:`causal_lm_targets` builds them from the
input ids, the attention mask and the prompt length, and :func:`shift_labels` converts transformers-style
``labels`` (unshifted: equal to the input ids, the model shifts them inside its loss). Logits that are
already aligned with their labels (an encoder-decoder's decoder, token classification) need neither.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.enums import OutputKind
from indexer.exceptions import InvalidTargetsError
from indexer.features.tasks import OutputFunction, label_margin, register_output_function, sigmoid

__all__ = ["IGNORE_INDEX", "LanguageModelMargin", "causal_lm_targets", "load_tokenizer", "shift_labels"]

IGNORE_INDEX = -100
"""Target value of a position that is not scored (prompt, padding), as in transformers' ``labels``."""


@register_output_function
class LanguageModelMargin(OutputFunction):
    """m = sum_t m_t over an example's target tokens, m_t the margin of token y_t over the vocabulary.

    For an example with T target tokens (the positions whose target is not :data:`IGNORE_INDEX`) and
    ``p_t = sigmoid(m_t)``, the softmax probability of token y_t (DESIGN.md 1.1, 1.8):

    - ``beta = (1 / T^2) sum_t p_t (1 - p_t)``, the likelihood weight;
    - ``beta r = (1 / T) sum_t (1 - p_t)``, the gradient term;

    with T = 1 exactly the classification margin's. The targets are aligned with the logits (see the
    module docstring for the causal shift).

    Args:
        vocab_size: the width of the logits at each position (the model's output vocabulary, e.g. a
            transformers config's ``vocab_size``), at least 2.

    Raises:
        ValueError: ``vocab_size`` is not an integer >= 2.
    """

    name = OutputKind.LM_MARGIN.value

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(
                f"vocab_size must be an integer >= 2 (the width of the logits); got {vocab_size!r}"
            )
        self.vocab_size = vocab_size

    def params(self) -> dict[str, Any]:
        """``{"vocab_size": vocab_size}``."""
        return {"vocab_size": self.vocab_size}

    def check_targets(self, targets: torch.Tensor, n_outputs: int) -> None:
        """`(n, T)` integer token ids in ``0 .. vocab_size - 1`` or :data:`IGNORE_INDEX`, at least one target
        token per example, from a model with ``T * vocab_size`` outputs per example.

        Raises:
            ValueError: targets of another shape or dtype, or a model of another output width.
            InvalidTargetsError: token ids out of range, or an example without target tokens; its ``rows``
                name the examples of the batch.
        """
        if targets.dim() != 2:
            raise ValueError(
                f"language-model targets must be (n, T) token ids, one row per example; got shape "
                f"{list(targets.shape)}"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dtype.is_complex:
            raise ValueError(f"language-model targets must be integer token ids; got dtype {targets.dtype}")
        n_positions = int(targets.shape[1])
        if n_outputs != n_positions * self.vocab_size:
            raise ValueError(
                f"the model gives {n_outputs} outputs per example; targets of {n_positions} positions need "
                f"logits of shape ({n_positions}, {self.vocab_size}) (vocab_size {self.vocab_size}) per "
                "example, aligned with the targets (causal models: see causal_lm_targets)"
            )
        scored = targets != IGNORE_INDEX
        outside = scored & ((targets < 0) | (targets >= self.vocab_size))
        if bool(outside.any()):
            values = targets[outside]
            raise InvalidTargetsError(
                f"token ids must lie in 0..{self.vocab_size - 1} (vocab_size {self.vocab_size}) or be "
                f"{IGNORE_INDEX} (not scored); got values from {int(values.min())} to {int(values.max())}",
                rows=torch.nonzero(outside.any(1)).reshape(-1).tolist(),
            )
        empty = ~scored.any(1)
        if bool(empty.any()):
            raise InvalidTargetsError(
                f"no target tokens: every position is {IGNORE_INDEX} (not scored); each example needs at "
                "least one",
                rows=torch.nonzero(empty).reshape(-1).tolist(),
            )

    def output(self, model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`()` the sum of the target tokens' margins of one example (vmap-safe).

        Args:
            model_output: `(T * vocab_size,)` or `(T, vocab_size)` logits of ONE example.
            target: `(T,)` token ids aligned with the logits, :data:`IGNORE_INDEX` where not scored.

        Raises:
            ValueError: logits of another size than ``T * vocab_size``.
        """
        logits = self._logits(model_output, target.shape[-1])
        margins = label_margin(logits, target)
        # where, not a product: the margin of an ignored position is finite but meaningless
        return torch.where(target != IGNORE_INDEX, margins, torch.zeros_like(margins)).sum(-1)

    def token_margins(self, model_outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The per-token margins m_t of a batch (DESIGN.md 1.8), the summands of :meth:`output`.

        Args:
            model_outputs: `(n, T * vocab_size)` or `(n, T, vocab_size)` logits.
            targets: `(n, T)` aligned token ids.

        Returns:
            `(n, T)` margins in the logits' dtype; at positions whose target is :data:`IGNORE_INDEX` they are
            meaningless (mask them with ``targets != IGNORE_INDEX``).
        """
        n, n_positions = int(targets.shape[0]), int(targets.shape[-1])
        return label_margin(self._logits(model_outputs.reshape(n, -1), n_positions, batch=n), targets)

    def likelihood_terms(
        self, model_outputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """beta and beta r of each example from its per-token margins (DESIGN.md 1.8).

        ``beta = (1 / T^2) sum_t p_t (1 - p_t)`` and ``beta r = (1 / T) sum_t (1 - p_t)``, with
        ``p_t = sigmoid(m_t)`` over the T target tokens of the example, computed in float64 from the margins
        of the featurizer's forward pass (no second pass).

        Args:
            model_outputs: `(n, T * vocab_size)` detached logits.
            targets: `(n, T)` aligned token ids.
            outputs: `(n,)` m (unused: the terms need the margins one by one).

        Returns:
            `(n,)` float64 beta and `(n,)` float64 beta r.

        Raises:
            InvalidTargetsError: an example without target tokens (``rows`` names it).
        """
        del outputs
        scored = (targets != IGNORE_INDEX).cpu().numpy()
        counts = scored.sum(1)
        if (counts == 0).any():
            raise InvalidTargetsError(
                f"no target tokens: every position is {IGNORE_INDEX} (not scored)",
                rows=np.flatnonzero(counts == 0).tolist(),
            )
        margins = self.token_margins(model_outputs.detach(), targets).double().cpu().numpy()
        # p (1 - p) from the two tails: a saturated token gives a tiny positive weight, not 1 - 1
        weights = np.where(scored, sigmoid(margins) * sigmoid(-margins), 0.0)
        residuals = np.where(scored, sigmoid(-margins), 0.0)
        return weights.sum(1) / counts.astype(np.float64) ** 2, residuals.sum(1) / counts

    def likelihood_weight(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Not defined by m alone: beta needs the per-token margins (use :meth:`likelihood_terms`).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "the language-model margin's beta needs the per-token margins, not their sum: call "
            "likelihood_terms with the model outputs (the featurizers do)"
        )

    def grad_term(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Not defined by m alone: beta r needs the per-token margins (use :meth:`likelihood_terms`).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "the language-model margin's beta r needs the per-token margins, not their sum: call "
            "likelihood_terms with the model outputs (the featurizers do)"
        )

    def summarize(self, model_outputs: torch.Tensor) -> torch.Tensor:
        """`(n, 2 T)` float32: the greedy token at each position, then the next-token entropy (nats) at
        each position (what an index keeps: T * vocab logits per example are too large to store).

        Args:
            model_outputs: `(n, T * vocab_size)` or `(n, T, vocab_size)` logits.

        Raises:
            ValueError: a width that is not a multiple of ``vocab_size``.
        """
        z = self._table(model_outputs).float()  # float32 is what is stored: float64 here cost 1/3 of a batch
        log_p = torch.log_softmax(z, dim=2)
        entropy = -(log_p.exp() * log_p).sum(dim=2)
        return torch.cat([z.argmax(dim=2).float(), entropy], dim=1)

    def predict(self, model_outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The greedy token at every position.

        Args:
            model_outputs: `(n, 2 T)` summaries (:meth:`summarize`).

        Returns:
            `(n, T)` int64 argmax tokens, and None: a `(T, vocab_size)` table of probabilities per example is
            too large to store or send.
        """
        return self._halves(model_outputs)[0].astype(np.int64), None

    def default_target(self, model_outputs: np.ndarray) -> np.ndarray:
        """`(n, T)` int64: the greedy tokens at every position, i.e. the model's own continuation, each
        position scored given the input before it (teacher forcing); from the `(n, 2 T)` summaries."""
        return self.predict(model_outputs)[0]

    def predictive_entropy(
        self, model_outputs: np.ndarray, posterior_variance: np.ndarray, targets: np.ndarray | None = None
    ) -> np.ndarray:
        """The summed entropies of the next-token distributions at the scored positions, in nats.

        ``sum_t -sum_c p_tc log p_tc`` over the positions whose target is not :data:`IGNORE_INDEX` (over all
        T positions when ``targets`` is None), each position's softmax given the input before it;
        posterior_variance `(n,)` is unused.

        Args:
            model_outputs: `(n, 2 T)` summaries (:meth:`summarize`).
            targets: `(n, T)` the targets explained, or None.

        Returns:
            `(n,)` float64 nats.
        """
        entropies = self._halves(model_outputs)[1].astype(np.float64)
        if targets is not None:
            entropies = np.where(np.asarray(targets) != IGNORE_INDEX, entropies, 0.0)
        return entropies.sum(axis=1)

    @staticmethod
    def _halves(summaries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens `(n, T)` and entropies `(n, T)` of `(n, 2 T)` summaries.

        Raises:
            ValueError: not `(n, 2 T)`.
        """
        z = np.asarray(summaries)
        if z.ndim != 2 or z.shape[1] % 2:
            raise ValueError(
                "language-model summaries must be (n, 2 T): greedy tokens then entropies (see summarize); "
                f"got shape {list(z.shape)}"
            )
        half = z.shape[1] // 2
        return z[:, :half], z[:, half:]

    def _logits(self, flat: torch.Tensor, n_positions: int, batch: int | None = None) -> torch.Tensor:
        """`([batch,] T, vocab_size)` view of logits flattened per example; a clear error for another size."""
        lead = () if batch is None else (batch,)
        per_example = math.prod(flat.shape[len(lead) :])
        if per_example != n_positions * self.vocab_size:
            raise ValueError(
                f"the model gives {per_example} outputs per example; targets of {n_positions} positions need "
                f"({n_positions}, {self.vocab_size}) logits (vocab_size {self.vocab_size})"
            )
        return flat.reshape(*lead, n_positions, self.vocab_size)

    def _table(self, model_outputs: torch.Tensor) -> torch.Tensor:
        """`(n, T, vocab_size)` view of logits flattened per example.

        Raises:
            ValueError: a width that is not a multiple of ``vocab_size``.
        """
        z = torch.as_tensor(model_outputs)
        width = math.prod(z.shape[1:])
        if z.ndim < 2 or width % self.vocab_size:
            raise ValueError(
                f"language-model outputs must be (n, T * {self.vocab_size}) or (n, T, {self.vocab_size}) "
                f"logits; got shape {list(z.shape)}"
            )
        return z.reshape(len(z), -1, self.vocab_size)


def causal_lm_targets(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prompt_length: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Targets of a causal language model aligned with its logits: the input ids shifted left by one.

    ``targets[i, t] = input_ids[i, t + 1]`` where token t + 1 is a target: both t and t + 1 are real tokens
    (attention mask 1) and ``t + 1 >= prompt_length[i]``; :data:`IGNORE_INDEX` everywhere else, the last
    position always (it predicts a token the example does not hold).

    Args:
        input_ids: `(n, T)` integer token ids.
        attention_mask: `(n, T)` 1 for real tokens, 0 for padding (left or right); None: all real.
        prompt_length: the number of leading positions of each row (padding included) whose tokens are
            prompt, not scored: an int for every row or an `(n,)` integer tensor. 0 and 1 both score every
            token but the first (which nothing predicts).

    Returns:
        `(n, T)` int64 targets for :class:`LanguageModelMargin`.

    Raises:
        ValueError: ids that are not a 2-D integer tensor, a mask of another shape, or a prompt length that
            is negative or of another length than the batch.
    """
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(
            f"input_ids must be an (n, T) integer tensor; got shape {list(input_ids.shape)}, dtype "
            f"{input_ids.dtype}"
        )
    n, n_positions = input_ids.shape
    ids = input_ids.long()
    prompt = torch.as_tensor(prompt_length, device=ids.device)
    if prompt.dtype.is_floating_point or prompt.dtype == torch.bool or prompt.dim() > 1:
        raise ValueError(f"prompt_length must be an int or an (n,) integer tensor; got {prompt_length!r}")
    if prompt.dim() == 1 and len(prompt) != n:
        raise ValueError(f"prompt_length has {len(prompt)} entries for {n} rows of input_ids")
    if bool((prompt < 0).any()):
        raise ValueError(f"prompt_length must not be negative; got {prompt.tolist()}")
    position = torch.arange(1, n_positions, device=ids.device)  # the position of the predicted token
    scored = position[None, :] >= prompt.reshape(-1, 1)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {list(attention_mask.shape)}; input_ids {list(input_ids.shape)}"
            )
        real = attention_mask.to(ids.device) != 0
        scored = scored & real[:, 1:] & real[:, :-1]
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(scored, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return targets


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Aligned targets from transformers-style causal-LM ``labels`` (unshifted: ``labels[t]`` is the token
    at t, :data:`IGNORE_INDEX` where not scored; the model shifts them inside its loss).

    Args:
        labels: `(n, T)` integer labels, as ``DataCollatorForLanguageModeling(mlm=False)`` makes them.

    Returns:
        `(n, T)` int64: ``labels[:, 1:]`` followed by :data:`IGNORE_INDEX` in the last position.

    Raises:
        ValueError: not a 2-D integer tensor.
    """
    if labels.dim() != 2 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an (n, T) integer tensor; got shape {list(labels.shape)}, dtype {labels.dtype}"
        )
    out = torch.full_like(labels, IGNORE_INDEX, dtype=torch.int64)
    out[:, :-1] = labels[:, 1:]
    return out


def load_tokenizer(path: Path, vocab_size: int | None = None) -> Any:
    """Read a ``tokenizers`` JSON file (``Tokenizer.save``; no pickle) and check it fits the model.

    Args:
        path: the ``tokenizer.json`` file.
        vocab_size: the model's logit width (``lm_margin``'s ``vocab_size``); every token id the tokenizer
            can produce must be below it. None: not checked.

    Returns:
        A ``tokenizers.Tokenizer``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a tokenizers JSON file, or a vocabulary larger than ``vocab_size`` (both name the
            file).
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type for any unreadable file
        raise ValueError(f"tokenizer {path} is not a tokenizers JSON file (Tokenizer.save): {exc}") from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise ValueError(
            f"tokenizer {path} has {size} tokens but the model's logits have width {vocab_size}: it is not "
            "this model's tokenizer"
        )
    return tokenizer
