"""Featurization as Ray tasks: one task per shard, the shards on a shared path (DESIGN.md 2.3).

A build given :class:`RayOptions` (``infotrace-index build --ray ADDRESS``) splits each split's examples into
the shards of its buffer layout (``IndexConfig.shard_examples``) and runs one Ray task per shard. A task
rebuilds the featurizer from the model (sent once through Ray's object store), checks that its projection is
the driver's, featurizes its examples and writes them as a checksummed shard into the build's work folder
(:mod:`indexer.store.shards`; written to a temporary name and renamed, so a killed task leaves no shard);
for a training shard it returns its block of the surrogate's data term, ``sum_i beta_i phi_i phi_i^T`` of the
stored (float16 or float32) values, which the driver adds up in shard order. A task whose worker dies is run
again by Ray (``max_retries``); a shard an earlier attempt or build finished is verified and reused.

The driver then runs the ordinary build over the same data: it finds every shard, verifies its checksum and
data digest, and writes the index from them with the summed data term. The blocks are the ones a
single-process build sums (:func:`~indexer.gp.surrogate.sharded_data_term`), so with the same
``shard_examples`` the two builds write the same files (where torch runs as many threads in the driver as in a
task: on some CPUs a float32 matrix product rounds differently with the thread count).

Nothing here assumes one machine beyond the output folder's parent: on a real cluster it must be a
filesystem every node sees (NFS, a mounted bucket); each node needs infotrace, torch and the model's code
installed.

Ray is an optional extra (``pip install 'infotrace[distributed]'``); it is imported only when a build asks
for it.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from indexer.config import IndexConfig
from indexer.data import Batch, Dataset, Examples
from indexer.enums import Device
from indexer.features.factory import make_featurizer, resolve_device
from indexer.features.featurize import BufferFeatures
from indexer.features.hooks import HookFeaturizer
from indexer.features.stream import checked_batches, tangent_features
from indexer.features.tasks import OutputFunction
from indexer.gp.surrogate import data_term
from indexer.store.layout import SPLIT_TRAIN
from indexer.store.records import stored_features
from indexer.store.shards import SplitShards

__all__ = [
    "AUTH_ENV",
    "INSTALL_HINT",
    "LOOPBACK_ENV",
    "RayOptions",
    "RayCluster",
    "ShardOutcome",
    "import_ray",
    "ray_cluster",
    "shard_examples_for",
]

log = logging.getLogger("infotrace.indexer")

INSTALL_HINT = "pip install 'infotrace[distributed]' (from a checkout: pip install -e '.[distributed]')"
"""How to get the optional Ray extra; named in the error a Ray build without it raises."""

LOCAL = "local"
"""The address that starts a Ray instance on this machine (bound to loopback) for the build's duration."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how a build's featurization runs on Ray (DESIGN.md 2.3).

    Attributes:
        address: ``"local"`` starts a Ray instance on this machine (loopback only) and stops it afterwards;
            ``"auto"`` joins the cluster this machine belongs to (``ray start``); ``"HOST:PORT"`` the cluster
            whose head listens there (its GCS port, 6379 by default); ``"ray://HOST:10001"`` a Ray Client
            server (needs ``pip install 'ray[client]'``, not part of the extra). When Ray is already
            initialized in this process it is used as it is.
        workers: for ``"local"``: the CPUs given to the local instance, i.e. tasks at once (None: all).
        cpus_per_task: Ray CPUs each task holds (a task's torch uses that many threads).
        gpus_per_task: Ray GPUs each task holds (None: 1 when the driver featurizes on CUDA, else 0).
        max_retries: runs of a task whose worker died, beyond the first, before the build fails.
        shards_per_cpu: when ``IndexConfig.shard_examples`` is None, the shard size is chosen so that each
            cluster CPU gets about this many shards of the training set (load balance against per-task setup).

    Raises:
        ValueError: an empty address, or a non-positive count.
    """

    address: str = LOCAL
    workers: int | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None
    max_retries: int = 3
    shards_per_cpu: int = 2

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("the Ray address must be 'local', 'auto', HOST:PORT or ray://HOST:PORT")
        if self.workers is not None and self.workers <= 0:
            raise ValueError(f"workers must be positive; got {self.workers}")
        if self.cpus_per_task <= 0 or self.max_retries < 0 or self.shards_per_cpu <= 0:
            raise ValueError(
                "cpus_per_task and shards_per_cpu must be positive and max_retries non-negative; got "
                f"{self.cpus_per_task}, {self.shards_per_cpu}, {self.max_retries}"
            )
        if self.gpus_per_task is not None and self.gpus_per_task < 0:
            raise ValueError(f"gpus_per_task must be non-negative; got {self.gpus_per_task}")


@dataclass(frozen=True)
class ShardOutcome:
    """What one Ray task reports about its shard.

    Attributes:
        buffer: the shard's number; rows: its examples.
        term: `(k, k)` float64 data term of its stored features (training shards), or None (query shards, or
            features beyond the stored dtype's range, which the driver then reports with the example's id).
        reused: the shard was already on disk (an earlier attempt or build) and verified.
        queued_s: seconds from submission to the task's start (scheduling, worker start, argument transfer).
        setup_s: seconds the task spent before featurizing (the featurizer rebuilt, its projection checked).
        featurize_s: seconds featurizing and writing the shard.
        started, finished: the task's start and end, seconds since the epoch on its node's clock.
        pid: the worker process.
    """

    buffer: int
    rows: int
    term: np.ndarray | None
    reused: bool
    queued_s: float
    setup_s: float
    featurize_s: float
    started: float
    finished: float
    pid: int


@dataclass(frozen=True)
class _Job:
    """What every task of one split shares (sent once through the object store)."""

    output_fn: OutputFunction
    config: IndexConfig
    probe: Batch
    projection: dict[str, Any]
    folder: str
    split: str
    n_outputs: int
    torch_version: str


class _Offset:
    """A :class:`~indexer.features.stream.BufferCache` that files a task's buffer 0 as shard ``buffer``."""

    def __init__(self, shards: SplitShards, buffer: int) -> None:
        self.shards, self.buffer = shards, buffer

    def load(self, buffer: int, rows: int, digest: str) -> BufferFeatures | None:
        return self.shards.load(self.buffer + buffer, rows, digest)

    def save(self, buffer: int, features: BufferFeatures, digest: str) -> None:
        self.shards.save(self.buffer + buffer, features, digest)


def _featurize_shard(
    job: _Job, model: nn.Module, data: Examples, buffer: int, start: int, stop: int, submitted: float
) -> ShardOutcome:
    """The body of one Ray task: featurize examples ``[start, stop)`` of ``data`` as shard ``buffer``."""
    began = time.time()
    logging.getLogger("infotrace.indexer").setLevel(logging.ERROR)  # the driver already logged the plan
    if torch.__version__ != job.torch_version:
        raise RuntimeError(
            f"this Ray worker has torch {torch.__version__}, the building process {job.torch_version}: "
            "kernels may round differently; install the same versions on every node"
        )
    model.eval()
    featurizer, projection = make_featurizer(model, job.config, job.probe, job.output_fn)
    if projection.to_json() != job.projection:
        raise RuntimeError(
            "the featurizer a Ray worker made has another projection than the building process's (other "
            f"library versions?): {projection.to_json()} != {job.projection}"
        )
    ready = time.time()
    shards = SplitShards(Path(job.folder), job.split)
    part = (
        data if isinstance(data, Dataset) else replace(data, source=Subset(data.source, range(start, stop)))
    )
    try:
        features = tangent_features(
            featurizer,
            job.output_fn,
            checked_batches(part, job.config.batch_size, job.output_fn, job.n_outputs, job.split, start),
            batch_size=job.config.batch_size,
            buffer_bytes=job.config.buffer_bytes,
            cache=_Offset(shards, buffer),
            shard_examples=job.config.shard_examples,
        )
    finally:
        if isinstance(featurizer, HookFeaturizer):
            featurizer.close()
    if len(features.phi) != stop - start:
        raise ValueError(
            f"{job.split} examples {start}..{stop - 1}: the data gave {len(features.phi)} examples there; "
            "a Ray build needs a dataset whose length and order do not change"
        )
    term = None
    if job.split == SPLIT_TRAIN:
        try:
            term = data_term(stored_features(features.phi, job.config.feature_dtype.value), features.beta)
        except ValueError:  # beyond float16's range: the driver's own conversion names the example
            term = None
    finished = time.time()
    return ShardOutcome(
        buffer=buffer,
        rows=stop - start,
        term=term,
        reused=shards.reused > 0,
        queued_s=max(began - submitted, 0.0),
        setup_s=ready - began,
        featurize_s=finished - ready,
        started=began,
        finished=finished,
        pid=os.getpid(),
    )


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a single-machine instance: set to 0 (before Ray is imported), every Ray server of an
instance this machine starts listens on 127.0.0.1 instead of the machine's address."""


AUTH_ENV = "RAY_AUTH_MODE"
"""Ray's authentication mode. Clusters that ``ray start`` makes use token authentication by default (the
token in ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``); a build joining a cluster uses ``token`` unless this is
set, which also joins a cluster without authentication."""


def import_ray(local: bool = False) -> ModuleType:
    """The ``ray`` module.

    Args:
        local: a Ray instance is to be started here, or joined on loopback: make this process's Ray use
            127.0.0.1 (:data:`LOOPBACK_ENV`), unless the environment says otherwise or Ray is already
            imported. Either way token authentication is used unless :data:`AUTH_ENV` says otherwise.

    Raises:
        ImportError: Ray is not installed; the message says how to install the extra.
    """
    if "ray" not in sys.modules:  # both are read when Ray is imported
        os.environ.setdefault(AUTH_ENV, "token")
        if local:
            os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ImportError(f"a Ray build needs Ray, which is not installed: {INSTALL_HINT}") from exc


def shard_examples_for(n_train: int, cpus: int, batch_size: int, shards_per_cpu: int) -> int:
    """The shard size that gives each of ``cpus`` about ``shards_per_cpu`` training shards, in whole batches.

    Args:
        n_train: training examples; cpus: the cluster's task slots; batch_size: examples per batch;
        shards_per_cpu: shards wanted per slot.

    Returns:
        A positive multiple of ``batch_size``.
    """
    per_shard = -(-max(n_train, 1) // max(cpus * shards_per_cpu, 1))
    return max(batch_size, -(-per_shard // batch_size) * batch_size)


class RayCluster:
    """A connected Ray cluster that featurizes a build's splits (made by :func:`ray_cluster`).

    Args:
        ray: the ``ray`` module, initialized; options: the build's :class:`RayOptions`;
        connect_s: seconds ``ray.init`` took (0 when Ray was already initialized).

    Attributes:
        cpus: the cluster's CPUs (Ray's ``cluster_resources``) when connected.
        outcomes: split -> the :class:`ShardOutcome` of each shard, in shard order, once featurized.
        wall_s: split -> seconds from the first task's submission to the last one's result.
    """

    def __init__(self, ray: ModuleType, options: RayOptions, connect_s: float = 0.0) -> None:
        self.ray, self.options, self.connect_s = ray, options, connect_s
        self.cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        self.outcomes: dict[str, list[ShardOutcome]] = {}
        self.wall_s: dict[str, float] = {}
        self._model: Any = None
        self._task: Any = None

    def configure(self, config: IndexConfig, train: Examples, queries: Examples | None = None) -> IndexConfig:
        """``config`` with a shard size for this cluster when it has none (:func:`shard_examples_for`).

        Raises:
            ValueError: ``train`` or ``queries`` cannot be split by index (an iterable dataset), or a task
                asks for more CPUs than any node of the cluster has (Ray would wait for such a node forever).
        """
        n_train = _length(train)
        if queries is not None:
            _length(queries)
        largest = max(
            (
                float(node.get("Resources", {}).get("CPU", 0))
                for node in self.ray.nodes()
                if node.get("Alive")
            ),
            default=0.0,
        )
        if self.options.cpus_per_task > largest:
            raise ValueError(
                f"--ray-cpus-per-task {self.options.cpus_per_task:g} is more than any node of the Ray "
                f"cluster has ({largest:g} CPUs): no task could start"
            )
        if config.shard_examples is not None:
            return config
        slots = max(int(self.cpus // self.options.cpus_per_task), 1)  # tasks the cluster runs at once
        size = shard_examples_for(n_train, slots, config.batch_size, self.options.shards_per_cpu)
        log.info("Ray build: %d CPUs, shards of %d examples (shard_examples)", self.cpus, size)
        return replace(config, shard_examples=size)

    def put_model(self, model: nn.Module) -> None:
        """Send the model (weights loaded, no hooks yet) to the object store once, for every task.

        Raises:
            ValueError: the model cannot be serialized (e.g. it holds a lock or an open file).
        """
        try:
            self._model = self.ray.put(model)
        except Exception as exc:  # cloudpickle raises TypeError, PicklingError, ... for what it cannot send
            raise ValueError(
                f"the model cannot be sent to Ray workers ({type(exc).__name__}: {exc}); its class must be "
                "importable on every node and its attributes serializable"
            ) from exc

    def featurize(
        self,
        split: str,
        data: Examples,
        *,
        output_fn: OutputFunction,
        config: IndexConfig,
        probe: Batch,
        projection: dict[str, Any],
        folder: Path,
        shard_rows: int,
        n_outputs: int,
        progress: bool,
    ) -> np.ndarray | None:
        """Featurize one split as Ray tasks, one per shard, into ``folder``; wait for all of them.

        Args:
            split: ``"train"`` or ``"query"``; data: its examples (a :class:`~indexer.data.Dataset` or a
                map-style :class:`~indexer.data.StreamedDataset`); output_fn, config, probe: as the build's;
            projection: the driver's projection record (``ProjectionInfo.to_json()``), which every task's must
                equal; folder: the build's work folder (on a path every node sees); shard_rows: examples per
                shard (:func:`~indexer.features.stream.shard_rows`); n_outputs: the model's output width;
            progress: show a progress bar over the split's examples.

        Returns:
            For the training split, the `(k, k)` float64 data term summed over the shards in order (None if a
            shard's features are beyond the stored dtype's range); for a query split, None.

        Raises:
            ValueError: data that cannot be split by index (an iterable dataset without a length), or a task
                that found bad data (the message is the task's, naming the examples).
            RuntimeError: a task failed otherwise, or its worker died more than ``max_retries`` times.
        """
        n = _length(data)
        if n == 0:
            self.outcomes[split] = []
            return None
        device = resolve_device(config.device)
        gpus = self.options.gpus_per_task
        gpus = (1.0 if device.type == "cuda" else 0.0) if gpus is None else gpus
        job = _Job(
            output_fn=output_fn,
            config=replace(config, device=Device.CUDA if device.type == "cuda" else Device.CPU),
            probe=_own_copy(probe),
            projection=projection,
            folder=str(Path(folder).resolve()),  # a worker may run in another directory
            split=split,
            n_outputs=n_outputs,
            torch_version=torch.__version__,
        )
        task = self.ray.remote(_featurize_shard).options(
            num_cpus=self.options.cpus_per_task,
            num_gpus=gpus,
            max_retries=self.options.max_retries,
            retry_exceptions=False,  # only a lost worker is retried; bad data fails the build at once
        )
        submitted = time.perf_counter()
        job_ref = self.ray.put(job)
        whole = None if isinstance(data, Dataset) else self.ray.put(data)
        pending: dict[Any, tuple[int, int, int]] = {}
        for buffer, start in enumerate(range(0, n, shard_rows)):
            stop = min(start + shard_rows, n)
            part = _slice(data, start, stop) if isinstance(data, Dataset) else whole
            ref = task.remote(job_ref, self._model, part, buffer, start, stop, time.time())
            pending[ref] = (buffer, start, stop)
        outcomes: dict[int, ShardOutcome] = {}
        description = f"featurize {split} on Ray ({self.cpus} CPUs)"
        with tqdm(total=n, desc=description, unit="ex", disable=not progress, leave=False) as bar:
            while pending:
                (ref,), _ = self.ray.wait(list(pending), num_returns=1)
                buffer, start, stop = pending.pop(ref)
                try:
                    outcome = self.ray.get(ref)
                except self.ray.exceptions.RayError as exc:
                    for other in pending:
                        self.ray.cancel(other, force=True)
                    raise _task_error(self.ray, exc, split, start, stop, self.options.max_retries) from exc
                outcomes[buffer] = outcome
                bar.update(outcome.rows)
        ordered = [outcomes[b] for b in sorted(outcomes)]
        self.outcomes[split], self.wall_s[split] = ordered, time.perf_counter() - submitted
        _log_outcomes(split, ordered, self.cpus)
        if split != SPLIT_TRAIN:
            return None
        total: np.ndarray | None = None
        for outcome in ordered:  # in shard order: the same additions as sharded_data_term's
            if outcome.term is None:
                return None
            total = outcome.term.copy() if total is None else total + outcome.term
        return total

    def timings(self) -> dict[str, float]:
        """The manifest's Ray timings: the tasks and CPUs (counts), seconds to connect, the tasks' wall time
        (first submission to last result) and span (first task's start to last task's end: the wall time
        less the workers' start-up) summed over the splits, and the mean queue time, setup and featurization
        per task (seconds)."""
        done = [o for outcomes in self.outcomes.values() for o in outcomes]
        if not done:
            return {}
        return {
            "ray_tasks": float(len(done)),
            "ray_cpus": float(self.cpus),
            "ray_connect": self.connect_s,
            "ray_tasks_wall": float(sum(self.wall_s.values())),
            "ray_tasks_span": float(
                sum(
                    max(o.finished for o in outcomes) - min(o.started for o in outcomes)
                    for outcomes in self.outcomes.values()
                    if outcomes
                )
            ),
            "ray_task_queued_mean": float(np.mean([o.queued_s for o in done])),
            "ray_task_setup_mean": float(np.mean([o.setup_s for o in done])),
            "ray_task_featurize_mean": float(np.mean([o.featurize_s for o in done])),
        }


def _length(data: Examples) -> int:
    """The number of examples, which a Ray build needs to split the data by index.

    Raises:
        ValueError: an iterable dataset (no ``__len__``/``__getitem__``).
    """
    if isinstance(data, Dataset):
        return len(data)
    try:
        n = len(data.source)
        data.source[0] if n else None
    except (TypeError, NotImplementedError) as exc:
        raise ValueError(
            "a Ray build splits the examples by index: give a Dataset or a map-style torch dataset (with "
            f"__len__ and __getitem__), not {type(data.source).__name__}"
        ) from exc
    return int(n)


def _own_copy(batch: Batch) -> Batch:
    """The batch with tensors of its own: a batch sliced from a dataset is a view, and serializing a view
    sends its whole storage (the dataset) with every task."""

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        return {key: copy(v) for key, v in value.items()} if isinstance(value, dict) else value

    return Batch(copy(batch.inputs), batch.targets.clone(), copy(batch.mask), list(batch.metadata))


def _slice(data: Dataset, start: int, stop: int) -> Dataset:
    """Examples ``[start, stop)`` as their own tensors (a view would send the whole storage)."""
    return Dataset(data.inputs[start:stop].clone(), data.targets[start:stop].clone())


def _task_error(
    ray: ModuleType, exc: Exception, split: str, start: int, stop: int, retries: int
) -> Exception:
    """The error a failed task becomes: the task's own ValueError, or a RuntimeError naming the shard."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, ValueError):
        return ValueError(str(cause))
    where = f"the Ray task of {split} examples {start}..{stop - 1}"
    if isinstance(exc, ray.exceptions.RayTaskError):
        return RuntimeError(f"{where} failed: {type(cause).__name__}: {cause}")
    return RuntimeError(f"{where} failed after {retries} retries: {type(exc).__name__}: {exc}")


def _log_outcomes(split: str, outcomes: list[ShardOutcome], cpus: int) -> None:
    log.info(
        "featurize %s on Ray: %d shard(s) (%d reused) by %d worker process(es) on %d CPUs; per task "
        "%.3f s queued, %.3f s setup, %.3f s featurizing (means)",
        split,
        len(outcomes),
        sum(o.reused for o in outcomes),
        len({o.pid for o in outcomes}),
        cpus,
        float(np.mean([o.queued_s for o in outcomes])),
        float(np.mean([o.setup_s for o in outcomes])),
        float(np.mean([o.featurize_s for o in outcomes])),
    )


CURRENT_CLUSTER_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
"""Where ``ray start`` records the address of the cluster this machine runs (what ``auto`` joins)."""


def _joined_address(address: str) -> str:
    """The ``HOST:PORT`` an address joins: ``auto`` is ``RAY_ADDRESS`` or the running cluster's record."""
    if address != "auto":
        return address
    try:
        return os.environ.get("RAY_ADDRESS") or CURRENT_CLUSTER_FILE.read_text().strip()
    except OSError:
        return address


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse at once a ``HOST:PORT`` address where nothing listens (Ray itself retries for a minute).

    Raises:
        ConnectionError: the TCP connection is refused or times out.
    """
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", a ray:// client address: Ray reports those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing listens at {address} ({exc})") from exc


@contextmanager
def ray_cluster(options: RayOptions) -> Iterator[RayCluster]:
    """Connect to (or start) the Ray cluster of ``options`` for one build.

    Ray already initialized in this process is used as it is and left running; otherwise ``"local"`` starts
    an instance bound to 127.0.0.1 and any other address joins that cluster; either is shut down afterwards
    (a joined cluster keeps running: only this process's connection ends).

    Yields:
        The :class:`RayCluster`.

    Raises:
        ImportError: Ray is not installed (the message says how to install it).
        ConnectionError: no Ray cluster answers at the address.
    """
    host = _joined_address(options.address).rpartition(":")[0].strip("[]")
    ray = import_ray(local=options.address == LOCAL or host in ("127.0.0.1", "localhost", "::1"))
    started = not ray.is_initialized()
    began = time.perf_counter()
    if options.workers is not None and (options.address != LOCAL or not started):
        log.warning("workers=%d sizes a Ray instance this build starts; ignored here", options.workers)
    if started:
        settings: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
        try:
            if options.address == LOCAL:
                # "local": a new instance even when a cluster runs on this machine (plain init joins it)
                ray.init(address="local", num_cpus=options.workers, **settings)
            else:
                _check_reachable(options.address)
                ray.init(address=options.address, **settings)
        except ConnectionError as exc:
            raise ConnectionError(f"no Ray cluster answers at {options.address!r}: {exc}") from exc
    try:
        yield RayCluster(ray, options, time.perf_counter() - began if started else 0.0)
    finally:
        if started:
            ray.shutdown()
