"""The typed manifest: the JSON layout round-trips exactly, required fields are checked by name, and an index
written before the layout by stage (format version 1) still loads and answers as it did."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.enums import Direction, Score
from indexer.exceptions import IndexCorruptError, IndexFormatError
from indexer.features.models import ModelSpec
from indexer.store.layout import FORMAT_VERSION, MANIFEST_CHECKSUM_FIELD, MANIFEST_FILE
from indexer.store.manifest import Manifest, manifest_checksum, read_manifest
from indexer.store.reader import load_index
from service.engine import AttributionEngine

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
OLD_INDEX = FIXTURES / "tiny-v1"
"""A 24-example index (MLP 5-4-3, k = 6) written by the code before the layout by stage (commit 742d86b)."""
OLD_ANSWERS = FIXTURES / "tiny-v1-answers.json"
"""What that code answered on it: top-5 ids and signed scores per stored query, score and direction."""


def _document() -> dict:
    return json.loads((OLD_INDEX / MANIFEST_FILE).read_text())


def test_the_json_layout_round_trips_exactly() -> None:
    document = _document()
    manifest = Manifest.from_json(document)
    assert manifest.to_file_json() == document
    assert manifest_checksum(manifest.to_json()) == document[MANIFEST_CHECKSUM_FIELD]


def test_typed_fields() -> None:
    m = read_manifest(OLD_INDEX)
    assert m.format_version == 1 < FORMAT_VERSION and m.name == "tiny-v1"  # read as it was written
    assert m.model.spec == ModelSpec("mlp", {"in_features": 5, "hidden": [4], "out_features": 3})
    assert m.model.input_shape == (5,) and m.model.n_params == 5 * 4 + 4 + 4 * 3 + 3
    assert m.model.image_shape is None and m.model.source_checkpoint_sha256 is None
    assert (m.projection.kind, m.projection.k, m.projection.seed) == ("gaussian", 6, 2)
    assert m.counts.n_train == 24 and m.counts.n_query == 4 and m.surrogate.n_train == 24
    assert m.faiss.factory == "Flat" and m.faiss.exact
    assert m.config["k"] == 6 and set(m.timings_seconds) == {"featurize", "total"}
    assert m.files["phi.npy"].bytes == (OLD_INDEX / "phi.npy").stat().st_size


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["model"].pop("n_params"), "lacks the field 'model.n_params'"),
        (lambda d: d["projection"].update(k="6"), r"'projection.k' must be <class 'int'>; got '6'"),
        (lambda d: d["surrogate"].update(n_clamped=True), "'surrogate.n_clamped' must be"),
        (lambda d: d["model"].update(input_shape=[5.0]), "'model.input_shape' must be a list of integers"),
        (lambda d: d["model"].update(image_shape=[28]), r"'model.image_shape' must be \[height, width\]"),
        (lambda d: d["files"].update({"../x": {"sha256": "0", "bytes": 1}}), "must not contain a path"),
        (lambda d: d.update(faiss=[]), r"'faiss' must be <class 'dict'>; got \[\]"),
        (lambda d: d.pop("counts"), r"lacks the field\(s\) \['counts'\]"),
    ],
)
def test_missing_or_mistyped_fields_are_named(edit, message: str) -> None:
    document = copy.deepcopy(_document())
    edit(document)
    with pytest.raises(IndexFormatError, match=message):
        Manifest.from_json(document, "somewhere/manifest.json")


def test_a_tau_given_as_a_json_integer_is_a_float() -> None:
    document = copy.deepcopy(_document())
    document["surrogate"]["prior_precision"] = 3
    assert Manifest.from_json(document).surrogate.prior_precision == 3.0


def test_an_edit_without_a_new_checksum_is_refused(tmp_path: Path) -> None:
    shutil.copytree(OLD_INDEX, tmp_path / "tiny-v1")
    document = _document()
    document["name"] = "renamed"
    (tmp_path / "tiny-v1" / MANIFEST_FILE).write_text(json.dumps(document))
    with pytest.raises(IndexCorruptError, match="was edited after the index was written"):
        read_manifest(tmp_path / "tiny-v1")


def test_an_index_built_before_the_move_loads_and_answers_as_before() -> None:
    engine = AttributionEngine(load_index(OLD_INDEX))
    for want in json.loads(OLD_ANSWERS.read_text()):
        if "query" in want:
            query = engine.queries.stored(want["query"])
        else:
            query = engine.queries.input(want["input"], want["target"])
        got = engine.rank(query, Score(want["score"]), Direction(want["direction"]), 5, 5)
        assert got.ids.tolist() == want["ids"], want
        # a raw input is featurized again by torch in float32, whose kernels' last bits vary with the CPU
        # (2.5e-7 relative on an AVX-512 machine); a stored query's scores are float64 from stored values
        rtol = 1e-12 if "query" in want else 1e-5
        np.testing.assert_allclose(got.signed, want["signed"], rtol=rtol, atol=1e-300)


@pytest.mark.parametrize(
    ("edit", "rule"),
    [
        (lambda d: d["surrogate"].update(prior_precision=-5.0), "surrogate.prior_precision > 0"),
        (lambda d: d["surrogate"].update(s_floor=1.5), "0 < surrogate.s_floor < 1"),
        (lambda d: d["counts"].update(n_query=-1), "counts.n_query"),
        (lambda d: d["model"].update(image_shape=[2, 3]), "model.image_shape has one pixel per input value"),
    ],
)
def test_values_no_build_writes_are_refused(edit, rule: str) -> None:
    document = copy.deepcopy(_document())
    edit(document)
    with pytest.raises(IndexFormatError, match=f"breaks the rule {re.escape(rule)}"):
        Manifest.from_json(document)


def test_a_boolean_version_and_an_empty_file_list_are_refused() -> None:
    document = copy.deepcopy(_document())
    document["format_version"] = True  # == 1 in Python, not a version
    with pytest.raises(IndexFormatError, match="format_version is True"):
        Manifest.from_json(document)
    document = copy.deepcopy(_document())
    document["files"] = {}
    with pytest.raises(IndexFormatError, match="'files' lists no file"):
        Manifest.from_json(document)
