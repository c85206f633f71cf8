"""The models and featurization methods of :mod:`benchmarks.featurize`, each method behind one interface.

A method is set up once on a model (:meth:`Method.setup`: plans, projectors, its package's objects) and then
featurizes consecutive slices of the inputs (:meth:`Method.featurize`), returning the `(rows, k)` projected
tangent features of the margin ``m = z_y - logsumexp_{c != y} z_c`` (DESIGN.md 1.1), or None for the floor.
Every method gets the same model (same seed), inputs, batch size and, up to the rounding of each method's
block sizes, the same total k.

- ``kronecker``: :func:`indexer.features.plan_kronecker` (after the probe forward pass of
  :func:`indexer.features.fired_modules`, as the indexer does) and :class:`indexer.features.HookFeaturizer`,
  one batch at a time (what ``HookFeaturizer.featurize_buffer`` does for every buffer).
- ``dense``: :class:`indexer.features.DenseFeaturizer` with a :class:`indexer.features.DenseProjection`; its
  slices are the buffers :func:`indexer.features.tangent_features` would form (``buffer_rows`` at the
  default 256 MiB), so the projection matrix is generated as often as in an index build.
- ``traker``: ``TRAKer.featurize`` with its CPU ``BasicProjector`` (Gaussian, traker's default block size
  100, float32), wired as :class:`benchmarks.quality.peers.traker.TrakerTRAK` wires it.
- ``dattri``: the featurization inside dattri's ``TRAKAttributor.cache``, batch by batch: the attributor's
  vmapped ``grad_loss_func`` (the margin, as in :class:`benchmarks.quality.peers.dattri.DattriTRAK`), divided
  by its ``norm_scaler``, then ``dattri.func.projection.random_project`` (Gaussian, CPU), and its ``Q`` term.
- ``bergson``: bergson's ``InMemoryCollector`` (per-module two-sided projection, ``p x p`` per module, biases
  included, Gaussian) around one forward and one ``backward`` of the summed margin per batch; an MLP gets a
  length-1 sequence axis because bergson's hooks want `[N, S, I]` activations.
- ``floor``: one forward and one backward of the batch's mean cross-entropy to the parameter gradients.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from indexer.features import models

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "GRADIENT_COPIES",
    "BenchModel",
    "Method",
    "cnn",
    "make_method",
    "n_params",
]

METHODS = ("kronecker", "dense", "traker", "dattri", "bergson", "floor")
"""Method keys, in report order."""

METHOD_LABELS = {
    "kronecker": "infotrace kronecker",
    "dense": "infotrace dense",
    "traker": "traker (CPU BasicProjector)",
    "dattri": "dattri TRAK featurization",
    "bergson": "bergson (per-module)",
    "floor": "floor (forward + backward)",
}

GRADIENT_COPIES = {"dense": 2.5, "traker": 3.0, "dattri": 4.5}
"""Methods that hold whole `(batch, P)` per-example gradients, and about how many float32 copies of them their
peak holds (measured above the process's resident size before setup, MLP 784-512-512-10, batch 128: dense 2.2,
traker 2.9, dattri 4.3): a cell whose estimate passes the memory cap is not started."""

DEFAULT_BUFFER_BYTES = 256 * 2**20
""":func:`indexer.features.tangent_features`' default ``buffer_bytes`` (the dense featurizer's buffers)."""


# ---- models -------------------------------------------------------------------------------------------


def cnn(channels: tuple[int, int], hidden: int, batch_norm: bool = True) -> nn.Module:
    """The digits CNN of the demo (:func:`indexer.features.models.cnn`) on flat `(n, 784)` inputs: two 3 x 3
    convolutions (each with BatchNorm, ReLU and 2 x 2 max-pooling), a hidden Linear layer, 10 logits."""
    return models.cnn(28, channels, hidden, 10, batch_norm)


def n_params(model: nn.Module) -> int:
    """P: the trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked network: an MLP 784-w-...-10 or the digits CNN, built from a seed.

    Attributes:
        key: id in the report, e.g. ``"mlp-512"``.
        kind: ``"mlp"``, ``"cnn"`` (with BatchNorm) or ``"cnn-plain"`` (without).
        hidden: the MLP's hidden widths, or the CNN's ``(channels_1, channels_2, hidden)``.
    """

    key: str
    kind: str
    hidden: tuple[int, ...]

    def build(self, seed: int = 0) -> nn.Module:
        """The network in eval mode, its weights drawn from ``torch.manual_seed(seed)`` (untrained: the cost
        of featurizing does not depend on the weights)."""
        from indexer.features import mlp

        torch.manual_seed(seed)
        if self.kind == "mlp":
            model = mlp(784, list(self.hidden), 10)
        elif self.kind in ("cnn", "cnn-plain"):
            c1, c2, hidden = self.hidden
            model = cnn((c1, c2), hidden, batch_norm=self.kind == "cnn")
        else:
            raise ValueError(f"model kind must be 'mlp', 'cnn' or 'cnn-plain'; got {self.kind!r}")
        return model.eval()

    @property
    def label(self) -> str:
        if self.kind == "mlp":
            return "MLP " + "-".join(map(str, (784, *self.hidden, 10)))
        c1, c2, hidden = self.hidden
        norm = " (BatchNorm)" if self.kind == "cnn" else " (no BatchNorm)"
        return f"CNN conv{c1}-conv{c2}{norm} + Linear {c2 * 49}-{hidden}-10"


# ---- methods ------------------------------------------------------------------------------------------


class Method(ABC):
    """One featurization method on one model.

    Attributes:
        k: the total projected dimension it produces (None for the floor), set by :meth:`setup`.
        info: what the report records of its setup (plan blocks, package version, ...).
    """

    key: str
    imports: tuple[str, ...] = ()
    """Modules the child imports before its clock starts (a package's import is not featurization)."""

    def __init__(self) -> None:
        self.k: int | None = None
        self.info: dict[str, Any] = {}

    @abstractmethod
    def setup(self, model: nn.Module, k: int, seed: int, batch_size: int, n_rows: int) -> None:
        """Make the projector and whatever the package needs.

        Args:
            model: the network, in eval mode. k: the total k asked for. seed: projection seed.
            batch_size: examples per forward and backward pass.
            n_rows: room for this many featurized rows (every pass over the inputs gets new row numbers:
                traker skips rows it has already featurized).
        """

    def slice_rows(self, batch_size: int) -> int:
        """Examples per :meth:`featurize` call (a multiple of ``batch_size``)."""
        return batch_size

    @abstractmethod
    def featurize(self, x: torch.Tensor, y: torch.Tensor, start: int) -> np.ndarray | None:
        """`(rows, k)` float32 features of ``x`` `(rows, 784)`, ``y`` `(rows,)`, or None for the floor;
        ``start`` is the first row's number (below ``n_rows``)."""

    def close(self) -> None:  # noqa: B027 (most methods have nothing to free)
        """Free what :meth:`setup` made (hooks, temporary folders)."""

    def diagnose(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Timings of the method's parts on one slice, for the report's profile section (default: none)."""
        return {}


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


class Kronecker(Method):
    key = "kronecker"

    def setup(self, model: nn.Module, k: int, seed: int, batch_size: int, n_rows: int) -> None:
        from indexer.features import ClassificationMargin, HookFeaturizer, fired_modules, plan_kronecker

        probe = torch.zeros(2, 784)
        plan = plan_kronecker(model, k, seed, fired=fired_modules(model, probe))
        self.featurizer = HookFeaturizer(model, plan)
        self.output_fn = ClassificationMargin()
        self.k = plan.k
        self.info = {
            "blocks": [[b.name, b.layer, b.rows, b.cols, b.k_row, b.k_col] for b in plan.blocks],
            "rest": {"params": list(plan.rest.params), "n_params": plan.rest.n_params, "k": plan.rest.k},
        }

    def featurize(self, x: torch.Tensor, y: torch.Tensor, start: int) -> np.ndarray:
        return self.featurizer.featurize(self.output_fn, x, y).phi

    def diagnose(self, x: torch.Tensor, y: torch.Tensor, repeats: int = 7) -> dict[str, Any]:
        """Median milliseconds of one :meth:`featurize` call and of the rest block's part of it: the
        per-example gradients of the parameters outside the blocks (``per_example_gradients`` with their
        names, the call the featurizer makes for them; their projection to ``k_rest`` is negligible)."""
        import time

        from indexer.features import per_example_gradients

        def median_ms(fn: Any) -> float:
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - started))
            return float(np.median(times))

        rest = self.featurizer.plan.rest
        out: dict[str, Any] = {"featurize_ms": median_ms(lambda: self.featurize(x, y, 0)), "rows": len(x)}
        if rest.k:
            model, names = self.featurizer.model, rest.params
            out |= {
                "rest_params": rest.n_params,
                "rest_ms": median_ms(lambda: per_example_gradients(model, self.output_fn, x, y, names=names)),
            }
        return out

    def close(self) -> None:
        self.featurizer.close()


class Dense(Method):
    key = "dense"

    def setup(self, model: nn.Module, k: int, seed: int, batch_size: int, n_rows: int) -> None:
        from indexer.features import ClassificationMargin, DenseFeaturizer, DenseProjection, count_parameters

        self.featurizer = DenseFeaturizer(model, DenseProjection(count_parameters(model), k, seed))
        self.output_fn = ClassificationMargin()
        self.batch_size = batch_size
        self.k = k

    def slice_rows(self, batch_size: int) -> int:
        return self.featurizer.buffer_rows(batch_size, DEFAULT_BUFFER_BYTES)

    def featurize(self, x: torch.Tensor, y: torch.Tensor, start: int) -> np.ndarray:
        from indexer.data import Batch

        b = self.batch_size
        batches = [Batch(x[i : i + b], y[i : i + b]) for i in range(0, len(x), b)]
        return self.featurizer.featurize_buffer(self.output_fn, batches).phi


class Traker(Method):
    key = "traker"
    imports = ("trak", "trak.projectors")

    def setup(self, model: nn.Module, k: int, seed: int, batch_size: int, n_rows: int) -> None:
        import logging

        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType

        self.save_dir = tempfile.mkdtemp(prefix="bench-traker-")
        projector = BasicProjector(
            grad_dim=n_params(model),
            proj_dim=k,
            seed=seed,
            proj_type=ProjectionType.normal,
            device="cpu",
            block_size=100,  # traker's default: the (P, 100) matrix is regenerated for each block of k
            dtype=torch.float32,
        )
        self.traker = TRAKer(
            model=model,
            task="image_classification",  # its model output is the margin
            train_set_size=n_rows,
            save_dir=self.save_dir,
            load_from_save_dir=True,
            device="cpu",
            projector=projector,
            proj_dim=k,
            logging_level=logging.WARNING,
            use_half_precision=False,
            projector_seed=seed,
        )
        self.traker.load_checkpoint(
            {n: v.detach().clone() for n, v in model.state_dict().items()}, model_id=0
        )
        self.k = k
        self.info = {"package": f"traker {_version('traker')}", "block_size": 100}

    def featurize(self, x: torch.Tensor, y: torch.Tensor, start: int) -> np.ndarray:
        inds = np.arange(start, start + len(x))
        self.traker.featurize(batch=(x, y), inds=inds)
        return np.asarray(self.traker.saver.current_store["grads"][inds], dtype=np.float32)

    def close(self) -> None:
        shutil.rmtree(self.save_dir, ignore_errors=True)


class Dattri(Method):
    key = "dattri"
    imports = ("dattri.algorithm", "dattri.task", "dattri.func.projection", "dattri.func.utils")

    def setup(self, model: nn.Module, k: int, seed: int, batch_size: int, n_rows: int) -> None:
        from dattri.algorithm import TRAKAttributor
        from dattri.task import AttributionTask

        from benchmarks.quality.peers.base import batch_margins

        shape = (784,)

        def margin(params: Any, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = data
            return batch_margins(model, params, x, y, shape).sum()

        def correct_probability(params: Any, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = data
            return torch.sigmoid(batch_margins(model, params, x, y, shape)).sum()

        checkpoint = {n: v.detach().clone() for n, v in model.state_dict().items()}
        task = AttributionTask(loss_func=margin, model=model, checkpoints=checkpoint, target_func=margin)
        # every key given: dattri's attributors .update() a module-level default dict in place
        kwargs = {"proj_dim": k, "proj_max_batch_size": 32, "proj_seed": seed, "proj_type": "normal"}
        self.attributor = TRAKAttributor(
            task=task,
            correct_probability_func=correct_probability,
            projector_kwargs=kwargs | {"device": "cpu"},
            device="cpu",
        )
        self.task = task
        self.k = k
        self.info = {"package": f"dattri {_version('dattri')}", "proj_max_batch_size": 32}

    def featurize(self, x: torch.Tensor, y: torch.Tensor, start: int) -> np.ndarray:
        from dattri.func.projection import random_project
        from dattri.func.utils import _unflatten_params

        a = self.attributor
        parameters, _ = self.task.get_param(ckpt_idx=0)
        with torch.no_grad():
            grad_t = torch.nan_to_num(a.grad_loss_func(parameters, (x, y)))
            grad_t /= a.norm_scaler
            phi = random_project(grad_t, len(x), **a.projector_kwargs)(grad_t, ensemble_id=0)
            # TRAK's Q = 1 - p_i, computed beside the features in cache()
            a.correct_probability_func(_unflatten_params(parameters, self.task.get_model()), (x, y))
        return phi.detach().numpy().astype(np.float32, copy=False)


class _SequenceModel(nn.Module):
    """bergson's hooks want `[N, S, I]` activations: the wrapped network on `(N, 1, ...)` inputs when
    ``sequence_axis``, else as it is; ``device`` is the attribute bergson reads."""

    def __init__(self, inner: nn.Module, sequence_axis: bool) -> None:
        super().__init__()
        self.inner = inner
        self.sequence_axis = sequence_axis

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_axis:
            return self.inner(x)
        return self.inner(x.unsqueeze(1)).squeeze(1)


def bergson_side(k: int, n_modules: int) -> int:
    """bergson's per-module ``projection_dim`` p whose total ``n_modules * p^2`` is closest to ``k``."""
    base = max(1, math.isqrt(max(1, k // max(1, n_modules))))
    return min((base, base + 1), key=lambda p: (abs(n_modules * p * p - k), p))


class Bergson(Method):
    key = "bergson"
    imports = ("bergson", "datasets")

    def setup(self, model: nn.Module, k: int, seed: int, batch_size: int, n_rows: int) -> None:
        import warnings

        from bergson import GradientProcessor, IndexConfig, InMemoryCollector
        from datasets import Dataset as HFDataset

        from indexer.features import ClassificationMargin

        # "full backward hook is firing when gradients are computed with respect to module outputs"
        warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)
        is_mlp = not any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.model = _SequenceModel(model, sequence_axis=is_mlp).eval()
        n_modules = sum(isinstance(m, nn.Linear | nn.Conv2d) for m in model.modules())
        p = bergson_side(k, n_modules)
        options: dict[str, Any] = {
            "projection_dim": p,
            "projection_type": "normal",
            "include_bias": True,
            "projection_seed": seed,
        }
        self.run_path = tempfile.mkdtemp(prefix="bench-bergson-")
        self.collector = InMemoryCollector(
            model=self.model,
            data=HFDataset.from_dict({"row": list(range(n_rows))}),
            cfg=IndexConfig(run_path=self.run_path, **options),
            processor=GradientProcessor(**options),
        )
        self.collector.__enter__()  # registers its hooks
        self.output_fn = ClassificationMargin()
        self.k = sum(math.prod(s) for s in self.collector.shapes().values())
        self.info = {"package": f"bergson {_version('bergson')}", "projection_dim": p, "modules": n_modules}

    def featurize(self, x: torch.Tensor, y: torch.Tensor, start: int) -> np.ndarray:
        indices = list(range(start, start + len(x)))
        out = self.model(x)
        m = torch.func.vmap(self.output_fn.output)(out, y)
        m.sum().backward()
        self.collector.process_batch(indices, losses=m.detach())
        self.model.zero_grad(set_to_none=True)
        builder = self.collector.builder
        assert builder is not None  # made by InMemoryCollector.setup
        return np.asarray(builder.grad_buffer[indices], dtype=np.float32)

    def close(self) -> None:
        self.collector.__exit__(None, None, None)
        shutil.rmtree(self.run_path, ignore_errors=True)


class Floor(Method):
    key = "floor"

    def setup(self, model: nn.Module, k: int, seed: int, batch_size: int, n_rows: int) -> None:
        self.model = model

    def featurize(self, x: torch.Tensor, y: torch.Tensor, start: int) -> None:
        self.model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(x), y).backward()
        return None


_CLASSES: dict[str, type[Method]] = {
    cls.key: cls for cls in (Kronecker, Dense, Traker, Dattri, Bergson, Floor)
}


def make_method(key: str) -> Method:
    """A new, not yet set up, method.

    Raises:
        ValueError: an unknown key (the allowed ones are :data:`METHODS`).
    """
    if key not in _CLASSES:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {key!r}")
    return _CLASSES[key]()
