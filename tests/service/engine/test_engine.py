"""The engine of one index: typed results equal the surrogate's own computations, ids are checked, the
registry names what it cannot serve."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.enums import Direction, Objective, Score
from indexer.exceptions import (
    IndexNotFoundError,
    IndexNotReadyError,
    InvalidQueryError,
    ModelMismatchError,
    UnknownExampleError,
)
from indexer.features.tasks import gaussian_entropy
from indexer.gp.scores import signed_score
from indexer.store.layout import MANIFEST_CHECKSUM_FIELD, MANIFEST_FILE
from indexer.store.manifest import manifest_checksum
from indexer.store.reader import load_index
from service.engine import AttributionEngine, IndexRegistry


@pytest.fixture(scope="module")
def engine(index_root: Path) -> AttributionEngine:
    return AttributionEngine(load_index(index_root / "digits"))


@pytest.mark.parametrize("score", list(Score), ids=lambda s: s.value)
@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
def test_attribute_equals_a_full_scan_of_the_surrogate(engine: AttributionEngine, score, direction) -> None:
    query = engine.queries.stored(4)
    found = engine.attribute(query, score, direction, 7, 20)
    scores = engine.data.surrogate.scores(query.terms)  # every training example, float64
    signed = signed_score(score, scores)
    key = {Direction.PROPONENTS: signed, Direction.OPPONENTS: -signed, Direction.BOTH: np.abs(signed)}[
        direction
    ]
    eligible = {Direction.PROPONENTS: signed > 0, Direction.OPPONENTS: signed < 0}.get(
        direction, np.ones(len(signed), dtype=bool)
    )
    order = np.lexsort((np.arange(len(signed)), -key))
    want = order[eligible[order]][:7]
    assert [e.id for e in found.examples] == want.tolist()
    assert [e.rank for e in found.examples] == list(range(1, len(want) + 1))
    assert found.exact and found.depth >= 20 and found.top_k == 7
    for e in found.examples:
        for s, value in e.scores.items():
            assert value == pytest.approx(scores[s][e.id], rel=1e-12, abs=1e-300)
        assert e.signed_score == pytest.approx(signed[e.id], rel=1e-12, abs=1e-300)
        assert e.sign == int(np.sign(signed[e.id]))
        assert e.label == int(engine.data.examples["label"][e.id])
        assert e.prediction == int(engine.data.examples["prediction"][e.id])
        assert set(e.metadata) == {"source_row"}


def test_the_query_description_has_its_entropies(engine: AttributionEngine) -> None:
    query = engine.queries.stored(3)
    d = engine.describe(query)
    v = query.terms.posterior_variance
    assert d.kind == "stored" and d.id == 3 and d.label == int(engine.data.queries["label"][3])
    assert d.output_entropy == pytest.approx(0.5 * math.log(2 * math.pi * math.e * v), rel=1e-12)
    p = np.asarray(d.probabilities)
    assert d.predictive_entropy == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
    assert set(d.metadata or {}) == {"source_row"}
    bare = engine.describe(engine.queries.feature(engine.data.query_phi[3].tolist()))
    assert bare.kind == "feature" and bare.predictive_entropy is None and bare.metadata is None
    assert bare.posterior_variance == pytest.approx(v, rel=1e-12)
    assert float(gaussian_entropy(0.0)) == -math.inf


@pytest.mark.parametrize("objective", list(Objective), ids=lambda o: o.value)
def test_subset_is_the_surrogates_greedy_over_the_retrieved_pool(
    engine: AttributionEngine, objective
) -> None:
    query = engine.queries.stored(5)
    found = engine.subset(query, objective, 4, 30)
    pool = engine.rank(query, Score(objective.value), Direction.BOTH, 30, 30).ids
    surrogate = engine.data.surrogate
    greedy = surrogate.greedy_subset(objective, query.terms, pool, 4)
    assert [m.id for m in found.members] == pool[greedy.indices].tolist()
    assert found.candidates == 30 and found.size == 4
    for j, member in enumerate(found.members):
        prefix = np.array([m.id for m in found.members[: j + 1]])
        assert member.joint == pytest.approx(surrogate.joint_score(objective, query.terms, prefix), rel=1e-9)
    assert found.joint == found.members[-1].joint
    assert found.top_single_joint == pytest.approx(surrogate.joint_score(objective, query.terms, pool[:4]))


def test_coreset_is_the_surrogates_and_checks_query_ids(engine: AttributionEngine) -> None:
    found = engine.coreset(3, [0, 2, 7])
    want = engine.data.surrogate.coreset(engine.data.query_phi[[0, 2, 7]], 3)
    assert [m.id for m in found.members] == want.indices.tolist()
    assert [m.objective for m in found.members] == want.objective.tolist()
    assert found.n_queries == 3 and found.objective == want.objective[-1]
    with pytest.raises(
        UnknownExampleError, match=r"no stored queries with ids 80, -1; valid ids are 0\.\.79"
    ):
        engine.coreset(2, [1, 80, -1])


def test_examples_and_their_inputs(engine: AttributionEngine, test_digits) -> None:
    record = engine.example("query", 6)
    assert record.label == int(test_digits.targets[6]) and record.posterior_variance is None
    assert record.input_shape == (784,) and record.image_shape == (28, 28)
    np.testing.assert_array_equal(engine.example_input("query", 6), test_digits.inputs[6].numpy())
    train = engine.example("train", 11)
    assert train.posterior_variance == pytest.approx(float(engine.data.surrogate.h[11]))
    assert "label" not in train.metadata and "source_row" in train.metadata
    with pytest.raises(
        UnknownExampleError, match=r"^no training example with id 600; valid ids are 0\.\.599$"
    ):
        engine.example("train", 600)
    with pytest.raises(UnknownExampleError, match="no stored query with id -1"):
        engine.example_input("query", -1)


def test_raw_inputs_are_validated_and_equal_the_stored_feature(
    engine: AttributionEngine, test_digits
) -> None:
    stored = engine.queries.stored(2)
    raw = engine.queries.input(test_digits.inputs[2].tolist(), int(test_digits.targets[2]))
    # both rounded to the stored float16: equal but for a value on a rounding boundary (one float16 step)
    np.testing.assert_allclose(raw.terms.phi, stored.terms.phi, rtol=2**-10, atol=1e-6)
    assert raw.kind == "input" and raw.featurize_ms > 0
    with pytest.raises(InvalidQueryError, match=r"input must have shape \[784\]; got \[3\]"):
        engine.queries.input([1.0, 2.0, 3.0])
    with pytest.raises(InvalidQueryError, match=r"target must be a class index in 0\.\.9; got 10"):
        engine.queries.input(test_digits.inputs[2].tolist(), 10)
    # a valid float32 input whose activations overflow: named as the input's fault, not a feature's
    with pytest.raises(InvalidQueryError, match=r"model's output for this input is not finite"):
        engine.queries.input([1e38] * 784)


def test_an_index_without_a_model_spec_serves_ids_and_refuses_raw_inputs(
    index_root: Path, tmp_path: Path
) -> None:
    """Built without a spec: the manifest says so and raw inputs get the reason (409 over HTTP)."""
    shutil.copytree(index_root / "digits", tmp_path / "nospec")
    path = tmp_path / "nospec" / MANIFEST_FILE
    document = json.loads(path.read_text())
    document["model"]["spec"] = None
    document[MANIFEST_CHECKSUM_FIELD] = manifest_checksum(document)
    path.write_text(json.dumps(document))
    engine = AttributionEngine(load_index(tmp_path / "nospec"))
    assert not engine.raw_inputs and "built without a model spec" in (engine.model_error or "")
    with pytest.raises(ModelMismatchError, match="built without a model spec"):
        engine.queries.input([0.0] * 784)
    assert (
        len(engine.attribute(engine.queries.stored(0), Score.INFLUENCE, Direction.BOTH, 3, 10).examples) == 3
    )


def test_registry_names_unknown_and_broken_indexes(index_root: Path, tmp_path: Path) -> None:
    shutil.copytree(index_root / "digits", tmp_path / "digits")
    shutil.copytree(index_root / "digits", tmp_path / "broken")
    (tmp_path / "broken" / "phi.npy").write_bytes(b"nope")
    registry = IndexRegistry.load(tmp_path)
    assert registry.get("digits").name == "digits"
    with pytest.raises(
        IndexNotReadyError, match=r"index 'broken' is not ready: IndexCorruptError: .*phi\.npy"
    ):
        registry.get("broken")
    with pytest.raises(IndexNotFoundError, match=r"no index named 'nope'; served indexes: \['digits'\]"):
        registry.get("nope")
    # a folder no URL can name was listed as ready although unreachable: it is a failure that says why
    shutil.copytree(index_root / "digits", tmp_path / "dïgits")
    odd = IndexRegistry.load(tmp_path)
    assert sorted(odd.engines) == ["digits"]
    assert odd.failures["dïgits"].startswith("the folder name 'dïgits' is not a valid index name")


def test_an_index_without_its_inputs_says_so(tmp_path: Path) -> None:
    import torch
    from torch.utils.data import TensorDataset

    from indexer.build import build_index
    from indexer.data import StreamedDataset
    from indexer.exceptions import NotStoredError
    from indexer.features.models import ModelSpec, build_model
    from indexer.features.tasks import ClassificationMargin

    torch.manual_seed(0)
    model = build_model(ModelSpec("mlp", {"in_features": 4, "hidden": [3], "out_features": 2}))
    source = StreamedDataset(
        TensorDataset(torch.randn(12, 4), torch.randint(0, 2, (12,))), image_shape=(2, 2)
    )
    engine = AttributionEngine(load_index(build_index(model, ClassificationMargin(), source, tmp_path / "s")))
    assert engine.example("train", 3).input_shape == (4,)
    with pytest.raises(NotStoredError, match="built without its inputs"):
        engine.example_input("train", 3)
    with pytest.raises(NotStoredError, match="built without its inputs"):
        engine.render("train", 3, 1)


class _Cast(torch.nn.Module):
    """A bfloat16 network behind a float32 interface: float32 inputs, float32 logits."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.bfloat16)).float()


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


