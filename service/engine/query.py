"""Queries: the three ways to give one (a stored id, a precomputed feature, a raw input) made into a
featurized :class:`Query` with the index's own model, projection and output function (DESIGN.md 2.2).

:class:`QueryFeaturizer` rebuilds the model an index was made from, under the service's trust policy: an
index names its architecture (a registered factory, or an import path that only an operator may allow)
and its weights (the index's own copy, or a configured checkpoint that must have the same sha256). When
the model cannot be rebuilt, stored-id and feature queries still work and raw inputs are refused with the
reason (:class:`~indexer.exceptions.ModelMismatchError`, HTTP 409).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.enums import ProjectionKind
from indexer.exceptions import InvalidQueryError, ModelMismatchError
from indexer.features.featurize import count_parameters, example_gradient, model_outputs
from indexer.features.hooks import HookFeaturizer
from indexer.features.language import IGNORE_INDEX, LanguageModelMargin, causal_lm_targets, load_tokenizer
from indexer.features.models import build_model, load_checkpoint
from indexer.features.projection import DenseProjection, KroneckerProjection
from indexer.features.tasks import OutputFunction, output_function_from_spec
from indexer.gp.scores import QueryTerms
from indexer.store.hashing import sha256_file
from indexer.store.layout import (
    CHECKPOINT_FILE,
    KEY_LABEL,
    KEY_MODEL_OUTPUT,
    KEY_OUTPUT,
    KEY_PREDICTION,
    KEY_PROBABILITIES,
    SPLIT_QUERY,
)
from indexer.store.reader import IndexData
from service.core.settings import DEFAULT_PROJECTION_CACHE_BYTES

__all__ = ["Query", "QueryFeaturizer", "to_python"]


def to_python(value: Any) -> Any:
    """A numpy scalar or array as the Python scalar or nested lists JSON needs; anything else unchanged."""
    return (
        value.item()
        if isinstance(value, np.generic)
        else value.tolist()
        if isinstance(value, np.ndarray)
        else value
    )


@dataclass(frozen=True)
class Query:
    """A featurized query.

    Attributes:
        kind: ``"stored"``, ``"input"`` or ``"feature"``.
        terms: whitened :class:`~indexer.gp.scores.QueryTerms`.
        id: stored query id, else None.
        target: the target explained (label or predicted class), None for a bare feature.
        label: the stored query's true label, else None.
        prediction: predicted class or value, None for a bare feature.
        probabilities: `(n_classes,)` softmax, classification only.
        output: output-function value m_q, None for a bare feature.
        model_output: `(n_summary,)` what the output function keeps of the raw outputs
            (:meth:`~indexer.features.tasks.OutputFunction.summarize`: the logits, or a language model's
            greedy tokens and entropies), None for a bare feature.
        featurize_ms: time spent featurizing, in milliseconds.
        text, continuation: a text query's prompt and the continuation explained (decoded from its tokens).
        continuation_source: ``"given"`` or ``"greedy"`` (the model's own), for a text query.
    """

    kind: str
    terms: QueryTerms
    id: int | None = None
    target: float | int | None = None
    label: float | int | None = None
    prediction: float | int | None = None
    probabilities: list[float] | None = None
    output: float | None = None
    model_output: np.ndarray | None = None
    featurize_ms: float = 0.0
    text: str | None = None
    continuation: str | None = None
    continuation_source: str | None = None


def _complete(outcomes: list[Query | Exception | None]) -> list[Query | Exception]:
    """Every item's outcome (each item has one by construction)."""
    if any(outcome is None for outcome in outcomes):
        raise AssertionError("a batch item was left without an outcome")
    return [outcome for outcome in outcomes if outcome is not None]


def _plain_numbers(raw: Any, depth: int) -> bool:
    """Whether ``raw`` is lists nested exactly ``depth`` deep (ragged or not) over floats and integers
    within 64 bits only: the common case, checked with C-level passes over each level. False means "look
    closer", not "refuse" (:meth:`QueryFeaturizer._check_leaves` walks the input to name the position)."""
    level = [raw]
    for _ in range(depth):
        if set(map(type, level)) != {list}:
            return False
        level = list(itertools.chain.from_iterable(level))
    kinds = set(map(type, level))
    if not kinds <= {float, int}:
        return False
    if int in kinds:
        ints = [value for value in level if type(value) is int]
        return -(2**63) <= min(ints) and max(ints) < 2**64
    return True


class QueryFeaturizer:
    """Makes :class:`Query` objects for one index.

    Args:
        data: the loaded index.
        projection_cache_bytes: keep R in memory (for millisecond query featurization) when its size
            ``n_params * k * 4`` bytes is at most this; otherwise R's blocks are regenerated per query.
        checkpoint: featurize raw queries with these weights instead of the index's own copy; refused for
            raw inputs unless its sha256 equals the index's stored checkpoint or the file it was built from.
        trusted_factories: import-path model factories a manifest may name; any other import path is not
            imported (an index folder must not make the service run arbitrary code).

    Attributes:
        output_fn: the index's output function.
        model: the rebuilt network in eval mode, or None when raw inputs cannot be featurized.
        projection: the index's dense projection (None for a Kronecker index, or without ``model``).
        hooks: the index's Kronecker featurizer hooked into ``model`` (None for a dense index).
        tokenizer: the index's ``tokenizers.Tokenizer`` (``tokenizer.json``), or None.
        pad_id: the tokenizer's ``<pad>`` token id, or None (no tokenizer, or one without ``<pad>``: text
            queries are then padded with id 0, a position the causal model never attends to or scores).
        model_error: why raw inputs are refused (no spec, an untrusted factory, another checkpoint, or a
            model that cannot be rebuilt: a missing module, weights that do not fit), or None.

    Raises:
        ValueError: the output function is unknown (a custom one whose plugin module is not loaded), or the
            index's tokenizer does not fit its model.
    """

    def __init__(
        self,
        data: IndexData,
        projection_cache_bytes: int = DEFAULT_PROJECTION_CACHE_BYTES,
        checkpoint: Path | None = None,
        trusted_factories: frozenset[str] = frozenset(),
    ) -> None:
        self.data = data
        info = data.manifest.model
        self.output_fn: OutputFunction = output_function_from_spec(info.output_function, info.output_params)
        self.input_shape = info.input_shape
        self.model: torch.nn.Module | None = None
        self.projection: DenseProjection | None = None
        self.hooks: HookFeaturizer | None = None
        self.tokenizer: Any = None
        self.pad_id: int | None = None
        if data.tokenizer_path is not None:  # verified with the other files; checked against the model here
            self.tokenizer = load_tokenizer(data.tokenizer_path, getattr(self.output_fn, "vocab_size", None))
            pad = self.tokenizer.token_to_id("<pad>")
            self.pad_id = None if pad is None else int(pad)
        self.model_error = self._refusal(checkpoint, trusted_factories)
        if info.spec is not None and self.model_error is None:
            try:
                self._rebuild(checkpoint, projection_cache_bytes)
            except Exception as exc:  # a missing module, a factory that fails, weights that do not fit
                self.model, self.projection, self.hooks = None, None, None
                self.model_error = (
                    f"index {data.name!r}: its model cannot be rebuilt, so raw inputs cannot be featurized "
                    f"(stored-id and feature queries are served): {type(exc).__name__}: {exc}"
                )

    def _rebuild(self, checkpoint: Path | None, projection_cache_bytes: int) -> None:
        """Rebuild the index's model with its weights and hook up its projection.

        Raises:
            ValueError: the spec cannot be built, or the checkpoint does not fit it.
            ModelMismatchError: the rebuilt model's parameter count or layers differ from the manifest's.
            Exception: whatever the model factory raises.
        """
        info, data = self.data.manifest.model, self.data
        assert info.spec is not None  # only called for an index with a model spec
        model = build_model(info.spec)
        load_checkpoint(model, data.path / CHECKPOINT_FILE if checkpoint is None else Path(checkpoint))
        n_params = count_parameters(model)
        if n_params != info.n_params:
            raise ModelMismatchError(
                f"{data.path / CHECKPOINT_FILE}: model has {n_params} parameters, "
                f"the manifest expects {info.n_params}"
            )
        proj = data.manifest.projection
        if proj.structure is ProjectionKind.KRONECKER:
            self.hooks = self._hooks(model, n_params)
        else:
            self.projection = DenseProjection(
                n_params, proj.k, proj.seed, proj.entries, cache_bytes=projection_cache_bytes
            )
            for _ in self.projection.blocks():  # fill the cache now, not on the first request
                pass
        self.model = model.eval()

    def _hooks(self, model: torch.nn.Module, n_params: int) -> HookFeaturizer:
        """The index's Kronecker plan (from its manifest) hooked into the rebuilt model.

        Raises:
            ModelMismatchError: the plan does not fit the model (other layers, shapes or parameter count).
        """
        proj = self.data.manifest.projection
        where = self.data.path / CHECKPOINT_FILE
        try:
            plan = KroneckerProjection.from_coverage_json(proj.seed, proj.entries, proj.coverage or {})
            if plan.n_params != n_params or plan.k != proj.k:
                raise ValueError(f"the plan is for {plan.n_params} parameters and k = {plan.k}")
            return HookFeaturizer(model, plan)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelMismatchError(
                f"{where}: the index's Kronecker projection does not fit the model: {exc}"
            ) from exc

    def _refusal(self, checkpoint: Path | None, trusted_factories: frozenset[str]) -> str | None:
        """Why raw inputs cannot be featurized (no spec, untrusted factory, another checkpoint), or None."""
        info, name = self.data.manifest.model, self.data.name
        if info.spec is None:
            return f"index {name!r} was built without a model spec; query it by stored id or by feature"
        if ":" in info.spec.factory and info.spec.factory not in trusted_factories:
            return (
                f"index {name!r} names the model factory {info.spec.factory!r}, an import path that the "
                "service does not import unless INFOTRACE_TRUSTED_MODEL_FACTORIES lists it"
            )
        if checkpoint is not None:
            weights = Path(checkpoint)
            digest = sha256_file(weights) if weights.is_file() else "missing"
            if digest not in {info.checkpoint_sha256, info.source_checkpoint_sha256}:
                return (
                    f"checkpoint {weights} (sha256 {digest[:12]}...) is not the one index {name!r} "
                    f"was built from (sha256 {(info.checkpoint_sha256 or '')[:12]}...); raw inputs "
                    "would mix two models, so only stored-id and feature queries are served"
                )
        return None

    def stored(self, query_id: int) -> Query:
        """A stored query (held-out example featurized at index time).

        Raises:
            UnknownExampleError: no stored query with this id.
        """
        self.data.check_ids(SPLIT_QUERY, [query_id])
        q = self.data.queries
        probabilities = q.get(KEY_PROBABILITIES)
        model_output = q.get(KEY_MODEL_OUTPUT)
        return Query(
            kind="stored",
            terms=self.data.surrogate.query_terms(self.data.query_phi[query_id]),
            id=query_id,
            target=to_python(q[KEY_LABEL][query_id]),
            label=to_python(q[KEY_LABEL][query_id]),
            prediction=to_python(q[KEY_PREDICTION][query_id]) if KEY_PREDICTION in q else None,
            probabilities=None if probabilities is None else probabilities[query_id].tolist(),
            output=float(q[KEY_OUTPUT][query_id]),
            model_output=None if model_output is None else model_output[query_id],
        )

    def feature(self, feature: list[float]) -> Query:
        """A precomputed projected feature phi_q.

        Raises:
            InvalidQueryError: not a finite `(k,)` vector of float32-representable numbers.
        """
        try:
            phi = np.asarray(feature, dtype=np.float64)
        except OverflowError as exc:  # an integer of hundreds of digits
            raise InvalidQueryError("feature values must be finite float32 numbers (|x| < 3.4e38)") from exc
        with np.errstate(over="ignore"):
            fits = bool(np.all(np.isfinite(phi.astype(np.float32))))
        if not fits:
            raise InvalidQueryError("feature values must be finite float32 numbers (|x| < 3.4e38)")
        return Query(kind="feature", terms=self.data.surrogate.query_terms(phi))

    def input(self, raw: Any, target: float | int | list[int] | None = None) -> Query:
        """Featurize a raw input with the index's model, projection and output function.

        Args:
            raw: nested lists of shape ``input_shape`` (the manifest's).
            target: the label to explain (a language model: one token id per position, -100 where a
                position is not scored); None explains the prediction (a language model: its greedy token
                at every position).

        Raises:
            InvalidQueryError: wrong shape, non-numeric or non-finite values, a bad target.
            ModelMismatchError: the model cannot be rebuilt (see :attr:`model_error`).
        """
        started = time.perf_counter()
        model = self._model()
        return self._from_tensor(model, self._input_tensor(raw), target, started)

    def _from_tensor(
        self, model: torch.nn.Module, inputs: torch.Tensor, target: Any, started: float
    ) -> Query:
        """The query of one checked `(1, *input_shape)` input (:meth:`_input_tensor`) and its target."""
        logits = self._logits(model, inputs)
        summary = self.output_fn.summarize(logits).numpy()
        return self._featurized("input", inputs, self._target(target, summary), summary, started)

    def text(self, text: str, continuation: str | None = None, max_new_tokens: int = 16) -> Query:
        """A language-model query by text (DESIGN.md 1.8): the continuation's tokens explained given the text.

        The text (the prompt) and the continuation are tokenized separately with the index's tokenizer and
        concatenated (so a continuation that begins a new word carries its leading space). Without a
        continuation the model's own greedy continuation is explained: up to ``max_new_tokens`` tokens, or
        fewer when the model's context is full. The margins of the continuation's tokens are summed
        (positions of the prompt and of padding are not scored), and the sequence is right-padded to the
        index's length.

        Args:
            text: the prompt, at least one token.
            continuation: the tokens to explain; None: the greedy continuation.
            max_new_tokens: the greedy continuation's length, at least 1.

        Raises:
            InvalidQueryError: an index without a tokenizer or a language-model output function, a text that
                encodes to no token, a prompt and continuation longer than the model's context, an empty
                continuation.
            ModelMismatchError: the model cannot be rebuilt.
        """
        started = time.perf_counter()
        tokenizer, n_positions = self._text_support()
        model = self._model()
        prompt = tokenizer.encode(text).ids
        if not prompt:
            raise InvalidQueryError("text encodes to no token; give at least one character")
        if len(prompt) >= n_positions:
            raise InvalidQueryError(
                f"text is {len(prompt)} tokens; this model reads {n_positions}, and at least one must be "
                "left for the continuation"
            )
        pad = self._pad()
        if pad in prompt:
            raise InvalidQueryError(f"text holds the padding token (id {pad}, e.g. '<pad>' written out)")
        if continuation is None:
            new = self._greedy(model, prompt, min(max_new_tokens, n_positions - len(prompt)))
        else:
            new = tokenizer.encode(continuation).ids
            if not new:
                raise InvalidQueryError("continuation encodes to no token; give text or leave it out")
            if pad in new:
                raise InvalidQueryError(
                    f"continuation holds the padding token (id {pad}, e.g. '<pad>' written out)"
                )
            if len(prompt) + len(new) > n_positions:
                raise InvalidQueryError(
                    f"text and continuation are {len(prompt)} + {len(new)} tokens; this model reads at most "
                    f"{n_positions}"
                )
        ids, mask = self._padded(prompt + new)
        targets = causal_lm_targets(ids, mask, prompt_length=len(prompt))
        inputs = self._as_model_input(ids, mask)
        summary = self.output_fn.summarize(self._logits(model, inputs)).numpy()
        query = self._featurized("text", inputs, targets[0].tolist(), summary, started)
        return dataclasses.replace(
            query,
            text=text,
            continuation=tokenizer.decode(new),
            continuation_source="given" if continuation is not None else "greedy",
        )

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise ModelMismatchError(self.model_error or "this index cannot featurize raw inputs")
        return self.model

    def _logits(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """`(B, n_outputs)` float32 raw outputs of a batch of inputs (B = 1 for one query); a clear error when
        the model cannot run."""
        try:
            with torch.no_grad():
                n = len(inputs) if isinstance(inputs, torch.Tensor) else 1
                logits = model_outputs(model, inputs).reshape(n, -1).float()
        except (IndexError, RuntimeError) as exc:  # e.g. a token id beyond the embedding's vocabulary
            raise InvalidQueryError(
                f"the model cannot run on this input ({type(exc).__name__}: {exc}); for token ids, every "
                "id must be below the model's vocabulary size"
            ) from exc
        if not bool(torch.isfinite(logits).all()):
            raise InvalidQueryError(
                "the model's output for this input is not finite (NaN or overflow): the input is far outside "
                "the range the model works in"
            )
        return logits

    def _featurized(
        self, kind: str, inputs: Any, target_value: Any, summary: np.ndarray, started: float
    ) -> Query:
        """The query of one model input and its target: phi_q by the index's projection, its terms."""
        dtype = torch.float32 if isinstance(target_value, float) else torch.int64
        target_tensor = torch.tensor(target_value, dtype=dtype)
        if self.hooks is not None:
            features = self.hooks.featurize(self.output_fn, inputs, target_tensor[None])
            phi, out = features.phi[0], float(features.outputs[0])
        else:
            assert self.model is not None and self.projection is not None  # checked by _model
            one = {key: value[0] for key, value in inputs.items()} if isinstance(inputs, dict) else inputs[0]
            gradient, out_t, _ = example_gradient(self.model, self.output_fn, one, target_tensor)
            phi, out = self.projection.project(gradient.numpy()[None])[0], float(out_t)
        return self._finish(kind, phi, out, target_value, summary, started)

    def _finish(
        self, kind: str, phi: np.ndarray, out: float, target_value: Any, summary: np.ndarray, started: float
    ) -> Query:
        """The query of a featurized input: phi `(k,)` float32, m_q, the target, summary `(1, n_summary)`."""
        prediction, probabilities = self.output_fn.predict(summary)
        if not (np.all(np.isfinite(phi)) and math.isfinite(out)):
            raise InvalidQueryError(
                "the tangent feature of this input is not finite (its gradient overflows float32): the input "
                "is far outside the range the model works in"
            )
        # rounded as the index stores its query features, so that a stored query's raw input or text answers
        # exactly what its id does (kept in float32 when beyond the storage dtype's range)
        with np.errstate(over="ignore"):
            stored = phi.astype(self.data.phi.dtype)
        phi = stored if np.all(np.isfinite(stored)) else phi
        return Query(
            kind=kind,
            terms=self.data.surrogate.query_terms(phi),
            target=target_value,
            prediction=to_python(prediction[0]),
            probabilities=None if probabilities is None else probabilities[0].tolist(),
            output=out,
            model_output=summary[0],
            featurize_ms=(time.perf_counter() - started) * 1e3,
        )

    def inputs(self, items: Sequence[tuple[Any, float | int | list[int] | None]]) -> list[Query | Exception]:
        """:meth:`input` for several raw inputs at once: one forward pass for their outputs and one forward
        and backward for their features (the per-layer projection, DESIGN.md 1.7); each feature equals the
        one :meth:`input` computes up to float32 rounding (a batch of one is the same computation).

        Args:
            items: ``(raw, target)`` pairs, as :meth:`input` takes them.

        Returns:
            Per item, its :class:`Query` or the :class:`~indexer.exceptions.InvalidQueryError` (or
            :class:`~indexer.exceptions.ModelMismatchError`) :meth:`input` would raise for it alone.
        """
        started = time.perf_counter()
        outcomes: list[Query | Exception | None] = [None] * len(items)
        try:
            model = self._model()
        except ModelMismatchError as exc:
            return [exc] * len(items)
        valid: list[tuple[int, torch.Tensor]] = []
        for j, (raw, _) in enumerate(items):
            try:
                valid.append((j, self._input_tensor(raw)))
            except (InvalidQueryError, ModelMismatchError) as exc:
                outcomes[j] = exc
        batched = None
        if valid and self.hooks is not None:
            batch = torch.cat([tensor for _, tensor in valid])
            with contextlib.suppress(InvalidQueryError):  # some input breaks the model: each on its own
                batched = self._logits(model, batch)
        if batched is None:  # the dense projection featurizes one gradient at a time anyway
            for j, tensor in valid:  # checked already: each featurized on its own
                try:
                    outcomes[j] = self._from_tensor(model, tensor, items[j][1], started)
                except InvalidQueryError as exc:
                    outcomes[j] = exc
            return _complete(outcomes)
        assert self.hooks is not None
        summaries = self.output_fn.summarize(batched).numpy()
        targets: list[Any] = []
        for row, (j, _) in enumerate(valid):
            try:
                targets.append(self._target(items[j][1], summaries[row : row + 1]))
            except InvalidQueryError as exc:
                outcomes[j] = exc
                targets.append(None)
        keep = [row for row, t in enumerate(targets) if t is not None]
        if keep:
            dtype = torch.float32 if isinstance(targets[keep[0]], float) else torch.int64
            features = self.hooks.featurize(
                self.output_fn,
                batch[keep],
                torch.tensor([targets[row] for row in keep], dtype=dtype),
            )
            for at, row in enumerate(keep):
                j = valid[row][0]
                try:
                    outcomes[j] = self._finish(
                        "input",
                        features.phi[at],
                        float(features.outputs[at]),
                        targets[row],
                        summaries[row : row + 1],
                        started,
                    )
                except InvalidQueryError as exc:
                    outcomes[j] = exc
        return _complete(outcomes)

    def _text_support(self) -> tuple[Any, int]:
        """The index's tokenizer and its sequence length T.

        Raises:
            InvalidQueryError: no tokenizer, not a language model, or inputs that are not `(T,)` token ids.
        """
        if self.tokenizer is None:
            raise InvalidQueryError(
                f"index {self.data.name!r} has no tokenizer (build it with --tokenizer); give token ids as "
                "'input' instead of 'text'"
            )
        info = self.data.manifest.model
        if not isinstance(self.output_fn, LanguageModelMargin) or len(info.input_shape) != 1:
            raise InvalidQueryError(
                f"index {self.data.name!r} is not a language-model index (output {info.output_function!r}, "
                f"inputs {list(info.input_shape)}); text queries need lm_margin over (T,) token ids"
            )
        return self.tokenizer, int(info.input_shape[0])

    def _as_model_input(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        """`(1, T)` ids as the model takes them: the tensor, or ``input_ids`` (and ``attention_mask``) when
        the index's inputs are keyword arguments."""
        keywords = self.data.manifest.model.input_dtypes
        if keywords is None:
            return ids
        made = {"input_ids": ids, "attention_mask": mask}
        unknown = sorted(set(keywords) - set(made))
        if unknown:
            raise InvalidQueryError(
                f"index {self.data.name!r} takes inputs {sorted(keywords)}; a text query makes input_ids and "
                "attention_mask only"
            )
        return {key: made[key] for key in keywords}

    def _greedy(self, model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
        """The model's ``n`` most likely next tokens after ``prompt``, one at a time."""
        tokens = list(prompt)
        for _ in range(n):
            ids, mask = self._padded(tokens)
            logits = self._logits(model, self._as_model_input(ids, mask)).reshape(ids.shape[1], -1)
            tokens.append(int(logits[len(tokens) - 1].argmax()))
        return tokens[len(prompt) :]

    def _pad(self) -> int:
        return 0 if self.pad_id is None else self.pad_id

    def _padded(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(1, T)` int64 ids of ``tokens`` right-padded to the index's length, and their attention mask."""
        n_positions = int(self.data.manifest.model.input_shape[0])
        ids = torch.full((1, n_positions), self._pad(), dtype=torch.int64)
        ids[0, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        mask = (torch.arange(n_positions) < len(tokens)).long()[None]
        return ids, mask

    def _input_tensor(self, raw: Any) -> torch.Tensor:
        """`(1, *input_shape)` tensor of a raw input in the dtype the index's inputs had when it was built
        (the manifest's ``input_dtype``: token ids stay integers, a float16 model gets float16); or a clear
        error."""
        expected = f"a rectangular array of numbers with shape {list(self.input_shape)}"
        name = self.data.manifest.model.input_dtype
        self._check_leaves(raw, expected, booleans=name == "bool")
        try:
            given = np.asarray(raw)
        except ValueError as exc:  # ragged nesting
            raise InvalidQueryError(f"input must be {expected}; its nested lists differ in length") from exc
        if given.dtype.kind not in "iuf":
            raise InvalidQueryError(f"input must be {expected}; it holds null, text or true/false values")
        if given.shape != self.input_shape:
            raise InvalidQueryError(
                f"input must have shape {list(self.input_shape)}; got {list(given.shape)}"
            )
        recorded = getattr(torch, name, None)
        if not isinstance(recorded, torch.dtype):
            raise ModelMismatchError(f"index {self.data.name!r} records an unknown input dtype {name!r}")
        if recorded is torch.bool:  # a 0/1 mask
            if not np.all((given == 0) | (given == 1)):
                raise InvalidQueryError("input must hold 0 or 1 (the index's inputs are booleans)")
            return torch.from_numpy(given.astype(np.bool_))[None]
        if not recorded.is_floating_point:  # token ids, class indices: integers of the recorded dtype
            if given.dtype.kind == "f" and not (
                np.all(np.isfinite(given)) and np.all(given == np.round(given))
            ):
                raise InvalidQueryError(f"input must hold integers ({name})")
            info = torch.iinfo(recorded)
            # compared exactly: float(2**63 - 1) rounds up to 2**63, which would wrap to -2**63
            high = 2.0 ** (info.bits - (1 if info.min < 0 else 0))  # one past the largest value, exact
            if given.size and (given.min() < info.min or given.max() >= high):
                raise InvalidQueryError(f"input values must fit {name} ({info.min}..{info.max})")
            vocab = getattr(self.output_fn, "vocab_size", None)
            if vocab is not None and given.size and given.min() < 0:
                raise InvalidQueryError(f"input token ids must be in 0..{vocab - 1}; got {int(given.min())}")
            return torch.from_numpy(given.astype(np.int64)).to(recorded)[None]
        with np.errstate(over="ignore"):
            x = torch.from_numpy(given.astype(np.float64)).to(recorded)
        if not bool(torch.isfinite(x).all()):
            raise InvalidQueryError(
                f"input must be finite {name} numbers (|x| <= {torch.finfo(recorded).max:.3g}); it holds "
                "NaN, infinity or values beyond that type's range"
            )
        return x[None]

    def _check_leaves(self, raw: Any, expected: str, *, booleans: bool) -> None:
        """Refuse, before numpy converts them, what it would misread: ``true``/``false`` among numbers
        (numpy reads them as 1 and 0; allowed for an index of boolean inputs), null or text, integers
        beyond 64 bits, and nesting deeper than the input's dimensions.

        Raises:
            InvalidQueryError: naming the first offending position.
        """
        depth = len(self.input_shape)
        if _plain_numbers(raw, depth):
            return
        stack: list[tuple[Any, tuple[int, ...]]] = [(raw, ())]
        while stack:
            value, at = stack.pop()
            if isinstance(value, list):
                if len(at) == depth:
                    raise InvalidQueryError(
                        f"input must have shape {list(self.input_shape)}; it is nested deeper at {list(at)}"
                    )
                stack.extend((value[i], (*at, i)) for i in reversed(range(len(value))))  # first first
            elif isinstance(value, bool) and not booleans:
                raise InvalidQueryError(
                    f"input must be {expected}; position {list(at)} holds {str(value).lower()}, not a number"
                )
            elif value is None or isinstance(value, str | dict):
                shown = "null" if value is None else "text" if isinstance(value, str) else "an object"
                raise InvalidQueryError(f"input must be {expected}; position {list(at)} holds {shown}")
            elif isinstance(value, int) and not -(2**63) <= value < 2**64:
                raise InvalidQueryError(
                    f"input must be {expected}; position {list(at)} holds an integer beyond 64 bits"
                )

    def _target(self, target: float | int | list[int] | None, summary: np.ndarray) -> Any:
        """The target to explain: the given one, checked, or the default (the prediction); summary is
        `(1, n_summary)` (for classification, the logits)."""
        if target is None:
            return to_python(self.output_fn.default_target(summary)[0])
        info = self.data.manifest.model
        if info.target_shape:  # one target per position: a language model's token ids
            return self._token_targets(target, info.target_shape)
        if isinstance(target, list):
            raise InvalidQueryError("target must be one number for this index (a class index or a value)")
        try:
            as_float = float(target)
        except OverflowError as exc:  # an integer of hundreds of digits
            raise InvalidQueryError(
                "target must be a finite number within float32's range (|y| <= 3.4e38)"
            ) from exc
        if self.output_fn.predict(summary)[1] is not None:  # classification: a class index
            n_outputs = summary.shape[1]
            if not (as_float.is_integer() and 0 <= int(target) < n_outputs):
                raise InvalidQueryError(f"target must be a class index in 0..{n_outputs - 1}; got {target!r}")
            return int(target)
        if not (math.isfinite(as_float) and abs(as_float) <= float(np.finfo(np.float32).max)):
            raise InvalidQueryError("target must be a finite number within float32's range (|y| <= 3.4e38)")
        return as_float

    def _token_targets(self, target: Any, shape: tuple[int, ...]) -> list[int]:
        """A language model's target: one token id per position, -100 where a position is not scored."""
        vocab = getattr(self.output_fn, "vocab_size", None)
        if not isinstance(target, list) or len(target) != shape[0] or not shape or len(shape) != 1:
            raise InvalidQueryError(
                f"target must be {shape[0]} token ids (one per position, -100 where a position is not scored)"
            )
        if any(type(t) is not int for t in target):
            raise InvalidQueryError("target must hold integer token ids")
        bad = [t for t in target if t != IGNORE_INDEX and not (vocab is None or 0 <= t < vocab)]
        if bad:
            raise InvalidQueryError(
                f"target token ids must be -100 or in 0..{(vocab or 0) - 1}; got {bad[0]}"
            )
        if all(t == IGNORE_INDEX for t in target):
            raise InvalidQueryError("target scores no position (all -100); give at least one token id")
        return list(target)
