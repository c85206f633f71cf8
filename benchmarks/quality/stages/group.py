"""Issue #4's group counterfactual: greedy joint sets against top-m single-example sets.

Also gives, for every removed set, its near-duplicate rate and its joint information loss and gain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.quality.infotrace_method import InfotraceFeatures
from benchmarks.quality.metrics import mean_near_duplicate_rate
from benchmarks.quality.stages.base import StageContext, infotrace_features, raw_scores
from benchmarks.quality.stages.removal import removal_masks, removal_retrains, top_k, with_random_floor
from indexer.data import Dataset
from indexer.enums import Objective, Score

__all__ = ["group_stage"]

Members = dict[str, dict[int, list[np.ndarray]]]
"""Set name -> size m -> one `(m,)` array of training indices per counterfactual query."""


def group_stage(
    ctx: StageContext,
    methods: list[Any],
    damping: dict[str, float | None],
    signed_cf: dict[str, np.ndarray],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Issue #4's group counterfactual, near-duplicate rate and joint scores of every removed set.

    Sets per counterfactual query and size m: the greedy joint information-loss and information-gain
    sets (DESIGN.md 1.4; pool: the top ``group_pool`` by the objective's single score), the top-m by
    each unsigned information score (what the subset endpoint compares against), each method's top-m
    proponents (signed) and m random examples.

    Args:
        methods: the fitted methods; damping: method key -> tuned damping;
        signed_cf: method key -> `(n_counterfactual, n_train)` signed scores of the counterfactual queries.

    Returns:
        ``(group, near_duplicate_rate, joint_scores)``, each keyed by str(m) then set name; joint scores
        are the mean over queries of the set's joint information loss and gain in nats.
    """
    config = ctx.config
    cf_rows = ctx.queries.eval_rows[: config.n_counterfactual]
    cf_q = ctx.queries.subset(cf_rows)
    info = infotrace_features(methods)
    phi_q = info.query_phi(cf_q.inputs, cf_q.targets)
    members = _greedy_and_unsigned_sets(ctx, methods, damping, cf_q, phi_q)
    for key, s in with_random_floor(ctx, signed_cf).items():
        members[key] = {m: list(top_k(s, m)) for m in config.group_sizes}
    sets = {
        name: {m: removal_masks(sets_m, ctx.n_train) for m, sets_m in by.items()}
        for name, by in members.items()
    }
    summaries, _ = removal_retrains(ctx, sets, cf_rows, "group-counterfactual", "group retrains")
    group = {str(m): {name: summaries[name][m] for name in sets} for m in config.group_sizes}
    near_dup = {
        str(m): {name: mean_near_duplicate_rate(info.train.phi, members[name][m], 0.95) for name in members}
        for m in config.group_sizes
    }
    return group, near_dup, _joint_scores(ctx, info, damping, members, phi_q)


def _greedy_and_unsigned_sets(
    ctx: StageContext,
    methods: list[Any],
    damping: dict[str, float | None],
    cf_q: Dataset,
    phi_q: np.ndarray,
) -> Members:
    """The greedy joint sets and the top-m by each unsigned information score, per query and size.

    Args:
        cf_q: the counterfactual queries; phi_q: their `(n_counterfactual, k)` features.
    """
    config = ctx.config
    by_key = {m.key: m for m in methods}
    info = infotrace_features(methods)
    members: Members = {}
    for objective, score in (
        (Objective.INFORMATION_LOSS, Score.INFORMATION_LOSS),
        (Objective.INFORMATION_GAIN, Score.INFORMATION_GAIN),
    ):
        tau = damping[f"infotrace_{score.value}"]
        sur = info.surrogate(float(tau))  # the information scores always have a tuned tau
        raw = raw_scores(by_key[f"infotrace_{score.value}"], cf_q, tau)
        greedy: dict[int, list[np.ndarray]] = {m: [] for m in config.group_sizes}
        for j in range(config.n_counterfactual):
            pool = np.argsort(-raw[j], kind="stable")[: config.group_pool]
            result = sur.greedy_subset(objective, sur.query_terms(phi_q[j]), pool, max(config.group_sizes))
            for m in config.group_sizes:
                greedy[m].append(pool[result.indices[:m]])
        members[f"greedy_{objective.value}"] = greedy
        members[f"top_unsigned_{score.value}"] = {m: list(top_k(raw, m)) for m in config.group_sizes}
    return members


def _joint_scores(
    ctx: StageContext,
    info: InfotraceFeatures,
    damping: dict[str, float | None],
    members: Members,
    phi_q: np.ndarray,
) -> dict[str, dict[str, dict[str, float]]]:
    """str(m) -> set name -> mean over queries of the set's joint information loss and gain (nats)."""
    sur_il = info.surrogate(float(damping[f"infotrace_{Score.INFORMATION_LOSS.value}"]))
    sur_ig = info.surrogate(float(damping[f"infotrace_{Score.INFORMATION_GAIN.value}"]))
    joint: dict[str, dict[str, dict[str, float]]] = {}
    for m in ctx.config.group_sizes:
        joint[str(m)] = {}
        for name in members:
            il, ig = [], []
            for j, idx in enumerate(members[name][m]):
                il.append(sur_il.joint_score(Objective.INFORMATION_LOSS, sur_il.query_terms(phi_q[j]), idx))
                ig.append(sur_ig.joint_score(Objective.INFORMATION_GAIN, sur_ig.query_terms(phi_q[j]), idx))
            joint[str(m)][name] = {
                "joint_information_loss": float(np.mean(il)),
                "joint_information_gain": float(np.mean(ig)),
            }
    return joint