# kind -> (model factory, input dtype); every dtype a build accepts, featurized and queried by raw input
DTYPE_MODELS = {
    "token_ids": (
        lambda: torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3)),
        torch.int64,
    ),
    "float64": (lambda: _mlp().double(), torch.float64),
    "float32": (_mlp, torch.float32),
    "float16": (lambda: _mlp().half(), torch.float16),
    "bfloat16": (lambda: _mlp().bfloat16(), torch.bfloat16),
    "bfloat16_behind_float32": (lambda: _Cast(_mlp()), torch.float32),
}


@pytest.mark.parametrize("projection", ["kronecker", "dense"])
@pytest.mark.parametrize("kind", sorted(DTYPE_MODELS))
def test_every_dtype_is_built_stored_and_queried_by_raw_input(
    tmp_path: Path, kind: str, projection: str
) -> None:
    """Token ids stay int64, a float16/bfloat16/float64 model gets inputs of its dtype: the raw query equals
    the stored one, the projected features are float32, and the stored inputs read back unchanged."""
    from indexer.build import build_index
    from indexer.config import IndexConfig
    from indexer.data import Dataset
    from indexer.features.models import ModelSpec, build_model, register_model
    from indexer.features.tasks import ClassificationMargin

    factory, dtype = DTYPE_MODELS[kind]
    register_model(f"test_dtype_{kind}", factory)
    spec = ModelSpec(f"test_dtype_{kind}")
    torch.manual_seed(1)
    x = torch.randint(0, 11, (20, 3)) if kind == "token_ids" else torch.randn(20, 5).to(dtype)
    data = Dataset(x, torch.randint(0, 3, (20,)))
    config = IndexConfig(k=8, projection=projection, min_coverage=0.0)
    out = build_index(
        build_model(spec),
        ClassificationMargin(),
        data,
        tmp_path / kind,
        queries=data,
        model_spec=spec,
        config=config,
        progress=False,
    )
    engine = AttributionEngine(load_index(out))
    assert engine.data.manifest.model.input_dtype == str(dtype).removeprefix("torch.")
    assert engine.data.query_phi.dtype == np.float16
    np.testing.assert_array_equal(engine.example_input("train", 3), x[3].float().numpy())
    # a dense raw query is one autograd backward, the build's a vmap: equal to the model's precision
    low = dtype in (torch.float16, torch.bfloat16) or kind == "bfloat16_behind_float32"
    rtol = 8 * torch.finfo(torch.bfloat16 if kind.startswith("bf") else dtype).eps if low else 1e-5
    for i in (0, 4):
        raw = engine.queries.input(x[i].tolist(), int(data.targets[i]))
        assert raw.terms.phi.dtype == np.float64 and np.all(np.isfinite(raw.terms.phi))
        stored = engine.queries.stored(i).terms.phi
        if projection == "kronecker":  # the same hooks at build and query time: the same numbers
            np.testing.assert_allclose(raw.terms.phi, stored, rtol=1e-5, atol=1e-6)
        else:
            assert np.abs(raw.terms.phi - stored).max() <= rtol * np.abs(stored).max()
    if kind == "token_ids":
        with pytest.raises(InvalidQueryError, match=r"input must hold integers \(int64\)"):
            engine.queries.input([0.5, 1, 2])
    elif dtype in (torch.float16, torch.bfloat16):
        limit = f"{torch.finfo(dtype).max:.3g}"
        with pytest.raises(
            InvalidQueryError, match=rf"input must be finite {kind} numbers \(\|x\| <= {re.escape(limit)}\)"
        ):
            engine.queries.input([4 * float(torch.finfo(dtype).max)] * 5)


