"""Index builds: deterministic, the typed manifest complete, bad models and data refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset, StreamedDataset
from indexer.features.featurize import model_outputs
from indexer.features.hooks import HookFeaturizer
from indexer.features.language import IGNORE_INDEX, LanguageModelMargin, causal_lm_targets
from indexer.features.models import ModelSpec, build_model
from indexer.features.projection import KroneckerProjection
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
    assert index.phi.dtype == np.float16 and index.faiss_index is None  # the exact scan: no FAISS copy
    for key in ("h", "phi_norm"):  # the caches are those of the stored (float16) features
        want = refit.h if key == "h" else np.linalg.norm(index.phi.astype(np.float64), axis=1)
        np.testing.assert_array_equal(index.examples[key], want)
    m = index.manifest
    assert m.name == "tiny" and m.model.spec == spec and m.model.n_params == 6 * 5 + 5 + 5 * 3 + 3
    assert (m.model.input_shape, m.model.input_dtype, m.model.n_outputs) == ((6,), "float32", 3)
    assert m.model.output_function == "classification_margin" and m.model.output_params == {}
    assert m.projection.to_json() == {"kind": "dense", "k": 8, "seed": 3, "distribution": "gaussian"}
    assert m.surrogate.prior_precision == 0.7 and m.surrogate.prior_precision_source == "given"
    assert m.faiss.exact and m.counts.to_json() == {
        "n_train": 40,
        "n_query": 0,
        "k": 8,
        "feature_dtype": "float16",
    }
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


VOCAB = 13


class TokenExamples(torch.utils.data.Dataset):
    """Dict examples as a tokenizer and collator give them: ids, attention mask, aligned ``labels``."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> None:
        self.ids, self.mask, self.targets = ids, mask, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.targets[i]}


