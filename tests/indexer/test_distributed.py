"""Ray builds (indexer.distributed, DESIGN.md 2.3) on a real local Ray cluster: the same files as a
single-process build, a worker killed mid-build, bad data, the optional extra, and the CLI joining a
running cluster."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import IterableDataset, TensorDataset

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset, StreamedDataset
from indexer.distributed import LOOPBACK_ENV, RayOptions, _own_copy, shard_examples_for
from indexer.enums import Direction, Score
from indexer.features import ClassificationMargin, LanguageModelMargin
from indexer.features.language import causal_lm_targets
from indexer.features.models import ModelSpec, build_model, save_checkpoint
from indexer.gp.surrogate import data_term, fit_surrogate, sharded_data_term
from indexer.store.layout import KEY_PHI_NORM, MANIFEST_FILE
from indexer.store.reader import load_index
from indexer.store.search import Searcher

os.environ.setdefault(LOOPBACK_ENV, "0")  # before Ray is imported: the test cluster listens on loopback only
ray = pytest.importorskip("ray", reason="the distributed extra (Ray) is not installed")

CPUS = 4
"""Task slots of the test cluster (four worker processes on this 2-core machine)."""

SPEC = ModelSpec("mlp", {"in_features": 64, "hidden": [32], "out_features": 10})
WAIT_S = 120.0
"""Bound on every wait for a build (each takes seconds)."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster of :data:`CPUS` CPUs in this process; yields its GCS address."""
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, configure_logging=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def _problem(n: int = 1000, n_query: int = 60) -> tuple[torch.nn.Module, Dataset, Dataset]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(n + n_query, 64, generator=generator)
    targets = torch.randint(0, 10, (n + n_query,), generator=generator)
    metadata = [{"row": i} for i in range(n + n_query)]
    torch.manual_seed(0)
    return (
        build_model(SPEC),
        Dataset(inputs[:n], targets[:n], metadata[:n]),
        Dataset(inputs[n:], targets[n:], metadata[n:]),
    )


def _files(index_dir: Path) -> dict[str, Any]:
    files: dict[str, Any] = json.loads((index_dir / MANIFEST_FILE).read_text())["files"]
    return files


