"""The featurization benchmark: its quick run's bookkeeping (never its speed), that its infotrace methods are
the library's featurizers, and the rules that turn a cell's events into its record."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.featurize import QUICK, bench_models, main, plan_cells, skip_reason
from benchmarks.featurize_cell import CellSpec, summarise
from benchmarks.featurize_methods import METHODS, BenchModel, bergson_side, make_method
from benchmarks.featurize_report import main as render_again
from indexer.data import Dataset
from indexer.features import (
    ClassificationMargin,
    DenseFeaturizer,
    DenseProjection,
    HookFeaturizer,
    count_parameters,
    fired_modules,
    plan_kronecker,
    tangent_features,
)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-featurize") / "featurize.json"
    report = main(["--quick", "--out", str(out), "--bergson-python", "none"])
    return report, out


@pytest.mark.slow
def test_quick_run_has_every_cell_with_sane_numbers(quick_report: tuple[dict[str, Any], Path]) -> None:
    report, out = quick_report
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    main_cells = [c for c in report["cells"] if c["group"] == "main"]
    assert sorted((c["model"], c["method"]) for c in main_cells) == sorted(
        (model, method) for model in report["models"] for method in METHODS
    )
    for c in main_cells:
        if c["method"] == "bergson":
            assert c["status"] == "not_installed"
            continue
        assert c["status"] == "ok", c
        assert c["examples_done"] >= QUICK.n_examples
        assert math.isfinite(c["examples_per_s"]) and c["examples_per_s"] > 0
        assert math.isfinite(c["peak_rss_mib"]) and c["peak_rss_mib"] > 0
        assert c["peak_above_ready_mib"] >= 0
        assert c["features_finite"]
        if c["method"] == "floor":
            assert c["k"] is None and c["features_k"] == []
        else:
            assert c["features_k"] == [c["k"]]  # what the features have is what the report says
    for key, check in report["k_check"].items():
        assert check["within_5pct"], (key, check)
        assert set(check["k"]) == {"kronecker", "dense", "traker", "dattri"}
    memory = [c for c in report["cells"] if c["group"] == "memory"]
    assert {c["batch_size"] for c in memory} == set(QUICK.memory_batches)
    assert all(c["status"] == "ok" and c["peak_rss_mib"] > 0 for c in memory)
    profiles = [c for c in report["cells"] if c["group"] == "profile"]
    assert profiles and all(c["profile"] for c in profiles)
    assert len(report["targets"]) == 5
    for target in report["targets"]:
        assert target["measured"] is not None and math.isfinite(target["measured"])
        assert target["met"] in (True, False)
    assert {"loadavg_at_start", "loadavg_at_end", "cpu_count"} <= set(report["machine"])


@pytest.mark.slow
def test_quick_run_writes_its_report_and_plot(quick_report: tuple[dict[str, Any], Path]) -> None:
    report, out = quick_report
    text = (out.parent / "FEATURIZE.md").read_text()
    for model in report["models"].values():
        assert model["label"] in text
    assert "## Targets" in text and "featurize_scaling.png" in text
    assert (out.parent / "featurize_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render_again([str(out)]).read_text() == text  # the report is a function of the JSON alone


def _inputs(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def _run_method(
    key: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, batch: int
) -> Any:
    method = make_method(key)
    method.setup(model, k, 3, batch, len(x))
    rows = method.slice_rows(batch)
    phi = np.concatenate(
        [method.featurize(x[i : i + rows], y[i : i + rows], i) for i in range(0, len(x), rows)]
    )
    return method, phi


@pytest.mark.parametrize(
    "bench_model", [BenchModel("mlp", "mlp", (12, 12)), BenchModel("cnn", "cnn", (3, 4, 8))]
)
def test_infotrace_methods_are_the_library_featurizers(bench_model: BenchModel) -> None:
    x, y = _inputs()
    k, batch, output_fn = 40, 8, ClassificationMargin()
    model = bench_model.build(seed=0)

    method, phi = _run_method("kronecker", model, x, y, k, batch)
    assert isinstance(method.featurizer, HookFeaturizer)
    method.close()
    plan = plan_kronecker(model, k, 3, fired=fired_modules(model, x[:2]))
    with HookFeaturizer(model, plan) as featurizer:
        expected = tangent_features(featurizer, output_fn, Dataset(x, y).batches(batch), batch_size=batch)
    assert method.k == plan.k and phi.shape == (len(x), plan.k)
    np.testing.assert_allclose(phi, expected.phi, rtol=1e-5, atol=1e-6)

    method, phi = _run_method("dense", model, x, y, k, batch)
    dense = DenseFeaturizer(model, DenseProjection(count_parameters(model), k, 3))
    assert isinstance(method.featurizer, DenseFeaturizer)
    assert method.slice_rows(batch) == dense.buffer_rows(batch, 256 * 2**20)
    expected = tangent_features(dense, output_fn, Dataset(x, y).batches(batch), batch_size=batch)
    np.testing.assert_allclose(phi, expected.phi, rtol=1e-5, atol=1e-6)

    floor = make_method("floor")
    floor.setup(model, k, 3, batch, len(x))
    assert floor.featurize(x[:batch], y[:batch], 0) is None
    assert all(p.grad is not None for p in model.parameters())


def _spec(method: str = "traker", budget: float = 10.0) -> CellSpec:
    return CellSpec(method, "mlp-8", "mlp", (8, 8), 4, 16, 0, budget, 0.0, 1, "unused.npz")


def _slice(rows: int, seconds: float) -> dict[str, Any]:
    return {"event": "slice", "rows": rows, "seconds": seconds, "shape": [rows, 16], "finite": True}


def test_cell_records_say_what_finished() -> None:
    ready = {"event": "ready", "rss_mib": 100.0}
    setup = {"event": "setup", "seconds": 0.5, "k": 16, "info": {}}
    slices = [_slice(4, 1.0), _slice(4, 0.5), _slice(4, 0.25)]
    done = summarise(_spec(), [ready, setup, *slices], 150.0, None, 3.0, n_examples=12)
    assert done["status"] == "ok" and done["examples_done"] == 12
    # the median of 8 and 16 ex/s: the first slice, the warm-up, is left out
    assert done["examples_per_s"] == pytest.approx(12.0)
    assert done["timed_examples"] == 8 and done["peak_above_ready_mib"] == 50.0
    partial = summarise(_spec(), [ready, setup, slices[0]], 150.0, "time", 11.0, n_examples=12)
    assert partial["status"] == "partial" and partial["examples_per_s"] == pytest.approx(4.0)
    dnf = summarise(_spec(budget=10), [ready, setup], 150.0, "time", 11.0, n_examples=12)
    assert (dnf["status"], dnf["note"]) == ("dnf", "did not finish 4 examples in 10 s")
    assert dnf["examples_per_s"] is None
    error = {"event": "error", "message": "AssertionError: Expected input of shape [N, S, I]"}
    failed = summarise(_spec("bergson"), [ready, error], 150.0, None, 2.0, n_examples=12)
    assert (failed["status"], failed["note"]) == ("failed", error["message"])
    assert summarise(_spec(), [ready, setup], 5e4, "memory", 2.0, n_examples=12)["status"] == "memory"


def test_cells_that_cannot_fit_or_are_not_installed_are_not_started() -> None:
    cap = 2**30
    assert skip_reason(_spec("dense"), 10_000, cap, None) is None
    assert "memory cap" in (skip_reason(_spec("dattri"), 10**8, cap, None) or "")
    assert skip_reason(_spec("kronecker"), 10**8, cap, None) is None  # no per-example gradients
    assert "not installed" in (skip_reason(_spec("bergson"), 10, cap, None) or "")
    assert skip_reason(_spec("bergson"), 10, cap, "2.5.1") is None


def test_plan_covers_every_model_and_method_once() -> None:
    models = bench_models(QUICK)
    plan = plan_cells(QUICK, models, Path("inputs.npz"))
    main_cells = [(s.model, s.method) for group, s in plan if group == "main"]
    assert sorted(main_cells) == sorted((m, method) for m in models for method in METHODS)
    assert {s.batch_size for group, s in plan if group == "memory"} == set(QUICK.memory_batches)
    assert bergson_side(512, 3) == 13 and bergson_side(48, 3) == 4  # 3 x 13^2 = 507, 3 x 4^2 = 48
