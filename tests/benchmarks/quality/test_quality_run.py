"""The quality harness's orchestrator: its own bookkeeping check and the ``--update`` command line."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.quality.run import HarnessError, check_result
from benchmarks.quality.setting import quick_config

CONFIG = dataclasses.replace(quick_config(), n_train=200, k=32, epochs=1)


def test_check_result_names_a_missing_method() -> None:
    keys = [f"m{i}" for i in range(10)]
    per = {k: {"mean": 0.1} for k in keys}
    sets = {**per, "random": {}, "greedy_information_loss": {}, "greedy_information_gain": {}}
    sets_coreset = {**per, "random": {}, "greedy_information_gain": {}, "k_center_greedy": {}}
    res = {
        "methods": [{"key": k} for k in keys],
        "lds": {"methods": per, "noise_ceiling": {"mean": 0.5}},
        "retrieval": per,
        "mislabel": dict(per),
        "cost": per,
        "counterfactual": {str(k): {**per, "random": {}} for k in CONFIG.removal_sizes},
        "group": {str(m): sets for m in CONFIG.group_sizes},
        "near_duplicate_rate": {str(m): sets for m in CONFIG.group_sizes},
        "coreset": {f"{f:g}": {"methods": sets_coreset} for f in CONFIG.coreset_fractions},
    }
    result = {"models": dict.fromkeys(CONFIG.models, res)}
    check_result(result, CONFIG)
    del res["mislabel"]["m3"]
    with pytest.raises(HarnessError, match=r"mislabel: missing \['m3'\]"):
        check_result(result, CONFIG)
    res["mislabel"]["m3"] = {"roc_auc": None, "error": "CG failed"}  # an explicit None is a result
    del sets["greedy_information_loss"]
    with pytest.raises(HarnessError, match=r"group m=\d+ \(sets\): missing \['greedy_information_loss'\]"):
        check_result(result, CONFIG)


def test_update_cli_refuses_unknown_stages_and_a_missing_result(tmp_path, capsys) -> None:
    from benchmarks.quality.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--out", str(tmp_path), "--update", "bogus"])
    assert exc.value.code == 2 and "group and/or cost" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--out", str(tmp_path), "--update", "group"])
    assert exc.value.code == 2 and "run the harness without --update first" in capsys.readouterr().err