def _manifest(index_dir: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((index_dir / MANIFEST_FILE).read_text())
    return manifest


def _build(out: Path, config: IndexConfig, ray_options: RayOptions | None, n: int = 1000) -> Path:
    model, train, queries = _problem(n)
    return build_index(
        model,
        ClassificationMargin(),
        train,
        out,
        queries=queries,
        model_spec=SPEC,
        config=config,
        progress=False,
        ray=ray_options,
    )


@contextlib.contextmanager
def _task_threads() -> Iterator[None]:
    """torch set to a Ray task's thread count meanwhile: its float32 products round differently with the
    number of threads on some CPUs (an AMX Xeon: 6e-5 on a dense projection), so a single-process build
    writes a Ray build's bytes only with the tasks' thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(RayOptions().cpus_per_task))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_process_build(out: Path, config: IndexConfig, n: int = 1000) -> Path:
    """The build without Ray, with a task's thread count (:func:`_task_threads`)."""
    with _task_threads():
        return _build(out, config, None, n)


def test_the_data_term_summed_by_shard_is_the_one_pass_sum() -> None:
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((1000, 12)).astype(np.float16)
    beta = rng.uniform(0, 0.25, 1000)
    direct = (phi.astype(np.float64) * beta[:, None]).T @ phi.astype(np.float64)
    for rows in (1, 7, 128, 1000, 5000):
        np.testing.assert_allclose(sharded_data_term(phi, beta, rows), direct, rtol=1e-12, atol=1e-12)
    # the blocks added in order are the same bits wherever each block is computed
    blocks = [data_term(phi[s : s + 128], beta[s : s + 128]) for s in range(0, 1000, 128)]
    total = np.zeros((12, 12))
    for block in blocks:
        total += block
    assert np.array_equal(total, sharded_data_term(phi, beta, 128))
    # and the surrogate fitted on a given sum is the one that sums it itself
    term = sharded_data_term(phi, beta, 128)
    given = fit_surrogate(phi, beta, np.zeros(1000), summed_data_term=term)
    computed = fit_surrogate(phi, beta, np.zeros(1000))
    np.testing.assert_allclose(given.cholesky, computed.cholesky, rtol=1e-12)
    with pytest.raises(ValueError, match=r"finite \(12, 12\) matrix"):
        fit_surrogate(phi, beta, np.zeros(1000), summed_data_term=np.zeros((3, 3)))


def test_the_probe_sent_with_every_task_is_not_a_view_of_the_data() -> None:
    data = Dataset(
        torch.rand(10_000, 64), torch.randint(0, 10, (10_000,)), [{"row": i} for i in range(10_000)]
    )
    probe = next(iter(data.batches(8)))
    assert len(ray.cloudpickle.dumps(probe)) > 10_000 * 64 * 4  # a view pickles its whole storage
    sent = _own_copy(probe)
    assert len(ray.cloudpickle.dumps(sent)) < 8 * 64 * 4 + 8 * 8 + 4096
    assert torch.equal(sent.inputs, probe.inputs) and torch.equal(sent.targets, probe.targets)
    assert list(sent.metadata) == [{"row": i} for i in range(8)]


def test_the_shard_size_gives_every_cpu_its_shards() -> None:
    assert shard_examples_for(20_000, 2, 128, 2) == 5_120  # 4 shards of whole batches: 3 x 5,120 + 4,640
    assert shard_examples_for(1_000, 4, 64, 2) == 128
    assert shard_examples_for(10, 8, 64, 2) == 64  # never less than one batch
    with pytest.raises(ValueError, match="workers must be positive"):
        RayOptions(workers=0)
    with pytest.raises(ValueError, match="'local', 'auto'"):
        RayOptions(address=" ")


@pytest.mark.slow
@pytest.mark.parametrize("projection", ["kronecker", "dense"])
def test_a_ray_build_writes_the_files_of_a_single_process_build(
    tmp_path: Path, cluster: str, projection: str
) -> None:
    config = IndexConfig(k=32, batch_size=64, shard_examples=128, projection=projection)
    single = _single_process_build(tmp_path / "single" / "mlp", config)
    on_ray = _build(tmp_path / "ray" / "mlp", config, RayOptions(address=cluster))
    assert _files(on_ray) == _files(single)  # every array, the FAISS-free index, metadata, checkpoint
    timings = _manifest(on_ray)["timings_seconds"]
    assert timings["ray_tasks"] == 8 + 1  # 1,000 training examples in shards of 128, and one query shard
    assert timings["ray_cpus"] == CPUS
    assert "ray_tasks" not in _manifest(single)["timings_seconds"]
    assert sorted(p.name for p in on_ray.parent.iterdir()) == ["mlp"]  # no work folder or lock left
    a, b = load_index(single), load_index(on_ray)
    assert np.array_equal(a.phi, b.phi) and a.n_train == 1000
    sa, sb = Searcher(a.surrogate, a.examples[KEY_PHI_NORM]), Searcher(b.surrogate, b.examples[KEY_PHI_NORM])
    for phi_q in np.asarray(a.query_phi[:5], dtype=np.float64):
        for score in Score:
            ta, tb = a.surrogate.query_terms(phi_q), b.surrogate.query_terms(phi_q)
            ranked = [s.rank(t, score, Direction.BOTH, 10, 10) for s, t in ((sa, ta), (sb, tb))]
            assert ranked[0].ids.tolist() == ranked[1].ids.tolist()
            assert np.array_equal(ranked[0].signed, ranked[1].signed)


@pytest.mark.slow
def test_a_ray_build_picks_its_shards_and_records_them(tmp_path: Path, cluster: str) -> None:
    on_ray = _build(tmp_path / "ray" / "mlp", IndexConfig(k=32, batch_size=64), RayOptions(address=cluster))
    manifest = _manifest(on_ray)
    # 1,000 examples for 4 CPUs, 2 shards each: shards of 128 (whole batches of 64)
    assert manifest["config"]["shard_examples"] == 128
    assert manifest["timings_seconds"]["ray_tasks"] == 8 + 1
    # the recorded size rebuilds the same files in one process
    single = _single_process_build(
        tmp_path / "single" / "mlp", IndexConfig(k=32, batch_size=64, shard_examples=128)
    )
    assert _files(single) == _files(on_ray)


@pytest.mark.slow
def test_streamed_and_language_model_data_on_ray(tmp_path: Path, cluster: str) -> None:
    model, train, _ = _problem(500)
    streamed = StreamedDataset(TensorDataset(train.inputs, train.targets))
    config = IndexConfig(k=16, batch_size=50, shard_examples=100)
    with _task_threads():
        paths = [
            build_index(
                model,
                ClassificationMargin(),
                streamed,
                tmp_path / where / "s",
                config=config,
                progress=False,
                ray=options,
            )
            for where, options in (("single", None), ("ray", RayOptions(address=cluster)))
        ]
    assert _files(paths[0]) == _files(paths[1])

    spec = ModelSpec("gpt", {"vocab_size": 40, "max_len": 12, "d_model": 16, "n_layer": 1})
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (120, 12), generator=generator)
    tokens = Dataset(ids, causal_lm_targets(ids))
    built = []
    for where, options in (("single", None), ("ray", RayOptions(address=cluster))):
        torch.manual_seed(0)
        with _task_threads():
            built.append(
                build_index(
                    build_model(spec),
                    LanguageModelMargin(40),
                    tokens,
                    tmp_path / where / "lm",
                    model_spec=spec,
                    config=IndexConfig(k=24, batch_size=20, shard_examples=40),
                    progress=False,
                    ray=options,
                )
            )
    assert _files(built[0]) == _files(built[1])
    assert _manifest(built[1])["timings_seconds"]["ray_tasks"] == 3