def test_an_index_whose_model_cannot_be_rebuilt_serves_ids_and_features(
    index_root: Path, tmp_path: Path
) -> None:
    """Issue #16 case 4: a model factory that cannot be imported took the whole index down; now stored-id
    and feature queries are served, raw inputs get 409 with the reason, /readyz names what is missing."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.core.settings import Settings

    shutil.copytree(index_root / "digits", tmp_path / "orphan")
    path = tmp_path / "orphan" / MANIFEST_FILE
    document = json.loads(path.read_text())
    document["model"]["spec"]["factory"] = "no_such_package.models:net"
    document[MANIFEST_CHECKSUM_FIELD] = manifest_checksum(document)
    path.write_text(json.dumps(document))
    settings = Settings(index_root=tmp_path, trusted_model_factories=["no_such_package.models:net"])
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        stored = client.post("/v1/indexes/orphan/attributions", json={"query": {"id": 3}})
        phi = load_index(tmp_path / "orphan").query_phi[3].tolist()
        feature = client.post("/v1/indexes/orphan/attributions", json={"query": {"feature": phi}})
        raw = client.post("/v1/indexes/orphan/attributions", json={"query": {"input": [0.0] * 784}})
    assert ready.status_code == 200 and ready.json()["ready"] is True
    reason = ready.json()["missing"]["orphan"]["raw_input_queries"]
    assert "its model cannot be rebuilt" in reason and "no_such_package" in reason
    assert stored.status_code == 200 and feature.status_code == 200
    assert [r["id"] for r in stored.json()["results"]] == [r["id"] for r in feature.json()["results"]]
    assert raw.status_code == 409 and raw.json()["detail"] == reason


def test_token_ids_beyond_the_vocabulary_or_int64_are_refused(tmp_path: Path) -> None:
    """Review findings: an id past the embedding was a 500 (IndexError), and 2**63 passed the int64 check
    (compared in float64) and wrapped to -2**63."""
    from indexer.build import build_index
    from indexer.data import Dataset
    from indexer.features.models import ModelSpec, build_model, register_model
    from indexer.features.tasks import ClassificationMargin

    register_model("test_vocab_11", DTYPE_MODELS["token_ids"][0])
    spec = ModelSpec("test_vocab_11")
    torch.manual_seed(0)
    data = Dataset(torch.randint(0, 11, (20, 3)), torch.randint(0, 3, (20,)))
    engine = AttributionEngine(
        load_index(
            build_index(
                build_model(spec),
                ClassificationMargin(),
                data,
                tmp_path / "t",
                model_spec=spec,
                progress=False,
            )
        )
    )
    with pytest.raises(InvalidQueryError, match="every id must be below the model's vocabulary size"):
        engine.queries.input([11, 0, 0])
    for big in ([2**63, 0, 0], [9.223372036854775807e18, 0, 0]):
        with pytest.raises(InvalidQueryError, match=r"input values must fit int64"):
            engine.queries.input(big)
    assert engine.queries.input([10, 0, 0]).kind == "input"