def token_examples(n: int, length: int = 7, seed: int = 0) -> TokenExamples:
    """Right-padded random sequences (every third one shorter) with prompts of 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, length - 2 :] = 0
    ids[mask == 0] = 0
    return TokenExamples(ids, mask, causal_lm_targets(ids, mask, prompt_length=2))


def test_a_language_model_index_with_token_targets_and_masks(tmp_path: Path, tiny_lm) -> None:
    """int64 ids with attention masks through the batch layout, (n, T) targets: the build's features are
    the hooks' for the recorded plan, beta and beta r the per-token terms, the manifest records the input
    and target dtypes, the labels come back as lists."""
    model, lm = tiny_lm(vocab=VOCAB, tied=True), LanguageModelMargin(VOCAB)
    train, queries = token_examples(22), token_examples(5, seed=1)
    out = build_index(
        model,
        lm,
        StreamedDataset(train),
        tmp_path / "lm",
        queries=StreamedDataset(queries),
        config=IndexConfig(k=24, batch_size=8),
        progress=False,
    )
    index = load_index(out)
    info = index.manifest.model
    assert (info.output_function, info.output_params) == ("lm_margin", {"vocab_size": VOCAB})
    assert (info.input_shape, info.input_dtype, info.n_outputs) == ((7,), "int64", 7 * VOCAB)
    assert info.input_dtypes == {"input_ids": "int64", "attention_mask": "int64"}
    assert (info.target_shape, info.target_dtype) == ((7,), "int64")
    assert index.manifest.to_json()["model"]["target_dtype"] == "int64"
    np.testing.assert_array_equal(index.examples["label"], train.targets.numpy())
    assert index.examples["prediction"].shape == (22, 7) and index.n_query == 5
    assert index.metadata.get_one("train", 3)["label"] == train.targets[3].tolist()
    with torch.no_grad():
        logits = model_outputs(model.eval(), {"input_ids": train.ids, "attention_mask": train.mask})
    # the index keeps (n, 2 T) summaries (greedy tokens, entropies), not the (n, T * vocab) logits
    assert index.examples["model_output"].shape == (22, 2 * 7)
    summaries = lm.summarize(logits.reshape(22, -1))
    np.testing.assert_allclose(index.examples["model_output"], summaries, rtol=1e-5)
    beta, grad_term = lm.likelihood_terms(logits.reshape(22, -1), train.targets, torch.zeros(22))
    np.testing.assert_allclose(index.surrogate.beta, beta, rtol=1e-12)
    np.testing.assert_allclose(index.surrogate.grad_term, grad_term, rtol=1e-12)
    coverage = index.manifest.projection.coverage or {}
    plan = KroneckerProjection.from_coverage_json(0, "gaussian", coverage)
    with HookFeaturizer(model.eval(), plan) as featurizer:
        want = featurizer.featurize(lm, {"input_ids": train.ids, "attention_mask": train.mask}, train.targets)
    np.testing.assert_array_equal(index.phi, want.phi.astype(np.float16))  # stored as float16


def test_a_language_model_index_from_plain_token_ids(tmp_path: Path, tiny_lm) -> None:
    examples = token_examples(12)
    data = Dataset(examples.ids, causal_lm_targets(examples.ids))  # no mask: the padding is scored too
    out = build_index(
        tiny_lm(vocab=VOCAB),
        LanguageModelMargin(VOCAB),
        data,
        tmp_path / "ids",
        queries=Dataset(examples.ids[:3], data.targets[:3]),
        config=IndexConfig(k=16, projection="dense"),
        progress=False,
    )
    info = load_index(out).manifest.model
    assert (info.input_dtype, info.input_dtypes, info.target_shape) == ("int64", None, (7,))
    np.testing.assert_array_equal(load_index(out).inputs, examples.ids.numpy())


def test_sequences_padded_per_batch_are_refused(tmp_path: Path, tiny_lm) -> None:
    def pad_to_longest(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = 3 + len(rows)  # batches of another length each
        return {key: torch.stack([r[key][:length] for r in rows]) for key in rows[0]}

    stream = StreamedDataset(token_examples(10), collate_fn=pad_to_longest)
    with pytest.raises(ValueError, match=r"inputs have shape \[5\] per example, the first batch's \[7\]"):
        build_index(
            tiny_lm(vocab=VOCAB),
            LanguageModelMargin(VOCAB),
            stream,
            tmp_path / "x",
            config=IndexConfig(k=8, batch_size=4),
            progress=False,
        )


def test_an_example_without_target_tokens_is_named(tmp_path: Path, tiny_lm) -> None:
    examples = token_examples(12)
    targets = examples.targets.clone()
    targets[9] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"train example\(s\) \[9\]: no target tokens"):
        build_index(
            tiny_lm(vocab=VOCAB),
            LanguageModelMargin(VOCAB),
            Dataset(examples.ids, targets),
            tmp_path / "x",
            config=IndexConfig(k=8, batch_size=4),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"query example\(s\) \[1\]: no target tokens"):
        build_index(
            tiny_lm(vocab=VOCAB),
            LanguageModelMargin(VOCAB),
            Dataset(examples.ids, examples.targets),
            tmp_path / "y",
            queries=Dataset(examples.ids[8:], targets[8:]),
            config=IndexConfig(k=8, batch_size=4),
            progress=False,
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_inputs_and_targets_a_build_cannot_use_are_refused_naming_them(
    tmp_path: Path, tiny_problem: TinyProblem
) -> None:
    """A newcomer review found these built into an index: NaN in the stored queries' inputs (whose queries
    then answered "query feature must be finite" and a garbage coreset), float64 inputs beyond float32
    (a RuntimeError about atol), regression targets beyond float32 (inf in FAISS); query inputs of another
    shape failed only after the whole training set was featurized; (n, 1) targets got an internal message."""
    model, data = tiny_problem
    bad_query = data.inputs[:5].clone()
    bad_query[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^query example 2: its input holds NaN or infinity as float32"):
        build_index(
            model, ClassificationMargin(), data, tmp_path / "a", queries=Dataset(bad_query, data.targets[:5])
        )
    huge = data.inputs.double()
    huge[7] = 1e300
    with pytest.raises(ValueError, match=r"^train example 7: its input holds NaN or infinity as float32"):
        build_index(model, ClassificationMargin(), Dataset(huge.float(), data.targets), tmp_path / "b")
    shape = r"a batch's inputs have shape \[5\] per example, the training examples' \[6\]"
    with pytest.raises(ValueError, match=rf"^query examples do not match the training examples: {shape}"):
        build_index(
            model,
            ClassificationMargin(),
            data,
            tmp_path / "c",
            queries=Dataset(torch.randn(3, 5), data.targets[:3]),
        )
    assert not list(tmp_path.glob(".c.work-*/*"))  # refused before any training shard was featurized
    with pytest.raises(
        ValueError, match=r"targets must have shape \(n,\): one class index per example; got \[40, 1\]"
    ):
        build_index(
            model, ClassificationMargin(), Dataset(data.inputs, data.targets[:, None]), tmp_path / "d"
        )
    one_output = build_model(ModelSpec("mlp", {"in_features": 6, "hidden": [5], "out_features": 1}))
    for targets, why in ((torch.full((40,), 1e300, dtype=torch.float64), "must fit float32"),
                         (torch.zeros(40, 1), r"must have shape \(n,\)")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            build_index(one_output, RegressionOutput(1.0), Dataset(data.inputs, targets), tmp_path / "e")


def test_small_layers_are_projected_whole_unless_turned_off(
    tmp_path: Path, tiny_problem: TinyProblem
) -> None:
    """IndexConfig.small_layer_params: the tiny MLP's layers get count-sketch blocks by default, two-sided
    ones with 0; the manifest records both the setting and each block's projection, and the default is the
    plan's."""
    from indexer.features.plan import SMALL_LAYER_PARAMS

    assert IndexConfig().small_layer_params == SMALL_LAYER_PARAMS
    model, data = tiny_problem
    kinds = {}
    for small in (SMALL_LAYER_PARAMS, 0):
        out = tmp_path / f"d{small}"
        config = IndexConfig(k=8, small_layer_params=small)
        build_index(model, ClassificationMargin(), data, out, config=config, progress=False)
        index = load_index(out)
        assert index.manifest.to_json()["config"]["small_layer_params"] == small
        coverage = index.manifest.projection.coverage or {}
        kinds[small] = [b["projection"] for b in coverage["blocks"]]
    assert kinds == {SMALL_LAYER_PARAMS: ["count_sketch", "count_sketch"], 0: ["kronecker", "kronecker"]}
    with pytest.raises(ValueError, match="small_layer_params must be 0 or more"):
        IndexConfig(small_layer_params=-1)
