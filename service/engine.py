"""Query answering over one loaded index: featurize, whiten, FAISS retrieval, exact float64 rerank.

Retrieval (DESIGN.md 1.3, vector form): every score is monotone in x = <a_q, z_i> (signed scores) or in
|x| (the information scores). FAISS returns the top ``depth`` inner products for +a_q and/or -a_q; the
candidates are rescored exactly in float64 from the stored features. With an exact (flat) index the depth
is doubled until no unseen example can beat the k-th result, so the answer equals the brute-force top-k
over all N examples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from indexer.constants import (
    CHECKPOINT_FILE,
    KEY_LABEL,
    KEY_MODEL_OUTPUT,
    KEY_OUTPUT,
    KEY_PREDICTION,
    KEY_PROBABILITIES,
    SPLIT_QUERY,
    SPLIT_TRAIN,
)
from indexer.coreset import CoresetResult, coreset_information_gain
from indexer.enums import Direction, Objective, Score
from indexer.exceptions import InvalidQueryError, ModelMismatchError, UnknownExampleError
from indexer.featurize import count_parameters, example_gradient
from indexer.index_format import IndexData
from indexer.models import ModelSpec, build_model, load_checkpoint, sha256_file
from indexer.projection import RandomProjection
from indexer.scores import example_scores, query_vector, score_from_inner, signed_score
from indexer.subset import greedy_subset, joint_score
from indexer.surrogate import QueryTerms
from indexer.tasks import output_function_from_spec

__all__ = ["Query", "Ranked", "AttributionEngine", "gpu_count"]


def gpu_count() -> int:
    """GPUs that FAISS can use: 0 with faiss-cpu, which has no GPU support."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


_RELATIVE_SLACK = 1e-4  # float32 FAISS inner products vs the float64 rerank


