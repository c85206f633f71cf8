"""Resumable builds (indexer.store.shards): a build killed with SIGKILL and started again writes the same
files."""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import indexer.store.shards as shards
from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.features.featurize import BufferFeatures
from indexer.features.models import ModelSpec, build_model
from indexer.features.stream import batch_digest
from indexer.features.tasks import ClassificationMargin
from indexer.store.layout import MANIFEST_FILE
from indexer.store.reader import load_index
from indexer.store.shards import build_lock

CHILD_TIMEOUT_S = 120.0
"""Bound on every wait for a child build (each takes a few seconds)."""

N_TRAIN_SHARDS = 5  # 320 training examples in buffers of 64 (see CHILD)

CHILD = r'''
"""A real, deterministic index build, run as a child process: ``python child.py INDEX_DIR``.

Imported (not run) by the test, ``build`` makes the uninterrupted reference in-process.
RESUME_TEST_PAUSE_S, read here only and never by the library, makes the build pause after each shard it
writes, so that the test can kill it part-way.
"""
import logging
import os
import sys
import time

import torch

import indexer.store.shards as shards
from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.features.models import ModelSpec, build_model
from indexer.features.tasks import ClassificationMargin

SPEC = ModelSpec("mlp", {"in_features": 64, "hidden": [32], "out_features": 10})
N_PARAMS = 64 * 32 + 32 + 32 * 10 + 10


def build(out):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(360, 64, generator=generator)
    targets = torch.randint(0, 10, (360,), generator=generator)
    metadata = [{"row": i} for i in range(360)]
    train = Dataset(inputs[:320], targets[:320], metadata[:320])
    queries = Dataset(inputs[320:], targets[320:], metadata[320:])
    torch.manual_seed(0)
    build_index(
        build_model(SPEC),  # random but seeded weights
        ClassificationMargin(),
        train,
        out,
        queries=queries,
        model_spec=SPEC,
        # buffers of 64 examples: 5 training shards and 1 query shard
        config=IndexConfig(k=32, seed=0, batch_size=32, buffer_bytes=4 * N_PARAMS * 64, projection="dense"),
        progress=False,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    pause = float(os.environ.get("RESUME_TEST_PAUSE_S", "0"))
    if pause:
        save = shards.SplitShards.save

        def slow_save(self, buffer, features, digest):
            save(self, buffer, features, digest)
            time.sleep(pause)

        shards.SplitShards.save = slow_save
    build(sys.argv[1])
'''

REUSE_LOG = re.compile(
    r"featurize (?P<split>\w+): (?P<reused>\d+) shard\(s\) reused, (?P<computed>\d+) computed "
    r"\((?P<corrupt>\d+) corrupt recomputed\)"
)


