"""Peer attribution methods behind one interface, each run through its own package's published API.

Modules: :mod:`.base` (:class:`PeerMethod`, the output function and the shared checks), :mod:`.traker`,
:mod:`.dattri` and :mod:`.captum` (one adapter per method); :func:`peer_methods` builds all five.

The quality benchmark compares infotrace with five peers on the same classifier and data
(key: method, package class, the argument the damping feeds):

- ``traker_trak``: TRAK, one checkpoint, ``trak.TRAKer``, ``lambda_reg``;
- ``dattri_tracin``: Grad-Dot, ``TracInAttributor`` with weight 1 and raw gradients, no damping;
- ``dattri_if_cg``: influence function by CG, ``IFAttributorCG``, ``regularization``;
- ``dattri_trak``: TRAK, one checkpoint, ``TRAKAttributor``, ``regularization``;
- ``captum_tracincp``: TracInCP, one checkpoint, ``captum.influence.TracInCP``, no damping.

Each damping is in its package's own units, which differ: traker adds ``lambda_reg I`` to
``Phi^T Phi`` with ``phi = R^T g / sqrt(P)`` and ``R`` standard normal, dattri's TRAK to the same
matrix with ``R`` scaled by ``1 / sqrt(k)`` (so k times smaller), dattri's IF to the Hessian of the
mean training loss.

Output function: the classification margin ``m = z_y - logsumexp_{c != y} z_c`` (DESIGN.md 1.1), the
quantity every query asks about. Where a package needs a training loss it gets the cross-entropy
written as ``softplus(-m)``, which equals ``-log softmax_y`` exactly and keeps the gradient
``-(1 - p) grad m`` accurate for confident examples (``softmax - onehot`` rounds to 0 there).
Because ``grad CE = -(1 - p) grad m``, a package that pairs a loss gradient on the training side with a
margin gradient on the query side returns ``-(1 - p_i) grad m_i . (...) grad m_q``: those adapters
flip the sign.

Sign convention of every :meth:`PeerMethod.scores`: positive = proponent, i.e. training on example i
raises the query's margin (lowers its loss).

EK-FAC (``IFAttributorEKFAC``) is not used: in dattri 0.3.0 its ``transform_test_rep`` reshapes the
concatenation ``[vec(W), b]`` to ``(out, in + 1)`` as if it were ``[W | b]`` row by row (so every
``nn.Linear`` with a bias gets scrambled coordinates), and it rotates with ``q @ V @ q.T`` where
``torch.linalg.eigh`` returns eigenvectors as columns (``q.T @ V @ q`` is the eigenbasis). On a
logistic regression of sklearn's digits the package's inverse-Fisher-vector products are off from the
exact ``(F + lambda I)^-1 v`` by a relative error of 1.5 (no bias) and 2.1 (bias), against 0.7 for
EK-FAC in the right basis. The influence function therefore runs as IF-CG.
"""

from __future__ import annotations

from benchmarks.quality.peers.base import PEER_PACKAGES, PeerMethod, ProjectedPeerMethod, missing_peers
from benchmarks.quality.peers.captum import CaptumTracInCP
from benchmarks.quality.peers.dattri import DattriGradDot, DattriInfluenceCG, DattriTRAK
from benchmarks.quality.peers.traker import TrakerTRAK

__all__ = [
    "PeerMethod",
    "ProjectedPeerMethod",
    "TrakerTRAK",
    "DattriGradDot",
    "DattriInfluenceCG",
    "DattriTRAK",
    "CaptumTracInCP",
    "peer_methods",
    "missing_peers",
    "PEER_PACKAGES",
]


def peer_methods(
    projection_dim: int,
    seed: int = 0,
    *,
    cg_max_iter: int = 10,
    cg_hessian_examples: int | None = None,
) -> list[PeerMethod]:
    """The five peers in report order: traker TRAK, dattri Grad-Dot, dattri IF-CG, dattri TRAK, Captum.

    Args:
        projection_dim: k of the projected methods (traker TRAK, dattri Grad-Dot, dattri TRAK); IF-CG
            and Captum TracInCP work unprojected.
        seed: projection seed of the projected methods (and of IF-CG's Hessian subset); results are
            deterministic given it.
        cg_max_iter, cg_hessian_examples: IF-CG's CG iterations and Hessian sample (None: the whole
            training set); see :class:`DattriInfluenceCG` for what they cost.

    Returns:
        Unfitted adapters.

    Raises:
        ValueError: ``projection_dim`` < 1.
    """
    if int(projection_dim) < 1:
        raise ValueError(f"projection_dim must be >= 1; got {projection_dim}")
    return [
        TrakerTRAK(projection_dim, seed),
        DattriGradDot(projection_dim, seed),
        DattriInfluenceCG(max_iter=cg_max_iter, hessian_examples=cg_hessian_examples, seed=seed),
        DattriTRAK(projection_dim, seed),
        CaptumTracInCP(),
    ]
