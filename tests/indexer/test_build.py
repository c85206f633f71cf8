"""Index builds: deterministic, the typed manifest complete, bad models and data refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.enums import Score
from indexer.features.models import ModelSpec, build_model
from indexer.features.tasks import ClassificationMargin, RegressionOutput
from indexer.gp.surrogate import fit_surrogate
from indexer.store.layout import MANIFEST_FILE
from indexer.store.reader import load_index

TinyProblem = tuple[torch.nn.Module, Dataset]


def test_same_seed_same_model_same_index(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    model, data = tiny_problem
    a = build_index(
        model, ClassificationMargin(), data, tmp_path / "a", config=IndexConfig(k=8), progress=False
    )
    b = build_index(
        model, ClassificationMargin(), data, tmp_path / "b", config=IndexConfig(k=8), progress=False
    )
    c = build_index(
        model, ClassificationMargin(), data, tmp_path / "c", config=IndexConfig(k=8, seed=1), progress=False
    )
    assert np.array_equal(load_index(a).phi, load_index(b).phi)
    assert not np.allclose(load_index(a).phi, load_index(c).phi)


def test_regression_index_and_prior_override(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    torch.manual_seed(2)
    model = build_model(ModelSpec("mlp", {"in_features": 4, "hidden": [6], "out_features": 1}))
    data = Dataset(torch.randn(30, 4), torch.randn(30))
    out = build_index(
        model,
        RegressionOutput(sigma=0.5),
        data,
        tmp_path / "reg",
        config=IndexConfig(k=6, prior_precision=2.5),
        progress=False,
    )
    loaded = load_index(out)
    assert loaded.manifest.surrogate.prior_precision == 2.5
    assert np.allclose(loaded.surrogate.beta, 4.0)
    residual = data.targets.numpy() - loaded.examples["output"]
    assert np.allclose(loaded.surrogate.grad_term, residual / 0.25)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (torch.full((40,), 3), r"must lie in 0\.\.2 \(the model has 3 outputs\); got values from 3 to 3"),
        (torch.full((40,), -1), r"must lie in 0\.\.2"),
        (torch.full((40,), 1.5), "must be integer class indices"),
    ],
)
def test_bad_classification_targets_are_refused(
    tmp_path: Path, tiny_problem: TinyProblem, targets: torch.Tensor, message: str
) -> None:
    model, data = tiny_problem
    bad = Dataset(data.inputs, targets)
    with pytest.raises(ValueError, match=message):
        build_index(
            model, ClassificationMargin(), bad, tmp_path / "x", config=IndexConfig(k=8), progress=False
        )
    with pytest.raises(ValueError, match=message):
        build_index(model, ClassificationMargin(), data, tmp_path / "y", queries=bad, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mismatched_models_and_names_are_refused(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    model, data = tiny_problem
    with pytest.raises(ValueError, match="regression explains a model with exactly 1 output; it has 3"):
        build_index(model, RegressionOutput(), data, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match=r"the model rejects inputs of shape \[7\]"):
        build_index(model, ClassificationMargin(), Dataset(torch.randn(40, 7), data.targets), tmp_path / "s")
    with pytest.raises(ValueError, match="index folder name 'bad name!' must match"):
        build_index(model, ClassificationMargin(), data, tmp_path / "bad name!", progress=False)


def test_build_is_the_library_pipeline_and_records_it(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    """The index holds what featurize -> fit -> score vectors gives, and the manifest says how it was made."""
    model, data = tiny_problem
    spec = ModelSpec("mlp", {"in_features": 6, "hidden": [5], "out_features": 3})
    config = IndexConfig(k=8, seed=3, prior_precision=0.7, faiss_factory="Flat", projection="dense")
    out = build_index(
        model, ClassificationMargin(), data, tmp_path / "tiny", model_spec=spec, config=config, progress=False
    )
    index = load_index(out)
    sur = index.surrogate
    margin = ClassificationMargin()
    beta = margin.likelihood_weight(index.examples["output"], index.examples["label"])
    refit = fit_surrogate(
        index.phi, beta, margin.grad_term(index.examples["output"], index.examples["label"]), 0.7
    )
    np.testing.assert_array_equal(sur.cholesky, refit.cholesky)
    np.testing.assert_array_equal(sur.s, refit.s)
    for score in Score:
        stored = index.faiss_indexes[score].reconstruct_n(0, index.n_train)
        np.testing.assert_array_equal(stored, refit.score_vectors(score).astype(np.float32))
    m = index.manifest
    assert m.name == "tiny" and m.model.spec == spec and m.model.n_params == 6 * 5 + 5 + 5 * 3 + 3
    assert (m.model.input_shape, m.model.input_dtype, m.model.n_outputs) == ((6,), "float32", 3)
    assert m.model.output_function == "classification_margin" and m.model.output_params == {}
    assert m.projection.to_json() == {"kind": "dense", "k": 8, "seed": 3, "distribution": "gaussian"}
    assert m.surrogate.prior_precision == 0.7 and m.surrogate.prior_precision_source == "given"
    assert m.faiss.exact and m.counts.to_json() == {"n_train": 40, "n_query": 0, "k": 8}
    assert m.config == config.to_json() and m.config["projection"] == "dense"
    assert set(m.files) == {p.name for p in out.iterdir()} - {MANIFEST_FILE}
    document = json.loads((out / MANIFEST_FILE).read_text())
    assert document["faiss"]["exact"] is True  # written for readers of the file, derived from the factory


def test_extra_manifest_fields_cannot_overwrite_the_manifest(
    tmp_path: Path, tiny_problem: TinyProblem
) -> None:
    model, data = tiny_problem
    with pytest.raises(ValueError, match=r"extra manifest fields \['surrogate'\] would overwrite"):
        build_index(
            model,
            ClassificationMargin(),
            data,
            tmp_path / "x",
            extra_manifest={"surrogate": 1},
            progress=False,
        )
    assert not (tmp_path / "x").exists()


def test_an_image_shape_must_match_the_inputs() -> None:
    with pytest.raises(
        ValueError, match=r"image_shape \(10, 10\) must have one pixel per input value: each input has 784"
    ):
        Dataset(torch.zeros(3, 784), torch.zeros(3, dtype=torch.long), image_shape=(10, 10))
    assert Dataset(torch.zeros(3, 1, 28, 28), torch.zeros(3), image_shape=(28, 28)).image_shape == (28, 28)