def _start(script: Path, out: Path, log_file: Path, pause_s: float = 0.0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RESUME_TEST_PAUSE_S": str(pause_s)}
    with open(log_file, "wb") as log:
        return subprocess.Popen([sys.executable, str(script), str(out)], stdout=log, stderr=log, env=env)


def _finish(child: subprocess.Popen[bytes], log_file: Path) -> str:
    """Wait for a child build to succeed; its log."""
    try:
        child.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    text = log_file.read_text()
    assert child.returncode == 0, text
    return text


def _reuse_counts(log_text: str) -> dict[str, dict[str, int]]:
    return {
        m["split"]: {key: int(m[key]) for key in ("reused", "computed", "corrupt")}
        for m in REUSE_LOG.finditer(log_text)
    }


def _files(index_dir: Path) -> dict[str, dict[str, object]]:
    files: dict[str, dict[str, object]] = json.loads((index_dir / MANIFEST_FILE).read_text())["files"]
    return files


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_files(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    reference, resumed = tmp_path / "reference" / "mlp", tmp_path / "resumed" / "mlp"

    # first attempt: SIGKILL once at least two shards are on disk, while the build is still featurizing
    victim = _start(script, resumed, tmp_path / "killed.log", pause_s=1.0)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while len(list(resumed.parent.glob(".mlp.work-*/train-*.safetensors"))) < 2:
            assert victim.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no shard appeared in time"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=10)
    assert victim.returncode == -signal.SIGKILL
    assert not resumed.exists()
    (work,) = resumed.parent.glob(".mlp.work-*")
    done = sorted(work.glob("train-*.safetensors"))
    assert 2 <= len(done) < N_TRAIN_SHARDS
    assert not list(work.glob("query-*.safetensors"))

    # a shard whose bytes no longer match its checksum is computed again, never trusted
    corrupted = bytearray(done[0].read_bytes())
    corrupted[-1] ^= 0xFF
    done[0].write_bytes(bytes(corrupted))

    log_text = _finish(_start(script, resumed, tmp_path / "resumed.log"), tmp_path / "resumed.log")
    runpy.run_path(str(script))["build"](reference)  # uninterrupted, in this process
    assert _reuse_counts(log_text) == {
        "train": {"reused": len(done) - 1, "computed": N_TRAIN_SHARDS - len(done) + 1, "corrupt": 1},
        "query": {"reused": 0, "computed": 1, "corrupt": 0},
    }
    assert _files(resumed) == _files(reference)
    assert len(_files(resumed)) == 23  # one .npy per per-example array
    assert sorted(p.name for p in resumed.parent.iterdir()) == ["mlp"]  # no work, temp or lock file
    loaded = load_index(resumed)
    assert loaded.n_train == 320 and loaded.metadata.get_one("query", 3)["row"] == 323


class Interrupted(Exception):
    """Stands in for a kill in the in-process tests."""


def _tiny_problem(n: int = 40) -> tuple[torch.nn.Module, Dataset]:
    torch.manual_seed(1)
    model = build_model(ModelSpec("mlp", {"in_features": 6, "hidden": [5], "out_features": 3}))
    return model, Dataset(torch.randn(n, 6), torch.randint(0, 3, (n,)))


# the dense projection of 53 parameters: buffers of 16 examples, 3 shards of the 40 examples
TINY = IndexConfig(k=8, batch_size=8, buffer_bytes=4 * 53 * 16, projection="dense")


def _interrupt_after_first_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    save = shards.SplitShards.save

    def save_then_stop(self: shards.SplitShards, buffer: int, features: BufferFeatures, digest: str) -> None:
        save(self, buffer, features, digest)
        raise Interrupted

    monkeypatch.setattr(shards.SplitShards, "save", save_then_stop)


def test_other_arguments_never_reuse_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="infotrace.indexer")
    model, data = _tiny_problem()
    out = tmp_path / "tiny"
    variants = {
        "base": (model, data, TINY),
        "seed": (
            model,
            data,
            IndexConfig(k=8, seed=1, batch_size=8, buffer_bytes=TINY.buffer_bytes, projection="dense"),
        ),
        "k": (
            model,
            data,
            IndexConfig(k=9, batch_size=8, buffer_bytes=TINY.buffer_bytes, projection="dense"),
        ),
        "batch": (
            model,
            data,
            IndexConfig(k=8, batch_size=4, buffer_bytes=TINY.buffer_bytes, projection="dense"),
        ),
        "buffer": (
            model,
            data,
            IndexConfig(k=8, batch_size=8, buffer_bytes=TINY.buffer_bytes * 2, projection="dense"),
        ),
        "targets": (model, Dataset(data.inputs, (data.targets + 1) % 3), TINY),
        "inputs": (model, Dataset(data.inputs * 2, data.targets), TINY),
        "weights": (_nudged(_tiny_problem()[0]), data, TINY),
    }
    folders: dict[str, Path] = {}
    with monkeypatch.context() as patch:
        _interrupt_after_first_shard(patch)
        for label, (net, dataset, config) in variants.items():
            with pytest.raises(Interrupted):
                build_index(net, ClassificationMargin(), dataset, out, config=config, progress=False)
            new = set(tmp_path.glob(".tiny.work-*")) - set(folders.values())
            assert len(new) == 1, f"{label}: shards went into an existing work folder"
            folders[label] = new.pop()
    assert not out.exists()
    assert all(len(list(f.glob("train-*.safetensors"))) == 1 for f in folders.values())

    caplog.clear()
    build_index(model, ClassificationMargin(), data, out, config=TINY, progress=False)
    assert "featurize train: 1 shard(s) reused, 2 computed (0 corrupt recomputed)" in caplog.text
    assert caplog.text.count("with other arguments; not reused") == len(variants) - 1
    assert not folders["base"].exists()
    assert all(folders[label].exists() for label in variants if label != "base")
    uninterrupted = build_index(
        model, ClassificationMargin(), data, tmp_path / "x" / "tiny", config=TINY, progress=False
    )
    assert _files(out) == _files(uninterrupted)


def _nudged(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        next(iter(model.parameters())).add_(1e-3)
    return model


def test_corrupt_shard_of_wrong_layout_is_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A shard whose checksum matches but whose arrays do not fit the buffer is not trusted either."""
    caplog.set_level(logging.INFO, logger="infotrace.indexer")
    model, data = _tiny_problem()
    out = tmp_path / "tiny"
    with monkeypatch.context() as patch:
        _interrupt_after_first_shard(patch)
        with pytest.raises(Interrupted):
            build_index(model, ClassificationMargin(), data, out, config=TINY, progress=False)
    (work,) = tmp_path.glob(".tiny.work-*")
    (shard,) = work.glob("train-000000-*.safetensors")
    shard.unlink()
    first_buffer = batch_digest(list(data.batches(TINY.batch_size))[:2])  # the right data, the wrong rows
    shards.SplitShards(work, "train").save(
        0,
        BufferFeatures(
            np.zeros((3, 8), np.float32), np.zeros(3), np.zeros((3, 3), np.float32), np.zeros(3), np.zeros(3)
        ),
        first_buffer,
    )
    build_index(model, ClassificationMargin(), data, out, config=TINY, progress=False)
    assert "featurize train: 0 shard(s) reused, 3 computed (1 corrupt recomputed)" in caplog.text
    reference = build_index(
        model, ClassificationMargin(), data, tmp_path / "ref" / "tiny", config=TINY, progress=False
    )
    assert _files(out) == _files(reference)


def test_concurrent_build_of_the_same_index_is_refused(tmp_path: Path) -> None:
    model, data = _tiny_problem()
    out = tmp_path / "tiny"
    with build_lock(out) as lock:
        assert lock.exists()
        with pytest.raises(BlockingIOError, match="another process is building the index"):
            build_index(model, ClassificationMargin(), data, out, config=TINY, progress=False)
    assert not lock.exists()
    build_index(model, ClassificationMargin(), data, out, config=TINY, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_leftovers_of_killed_writes_are_removed(tmp_path: Path) -> None:
    model, data = _tiny_problem()
    out = tmp_path / "tiny"
    for leftover in (".tiny.tmp-0badf00d", ".tiny.old-0badf00d"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "phi.npy").write_bytes(b"half written")
    (tmp_path / ".other.tmp-0badf00d").mkdir()  # another index's: not ours to remove
    build_index(model, ClassificationMargin(), data, out, config=TINY, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-0badf00d", "tiny"]


def test_an_interrupted_kronecker_build_resumes_to_the_same_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The default projection: buffers of whole batches whose features fit buffer_bytes, resumed as dense."""
    model, data = _tiny_problem()
    config = IndexConfig(k=8, batch_size=8, buffer_bytes=4 * 8 * 16)  # 16 examples of 8 features a buffer
    reference = build_index(
        model, ClassificationMargin(), data, tmp_path / "ref" / "tiny", config=config, progress=False
    )
    out = tmp_path / "resumed" / "tiny"
    with monkeypatch.context() as patch:
        _interrupt_after_first_shard(patch)
        with pytest.raises(Interrupted):
            build_index(model, ClassificationMargin(), data, out, config=config, progress=False)
    with caplog.at_level(logging.INFO, logger="infotrace.indexer"):
        build_index(model, ClassificationMargin(), data, out, config=config, progress=False)
    assert "featurize train: 1 shard(s) reused, 2 computed (0 corrupt recomputed)" in caplog.text
    assert _files(out) == _files(reference)
    assert load_index(out).manifest.projection.kind == "kronecker"


def test_a_shard_of_other_data_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Each shard records the sha256 of its buffer's data: a streamed source that changed between attempts
    (same work key) never gets another buffer's features."""
    caplog.set_level(logging.INFO, logger="infotrace.indexer")
    model, data = _tiny_problem()
    out = tmp_path / "tiny"
    with monkeypatch.context() as patch:
        _interrupt_after_first_shard(patch)
        with pytest.raises(Interrupted):
            build_index(model, ClassificationMargin(), data, out, config=TINY, progress=False)
    (work,) = tmp_path.glob(".tiny.work-*")
    (shard,) = work.glob("train-000000-*.safetensors")
    features = shards.SplitShards(work, "train").load(0, 16, batch_digest(list(data.batches(8))[:2]))
    assert features is not None  # the shard is valid for its own data
    assert shards.SplitShards(work, "train").load(0, 16, "0" * 64) is None  # and for no other
    assert not shard.exists()  # refused shards are deleted