@dataclass(frozen=True)
class Query:
    """A featurized query.

    Attributes:
        kind: ``"stored"``, ``"input"`` or ``"feature"``.
        terms: whitened :class:`QueryTerms`.
        id: stored query id, else None.
        target: the target explained (label or predicted class), None for a bare feature.
        label: the stored query's true label, else None.
        prediction: predicted class or value, None for a bare feature.
        probabilities: `(n_classes,)` softmax, classification only.
        output: output-function value m_q, None for a bare feature.
        model_output: `(n_outputs,)` raw outputs, None for a bare feature.
        featurize_ms: time spent featurizing, in milliseconds.
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


@dataclass(frozen=True)
class Ranked:
    """The ranked result of a retrieval.

    Attributes:
        ids: `(m,)` training example ids, best first (m <= top_k).
        scores: score -> `(m,)` float64 values of every score.
        signed: `(m,)` the chosen score with its direction.
        depth: the retrieval depth finally used (examples per FAISS search).
        retrieve_ms, rerank_ms: time in FAISS and in the float64 rerank, milliseconds.
    """

    ids: np.ndarray
    scores: dict[Score, np.ndarray]
    signed: np.ndarray
    depth: int
    retrieve_ms: float
    rerank_ms: float


def _to_python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


class AttributionEngine:
    """Answers attribution queries against one :class:`~indexer.index_format.IndexData`.

    Thread-safe: FAISS search and numpy are re-entrant, the model is only read, and the projection cache is
    filled here, before any request.

    Args:
        data: the loaded index.
        projection_cache_bytes: keep R in memory (for millisecond query featurization) when its size
            ``n_params * k * 4`` bytes is at most this; otherwise R's blocks are regenerated per query.
        checkpoint: featurize raw queries with these weights instead of the index's own copy. If its sha256
            equals neither the index's stored checkpoint nor the file it was built from, raw queries are
            refused (:class:`ModelMismatchError`, HTTP 409) so that attributions never mix two models;
            stored and feature queries still work.
        use_gpu: search the FAISS indexes on the GPUs (faiss-gpu, the ``gpu`` extra); None: when faiss sees
            one. The float64 rerank stays on the CPU either way.
        trusted_factories: import-path model factories a manifest may name; any other import path is not
            imported (an index folder must not make the service run arbitrary code), so raw queries are
            refused for it while stored and feature queries work.

    Raises:
        ValueError: the stored model spec cannot be built or its checkpoint does not fit it.
        ModelMismatchError: the stored checkpoint's hash or parameter count differ from the manifest.
    """

    def __init__(
        self,
        data: IndexData,
        projection_cache_bytes: int = 1 << 30,
        checkpoint: Path | None = None,
        trusted_factories: frozenset[str] = frozenset(),
        use_gpu: bool | None = None,
    ) -> None:
        self.data = data
        manifest = data.manifest
        self.output_fn = output_function_from_spec(
            manifest["model"]["output_function"]["name"], manifest["model"]["output_function"]["params"]
        )
        self.input_shape = tuple(int(d) for d in manifest["model"]["input_shape"])
        self.model: torch.nn.Module | None = None
        self.projection: RandomProjection | None = None
        self.model_error: str | None = None
        spec = manifest["model"].get("spec")
        weights = data.path / CHECKPOINT_FILE if checkpoint is None else Path(checkpoint)
        if spec is None:
            self.model_error = (
                f"index {data.name!r} was built without a model spec; query it by stored id or by feature"
            )
        elif ":" in spec["factory"] and spec["factory"] not in trusted_factories:
            self.model_error = (
                f"index {data.name!r} names the model factory {spec['factory']!r}, an import path that the "
                "service does not import unless INFOTRACE_TRUSTED_MODEL_FACTORIES lists it"
            )
        elif checkpoint is not None:
            built_from = {
                manifest["model"]["checkpoint_sha256"],
                manifest["model"].get("source_checkpoint_sha256"),
            }
            digest = sha256_file(weights) if weights.is_file() else "missing"
            if digest not in built_from:
                self.model_error = (
                    f"checkpoint {weights} (sha256 {digest[:12]}...) is not the one index {data.name!r} "
                    f"was built from (sha256 {manifest['model']['checkpoint_sha256'][:12]}...); raw inputs "
                    "would mix two models, so only stored-id and feature queries are served"
                )
        if spec is not None and self.model_error is None:
            model = build_model(ModelSpec(spec["factory"], spec.get("kwargs", {})))
            load_checkpoint(model, weights)
            n_params = count_parameters(model)
            if n_params != manifest["model"]["n_params"]:
                raise ModelMismatchError(
                    f"{data.path / CHECKPOINT_FILE}: model has {n_params} parameters, "
                    f"the manifest expects {manifest['model']['n_params']}"
                )
            self.model = model.eval()
            proj = manifest["projection"]
            self.projection = RandomProjection(
                n_params, int(proj["k"]), int(proj["seed"]), proj["kind"], cache_bytes=projection_cache_bytes
            )
            for _ in self.projection.blocks():  # fill the cache now, not on the first request
                pass
        self.exact = manifest["faiss"].get("factory") == "Flat"
        # largest |z_i| per score, for the float32 slack of the exactness bound (only the exact flat index is
        # deepened); read back from the vectors the flat index holds rather than recomputed
        self._z_norm_max = (
            {
                score: float(np.linalg.norm(index.reconstruct_n(0, index.ntotal), axis=1).max(initial=0.0))
                for score, index in data.faiss_indexes.items()
            }
            if self.exact
            else {}
        )
        if use_gpu and gpu_count() == 0:
            raise ValueError(
                "INFOTRACE_USE_GPU=true but FAISS sees no GPU (faiss-cpu, or no device): install the gpu "
                "extra on a GPU machine, or unset it"
            )
        self.on_gpu = use_gpu if use_gpu is not None else gpu_count() > 0
        self.faiss_indexes = {
            score: (faiss.index_cpu_to_all_gpus(index) if self.on_gpu else index)
            for score, index in data.faiss_indexes.items()
        }

    # ---- queries -------------------------------------------------------------------------------------

    def stored_query(self, query_id: int) -> Query:
        """A stored query (held-out example featurized at index time).

        Raises:
            UnknownExampleError: no stored query with this id.
        """
        n_query = len(self.data.query_phi)
        if n_query == 0:
            raise UnknownExampleError(
                f"index {self.data.name!r} has no stored queries; query by input or feature"
            )
        if not 0 <= query_id < n_query:
            raise UnknownExampleError(f"no stored query with id {query_id}; valid ids are 0..{n_query - 1}")
        q = self.data.queries
        probabilities = q.get(KEY_PROBABILITIES)
        model_output = q.get(KEY_MODEL_OUTPUT)
        return Query(
            kind="stored",
            terms=self.data.surrogate.query_terms(self.data.query_phi[query_id]),
            id=query_id,
            target=_to_python(q[KEY_LABEL][query_id]),
            label=_to_python(q[KEY_LABEL][query_id]),
            prediction=_to_python(q[KEY_PREDICTION][query_id]),
            probabilities=None if probabilities is None else probabilities[query_id].tolist(),
            output=float(q[KEY_OUTPUT][query_id]),
            model_output=None if model_output is None else model_output[query_id],
        )

    def feature_query(self, feature: list[float]) -> Query:
        """A precomputed projected feature phi_q.

        Raises:
            InvalidQueryError: not a finite `(k,)` vector.
        """
        phi = np.asarray(feature, dtype=np.float64)
        with np.errstate(over="ignore"):
            fits = bool(np.all(np.isfinite(phi.astype(np.float32))))
        if not fits:
            raise InvalidQueryError("feature values must be finite float32 numbers (|x| < 3.4e38)")
        return Query(kind="feature", terms=self.data.surrogate.query_terms(phi))

    def input_query(self, raw: Any, target: float | int | None = None) -> Query:
        """Featurize a raw input with the index's model, projection and output function.

        Args:
            raw: nested lists of shape ``input_shape`` (the manifest's).
            target: the label to explain; None explains the predicted class.

        Raises:
            InvalidQueryError: wrong shape, non-numeric or non-finite values, a bad target.
            ModelMismatchError: the index has no model spec, or the configured checkpoint is not the one
                the index was built from, so raw inputs cannot be featurized.
        """
        if self.model is None or self.projection is None:
            raise ModelMismatchError(self.model_error or "this index cannot featurize raw inputs")
        started = time.perf_counter()
        expected = f"a rectangular array of numbers with shape {list(self.input_shape)}"
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
        with np.errstate(over="ignore"):
            x = given.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise InvalidQueryError(
                "input must be finite float32 numbers; it holds NaN, infinity or |x| > 3.4e38"
            )
        inputs = torch.from_numpy(x)[None]
        with torch.no_grad():
            raw_out = self.model(inputs).reshape(1, -1).numpy()
        prediction, probabilities = self.output_fn.predict(raw_out)
        if target is None:
            target_value = _to_python(self.output_fn.default_target(raw_out)[0])
        else:
            target_value = target
            n_outputs = raw_out.shape[1]
            if probabilities is not None and not (
                float(target).is_integer() and 0 <= int(target) < n_outputs
            ):
                raise InvalidQueryError(f"target must be a class index in 0..{n_outputs - 1}; got {target!r}")
            if probabilities is not None:
                target_value = int(target)
            elif not math.isfinite(float(target)):
                raise InvalidQueryError("target must be finite")
        dtype = torch.int64 if probabilities is not None else torch.float32
        gradient, out, _ = example_gradient(
            self.model, self.output_fn, inputs[0], torch.tensor(target_value, dtype=dtype)
        )
        phi = self.projection.project(gradient.numpy()[None])[0]
        return Query(
            kind="input",
            terms=self.data.surrogate.query_terms(phi),
            target=target_value,
            prediction=_to_python(prediction[0]),
            probabilities=None if probabilities is None else probabilities[0].tolist(),
            output=float(out),
            model_output=raw_out[0],
            featurize_ms=(time.perf_counter() - started) * 1e3,
        )

    # ---- scores --------------------------------------------------------------------------------------

    def scores_of(self, query: QueryTerms, ids: np.ndarray) -> dict[Score, np.ndarray]:
        """Every score of DESIGN.md 1.3 for training examples ``ids``, in float64 from the stored features."""
        s = self.data.surrogate
        return example_scores(
            query,
            self.data.phi[ids],
            s.whitened[ids],
            s.beta[ids],
            s.grad_term[ids],
            s.s[ids],
            s.prior_precision,
        )

    def predictive_entropy(self, query: Query) -> float | None:
        """Entropy of the query's predictive distribution in nats, by the output function (None for a bare
        feature): categorical for classification, Gaussian with the posterior variance for regression."""
        if query.model_output is not None:
            return float(
                self.output_fn.predictive_entropy(
                    query.model_output[None], np.array([query.terms.posterior_variance])
                )[0]
            )
        return None

    def rank(
        self, query: QueryTerms, score: Score, direction: Direction, top_k: int, candidates: int
    ) -> Ranked:
        """Top-k training examples for ``score`` and ``direction`` (see the module docstring).

        Args:
            query: the query's terms.
            score: the ranking score.
            direction: proponents (signed score > 0, largest first), opponents (< 0, most negative first)
                or both (by magnitude).
            top_k: results wanted (fewer come back when fewer examples have the requested sign).
            candidates: initial retrieval depth per FAISS search.

        Returns:
            :class:`Ranked`.
        """
        n = self.data.n_train
        index = self.faiss_indexes[score]
        a = query_vector(score, query)
        signs = []
        if not score.signed or direction is not Direction.OPPONENTS:
            signs.append(1.0)
        if not score.signed or direction is not Direction.PROPONENTS:
            signs.append(-1.0)
        slack = 1e-5 * float(np.linalg.norm(a)) * self._z_norm_max.get(score, 0.0)
        depth = min(max(candidates, top_k), n)
        retrieve_ms = rerank_ms = 0.0
        while True:
            t0 = time.perf_counter()
            queries = np.stack([sign * a for sign in signs]).astype(np.float32)
            found_values, found_ids = index.search(queries, depth)
            t1 = time.perf_counter()
            ids = np.unique(found_ids[found_ids >= 0])
            scores = self.scores_of(query, ids)
            signed = signed_score(score, scores)
            if direction is Direction.PROPONENTS:
                key, eligible = signed, signed > 0
            elif direction is Direction.OPPONENTS:
                key, eligible = -signed, signed < 0
            else:
                key, eligible = np.abs(signed), np.ones(len(ids), dtype=bool)
            order = np.lexsort((ids, -key))
            order = order[eligible[order]][:top_k]
            retrieve_ms += (t1 - t0) * 1e3
            rerank_ms += (time.perf_counter() - t1) * 1e3
            if depth >= n or not self.exact:
                break
            last = max(float(v[-1]) for v in found_values)  # unseen examples have x (or -x) below this
            bound_x = max(last, 0.0) * (1 + _RELATIVE_SLACK) + slack
            bound = float(score_from_inner(score, np.array([bound_x]), query)[0])
            if len(order) == top_k and key[order[-1]] > bound:
                break
            depth = min(2 * depth, n)
        return Ranked(
            ids=ids[order],
            scores={s: v[order] for s, v in scores.items()},
            signed=signed[order],
            depth=depth,
            retrieve_ms=retrieve_ms,
            rerank_ms=rerank_ms,
        )

    def subset(self, query: QueryTerms, objective: Objective, size: int, candidates: int) -> dict[str, Any]:
        """Greedy subset over the top ``candidates`` examples by the objective's single-example score.

        Returns:
            ``{"pool": Ranked, "greedy": GreedyResult, "ids": (m,), "top_single_joint": float}``; the last is
            the joint score of the top-``size`` single-example set, for comparison (DESIGN.md 1.4).
        """
        score = Score(objective.value)
        pool = self.rank(query, score, Direction.BOTH, max(candidates, size), max(candidates, size))
        s = self.data.surrogate
        ids = pool.ids
        greedy = greedy_subset(
            objective, query, self.data.phi[ids], s.whitened[ids], s.beta[ids], s.prior_precision, size
        )
        top = ids[:size]
        top_joint = joint_score(
            objective, query, self.data.phi[top], s.whitened[top], s.beta[top], s.prior_precision
        )
        return {"pool": pool, "greedy": greedy, "ids": ids[greedy.indices], "top_single_joint": top_joint}

    def coreset(self, size: int, query_ids: list[int] | None) -> CoresetResult:
        """Greedy coreset maximising the summed information gain over stored queries (DESIGN.md 1.4).

        Args:
            size: m.
            query_ids: stored queries forming the query set; None for all.

        Raises:
            UnknownExampleError: an unknown query id, or an index without stored queries.
        """
        n_query = len(self.data.query_phi)
        ids = list(range(n_query)) if query_ids is None else query_ids
        bad = [i for i in ids if not 0 <= i < n_query]
        if not ids or bad:
            raise UnknownExampleError(f"no stored queries with ids {bad[:5]}; valid ids are 0..{n_query - 1}")
        s = self.data.surrogate
        return coreset_information_gain(
            self.data.phi, s.beta, s.prior_precision, self.data.query_phi[ids], size
        )

    # ---- metadata ------------------------------------------------------------------------------------

    def train_metadata(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Label and metadata of training examples ``ids``."""
        return self.data.metadata.get(SPLIT_TRAIN, ids)

    def query_metadata(self, query_id: int) -> dict[str, Any]:
        """Label and metadata of a stored query."""
        return self.data.metadata.get_one(SPLIT_QUERY, query_id)

    def train_prediction(self, ids: np.ndarray) -> np.ndarray:
        """`(m,)` the model's predictions on training examples ``ids``."""
        return self.data.examples[KEY_PREDICTION][ids]
