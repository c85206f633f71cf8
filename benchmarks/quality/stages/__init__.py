"""The quality harness's stages, one module each, run in this order by :mod:`benchmarks.quality.run`.

:mod:`.lds` (LDS retrains, evaluation scores, the LDS table), :mod:`.tune` (damping on the validation
queries), :mod:`.counterfactual` (top-k removal), :mod:`.group` (greedy joint sets), :mod:`.coreset`,
:mod:`.retrieval` (planted near-duplicates and mislabels) and :mod:`.cost`; :mod:`.base` and
:mod:`.removal` hold what they share.
"""

from benchmarks.quality.stages.base import RANDOM, HarnessError, StageContext, harness_methods, signed_scores
from benchmarks.quality.stages.coreset import coreset_stage
from benchmarks.quality.stages.cost import cost_stage
from benchmarks.quality.stages.counterfactual import counterfactual_stage, full_retrain_accuracy
from benchmarks.quality.stages.group import group_stage
from benchmarks.quality.stages.lds import LdsRetrains, evaluation_scores, lds_retrains, lds_table
from benchmarks.quality.stages.retrieval import mislabel_stage, near_duplicate_stage
from benchmarks.quality.stages.tune import tune_damping

__all__ = [
    "RANDOM",
    "HarnessError",
    "LdsRetrains",
    "StageContext",
    "coreset_stage",
    "cost_stage",
    "counterfactual_stage",
    "evaluation_scores",
    "full_retrain_accuracy",
    "group_stage",
    "harness_methods",
    "lds_retrains",
    "lds_table",
    "mislabel_stage",
    "near_duplicate_stage",
    "signed_scores",
    "tune_damping",
]
