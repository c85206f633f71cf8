"""The quality harness's setting and infotrace adapter: planted causes where the harness says they are,
query roles that do not overlap, a reference model equal to its retrain, and infotrace scores equal to
the library's brute-force scoring."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.quality.infotrace_method import infotrace_methods
from benchmarks.quality.retrain import retrain_logits
from benchmarks.quality.setting import (
    plant_mislabels,
    plant_near_duplicates,
    quick_config,
    split_queries,
    train_reference,
)
from indexer.enums import Score
from indexer.gp.scores import example_scores
from indexer.gp.surrogate import fit_surrogate

CONFIG = dataclasses.replace(quick_config(), n_train=200, k=32, epochs=1)


@pytest.fixture(scope="module")
def data():
    return split_queries(CONFIG)


def test_query_roles_are_disjoint_and_cover_the_test_split(data) -> None:
    train, queries = data
    assert len(train) == CONFIG.n_train and len(queries.test) == 5000 - CONFIG.n_train
    assert len(queries.eval_rows) == CONFIG.n_eval and len(queries.validation_rows) == CONFIG.n_validation
    assert not set(queries.eval_rows) & set(queries.validation_rows)
    assert set(queries.heldout_rows) == set(range(len(queries.test))) - set(queries.validation_rows)
    again = split_queries(CONFIG)[1]
    np.testing.assert_array_equal(again.eval_rows, queries.eval_rows)


def test_planted_duplicates_are_where_the_harness_says(data) -> None:
    train, queries = data
    dup = plant_near_duplicates(train, queries, CONFIG)
    assert len(dup.train) == CONFIG.n_train + CONFIG.n_duplicates
    np.testing.assert_array_equal(
        dup.positions, np.arange(CONFIG.n_train, CONFIG.n_train + CONFIG.n_duplicates)
    )
    np.testing.assert_array_equal(dup.query_rows, queries.eval_rows[: CONFIG.n_duplicates])
    src = queries.subset(dup.query_rows)
    copies = dup.train.inputs[dup.positions]
    torch.testing.assert_close(dup.train.targets[dup.positions], src.targets)
    # lightly perturbed: each copy is within a few noise widths of its query and nearest to it
    rms = (copies - src.inputs).pow(2).mean(1).sqrt()
    assert bool((rms > 0).all()) and bool((rms < 2 * CONFIG.duplicate_noise).all())
    nearest = torch.cdist(src.inputs, dup.train.inputs).argmin(1).numpy()
    np.testing.assert_array_equal(nearest, dup.positions)
    # the original rows are untouched
    torch.testing.assert_close(dup.train.inputs[: CONFIG.n_train], train.inputs)


def test_planted_mislabels_flip_exactly_the_recorded_rows(data) -> None:
    train, _ = data
    mis = plant_mislabels(train, CONFIG)
    changed = np.flatnonzero((mis.train.targets != train.targets).numpy())
    np.testing.assert_array_equal(changed, mis.positions)
    assert len(changed) == round(CONFIG.mislabel_fraction * CONFIG.n_train)
    assert int(mis.train.targets.min()) >= 0 and int(mis.train.targets.max()) <= 9


def test_reference_model_equals_the_full_retrain_with_seed_zero(data) -> None:
    train, queries = data
    model = train_reference(train, CONFIG, "logreg", seed=0)
    logits = retrain_logits(
        train,
        queries.test.inputs[:20],
        np.ones((1, len(train)), bool),
        np.array([0]),
        CONFIG.retrain_config("logreg"),
    )
    with torch.no_grad():
        np.testing.assert_allclose(model(queries.test.inputs[:20]).numpy(), logits[0], atol=1e-5)


def test_infotrace_adapter_equals_library_scoring_and_signs_by_influence(data) -> None:
    train, queries = data
    model = train_reference(train, CONFIG, "mlp", seed=0)
    methods = {m.score: m for m in infotrace_methods(CONFIG.k, seed=0)}
    for method in methods.values():
        method.fit(model, train.inputs, train.targets)
    feats = methods[Score.INFLUENCE].features
    q = queries.subset(queries.eval_rows[:5])
    tau = 0.7
    sur = fit_surrogate(feats.train.phi, feats.train.beta, feats.train.grad_term, prior_precision=tau)
    phi_q = feats.query_phi(q.inputs, q.targets)
    for score, method in methods.items():
        got = method.scores(q.inputs, q.targets, tau)
        signed = method.signed_scores(q.inputs, q.targets, tau)
        assert got.shape == (5, CONFIG.n_train) and got.dtype == np.float64
        for j in range(5):
            ref = example_scores(
                sur.query_terms(phi_q[j]),
                phi=feats.train.phi,
                beta=sur.beta,
                grad_term=sur.grad_term,
                s=sur.s,
                prior_precision=tau,
            )
            np.testing.assert_allclose(got[j], ref[score], rtol=1e-10, atol=1e-12)
            expected = ref[score] if score.signed else np.sign(ref[Score.INFLUENCE]) * ref[score]
            np.testing.assert_allclose(signed[j], expected, rtol=1e-10, atol=1e-12)
    # self-scores: training example i scored for itself as the query
    self_scores = methods[Score.INFORMATION_LOSS].self_scores(tau)
    rows = train.inputs[:3], train.targets[:3]
    direct = methods[Score.INFORMATION_LOSS].scores(*rows, tau)
    np.testing.assert_allclose(self_scores[:3], np.diag(direct[:, :3]), rtol=1e-5)
    # default damping: the library's default prior precision
    assert feats.default_tau == pytest.approx(
        fit_surrogate(feats.train.phi, feats.train.beta, feats.train.grad_term).prior_precision
    )
    # the five scores share one fit: fitted for this model object, not for another
    assert feats.fitted_for(model)
    assert not feats.fitted_for(train_reference(train, CONFIG, "mlp", seed=0))


def test_the_cnn_runs_smaller_counterfactuals_without_if_cg() -> None:
    from benchmarks.quality.stages import harness_methods

    full = dataclasses.replace(CONFIG, n_counterfactual=50, n_seeds=3, cnn_counterfactual=10)
    cnn = full.for_model("cnn")
    assert (cnn.n_counterfactual, cnn.n_seeds, cnn.group_sizes, cnn.coreset_fractions) == (10, 1, (), ())
    assert full.for_model("mlp") == full and full.for_model("logreg") == full
    keys = [m.key for m in harness_methods(cnn)]
    assert "dattri_if_cg" not in keys and "traker_trak" in keys
    assert "dattri_if_cg" in [m.key for m in harness_methods(full)]
    model = cnn.retrain_config("cnn").build()
    assert sum(p.numel() for p in model.parameters()) == 13_266
    assert any(isinstance(layer, torch.nn.BatchNorm2d) for layer in model.modules())


def test_add_models_refuses_a_present_model_or_another_configuration(tmp_path) -> None:
    from benchmarks.quality.run import add_models

    result = {"config": CONFIG.to_json(), "models": {"mlp": {}}}
    with pytest.raises(ValueError, match="already in the result"):
        add_models(result, CONFIG, tmp_path, ["mlp"])
    other = dataclasses.replace(CONFIG, k=64)
    with pytest.raises(ValueError, match=r"other \['k'\]"):
        add_models(result, other, tmp_path, ["cnn"])
    assert result == {"config": CONFIG.to_json(), "models": {"mlp": {}}}  # nothing changed