def _featurizing_workers() -> list[int]:
    """Pids of Ray worker processes running a featurization task (Ray titles them ``ray::<task>``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith(b"ray::_featurize_shard"):
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_build_leaves_the_index_as_it_would_be(tmp_path: Path, cluster: str) -> None:
    # the dense projection: shards of 128 examples that each take a noticeable time
    config = IndexConfig(k=32, batch_size=64, shard_examples=128, projection="dense")
    out = tmp_path / "ray" / "mlp"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _build(out, config, RayOptions(address=cluster), n=2400)
        except BaseException as exc:  # reported by the test below
            failure.append(exc)

    builder = threading.Thread(target=run)
    builder.start()
    victims: list[int] = []
    try:
        deadline = time.monotonic() + WAIT_S
        while not victims:
            assert builder.is_alive(), failure
            assert time.monotonic() < deadline, "no shard appeared in time"
            shards = list(out.parent.glob(".mlp.work-*/train-*.safetensors"))
            running = _featurizing_workers()
            if shards and running:  # one shard done, others being computed
                os.kill(running[0], signal.SIGKILL)
                victims.append(running[0])
            time.sleep(0.01)
        done_when_killed = len(list(out.parent.glob(".mlp.work-*/train-*.safetensors")))
    finally:
        builder.join(timeout=WAIT_S)
    assert not builder.is_alive() and not failure, failure
    assert done_when_killed < 19  # 2,400 examples: 19 training shards, most still to come
    with pytest.raises(ProcessLookupError):
        os.kill(victims[0], 0)
    reference = _single_process_build(tmp_path / "single" / "mlp", config, n=2400)
    assert _files(out) == _files(reference)


@pytest.mark.slow
def test_bad_data_fails_a_ray_build_with_the_example_named(tmp_path: Path, cluster: str) -> None:
    model, train, _ = _problem(500)
    inputs = train.inputs.clone()
    inputs[301, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^train example 301: its input holds NaN"):
        build_index(
            model,
            ClassificationMargin(),
            Dataset(inputs, train.targets),
            tmp_path / "bad",
            config=IndexConfig(k=16, batch_size=50, shard_examples=100),
            progress=False,
            ray=RayOptions(address=cluster),
        )
    assert not (tmp_path / "bad").exists()

    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            yield from zip(train.inputs, train.targets, strict=True)

    with pytest.raises(ValueError, match="a Ray build splits the examples by index"):  # before any task
        build_index(
            model,
            ClassificationMargin(),
            train,
            tmp_path / "queries",
            queries=StreamedDataset(Stream()),
            config=IndexConfig(k=16),
            progress=False,
            ray=RayOptions(address=cluster),
        )
    assert not list(tmp_path.glob(".queries.work-*"))
    with pytest.raises(ValueError, match=r"--ray-cpus-per-task 64 is more than any node .* \(4 CPUs\)"):
        build_index(
            model,
            ClassificationMargin(),
            train,
            tmp_path / "cpus",
            config=IndexConfig(k=16),
            progress=False,
            ray=RayOptions(address=cluster, cpus_per_task=64),
        )
    with pytest.raises(ValueError, match="a Ray build splits the examples by index"):
        build_index(
            model,
            ClassificationMargin(),
            StreamedDataset(Stream()),
            tmp_path / "stream",
            config=IndexConfig(k=16),
            progress=False,
            ray=RayOptions(address=cluster),
        )


def test_without_ray_the_build_says_how_to_install_it(
    tmp_path: Path, tiny_problem: tuple[torch.nn.Module, Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = tiny_problem
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra gives
    with pytest.raises(ImportError, match=r"pip install 'infotrace\[distributed\]'"):
        build_index(
            model,
            ClassificationMargin(),
            data,
            tmp_path / "idx",
            config=IndexConfig(k=8),
            progress=False,
            ray=RayOptions(),
        )
    assert not (tmp_path / "idx").exists()


@pytest.mark.slow
def test_the_cli_builds_on_a_running_cluster(tmp_path: Path, cluster: str) -> None:
    model, train, queries = _problem()
    checkpoint = tmp_path / "weights.safetensors"
    save_checkpoint(model, checkpoint)
    data = tmp_path / "data.safetensors"
    save_file(
        {
            "train_inputs": train.inputs,
            "train_targets": train.targets,
            "query_inputs": queries.inputs,
            "query_targets": queries.targets,
        },
        str(data),
    )
    cli = str(Path(sys.executable).with_name("infotrace-index"))
    common = [
        "build",
        "--model",
        "mlp",
        "--model-kwargs",
        json.dumps(SPEC.kwargs),
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
        "--k",
        "32",
        "--batch-size",
        "64",
    ]
    joined = subprocess.run(
        [cli, *common, "--out", str(tmp_path / "ray" / "mlp"), "--ray", cluster],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert joined.returncode == 0, joined.stderr
    assert "featurize train on Ray: 8 shard(s) (0 reused) by" in joined.stderr
    recorded = _manifest(tmp_path / "ray" / "mlp")["config"]["shard_examples"]
    assert recorded == 128
    single = subprocess.run(
        [cli, *common, "--out", str(tmp_path / "single" / "mlp"), "--shard-examples", str(recorded)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert single.returncode == 0, single.stderr
    assert _files(tmp_path / "ray" / "mlp") == _files(tmp_path / "single" / "mlp")
    # the cluster is still running for others: a joining build only disconnects
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == CPUS

    nowhere = subprocess.run(
        [cli, *common, "--out", str(tmp_path / "x" / "mlp"), "--ray", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert nowhere.returncode == 2 and "no Ray cluster answers at '127.0.0.1:1'" in nowhere.stderr
    stray = subprocess.run(
        [cli, *common, "--out", str(tmp_path / "y" / "mlp"), "--ray-workers", "2"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert stray.returncode == 2
    assert stray.stderr.strip() == "error: --ray-workers sizes a local Ray instance: give --ray local as well"


@pytest.mark.slow
def test_a_relative_output_folder_is_the_same_folder_for_the_workers(
    tmp_path: Path, cluster: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    workers_cwd = Path.cwd()  # where the test cluster's workers run
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="infotrace.indexer"):
        _build(
            Path("relative") / "mlp",
            IndexConfig(k=16, batch_size=64, shard_examples=256),
            RayOptions(address=cluster),
        )
    # every shard a task wrote was found by the driver: none computed twice, none written elsewhere
    assert "featurize train: 4 shard(s) reused, 0 computed" in caplog.text
    assert not list(workers_cwd.glob("relative/.mlp.work-*"))
    assert (tmp_path / "relative" / "mlp" / MANIFEST_FILE).is_file()


class _Noisy(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Inputs that change on every read (random augmentation): the driver's pass finds other data."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i] + 0.01 * torch.rand(self.inputs.shape[1]), self.targets[i]


@pytest.mark.slow
def test_data_that_change_between_reads_still_give_the_posterior_of_the_stored_features(
    tmp_path: Path, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    model, train, _ = _problem(600)
    config = IndexConfig(k=16, batch_size=50, shard_examples=100)
    with caplog.at_level(logging.INFO, logger="infotrace.indexer"):
        path = build_index(
            model,
            ClassificationMargin(),
            StreamedDataset(_Noisy(train.inputs, train.targets)),
            tmp_path / "noisy",
            config=config,
            progress=False,
            ray=RayOptions(address=cluster),
        )
    assert "the data term is recomputed" in caplog.text
    index = load_index(path)
    surrogate = index.surrogate
    term = sharded_data_term(np.asarray(index.phi), surrogate.beta, 100)
    precision = surrogate.cholesky @ surrogate.cholesky.T
    np.testing.assert_allclose(
        precision, surrogate.prior_precision * np.eye(surrogate.k) + term, rtol=1e-10, atol=1e-10 * term.max()
    )
