"""Adding and removing training examples (DESIGN.md 2.1): the updated index equals a fresh build on the
resulting set (surrogate quantities to 1e-8 relative in float64, identical exact top-k); an interrupted
update leaves the old version intact; bad requests are refused."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer import update
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.demo.mnist import load_mnist_sample
from indexer.enums import Direction, Score
from indexer.exceptions import IndexCorruptError
from indexer.gp.leverage import LeverageColumn, OnDemandLeverage
from indexer.gp.surrogate import fit_surrogate
from indexer.precomputed import build_from_features
from indexer.segments import RowSegments
from indexer.store.faiss_index import read_faiss_index, shards_of
from indexer.store.layout import (
    FAISS_FILE,
    FAISS_TRAINED_FILE,
    KEY_PHI_NORM,
    PHI_FILE,
    faiss_shard_file,
    phi_segment_file,
)
from indexer.store.reader import load_index
from indexer.store.search import (
    FeatureScan,
    Searcher,
    SearchKnobs,
    SegmentedScan,
    information_gain_vectors,
    search_params,
)
from indexer.update import add_examples, add_features, remove_examples

K = 16


def synthetic(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal((n, K)).astype(np.float32)
    outputs = phi @ rng.standard_normal(K) + rng.standard_normal(n)
    return {"phi": phi, "outputs": outputs, "targets": (outputs > 0).astype(np.int64)}


def assert_same_index(updated: Path, fresh: Path) -> None:
    a, b = load_index(updated), load_index(fresh)
    assert a.n_train == b.n_train
    np.testing.assert_array_equal(a.phi, b.phi)
    np.testing.assert_allclose(a.surrogate.cholesky, b.surrogate.cholesky, rtol=1e-8, atol=1e-12)
    for key in ("beta", "grad_term", "phi_norm", "output", "label"):
        np.testing.assert_allclose(a.examples[key], b.examples[key], rtol=1e-8, atol=1e-300, err_msg=key)
    # h and s: the surrogate's exact values (an add keeps the stored ones as bounds: h above, s below)
    for key, exact in (("h", a.surrogate.h), ("s", a.surrogate.s)):
        np.testing.assert_allclose(exact[:], b.examples[key], rtol=1e-8, atol=1e-300, err_msg=key)
        np.testing.assert_allclose(np.asarray(exact), b.examples[key], rtol=1e-8, atol=1e-300, err_msg=key)
        rows = np.random.default_rng(3).choice(a.n_train, 50)  # rows in any order, repeated
        np.testing.assert_allclose(exact[rows], b.examples[key][rows], rtol=1e-8, err_msg=key)
    assert np.all(a.examples["h"] >= b.examples["h"] * (1 - 1e-12))
    assert np.all(a.examples["s"] <= b.examples["s"] * (1 + 1e-12))
    assert a.surrogate.n_clamped >= b.surrogate.n_clamped
    assert a.surrogate.prior_precision == b.surrogate.prior_precision
    assert [a.metadata.get_one("train", i) for i in range(0, a.n_train, 97)] == [
        b.metadata.get_one("train", i) for i in range(0, b.n_train, 97)
    ]
    sa, sb = Searcher(a.surrogate, a.examples[KEY_PHI_NORM]), Searcher(b.surrogate, b.examples[KEY_PHI_NORM])
    for phi_q in np.random.default_rng(9).standard_normal((5, K)):
        for score in Score:
            for direction in Direction:
                ta, tb = a.surrogate.query_terms(phi_q), b.surrogate.query_terms(phi_q)
                assert (
                    sa.rank(ta, score, direction, 10, 10).ids.tolist()
                    == sb.rank(tb, score, direction, 10, 10).ids.tolist()
                )


def test_add_then_remove_equals_fresh_builds(tmp_path: Path) -> None:
    full = synthetic(1200)
    first = {key: value[:1000] for key, value in full.items()}
    index = build_from_features(first.pop("phi"), tmp_path / "grown", **first)
    tau = load_index(index).surrogate.prior_precision
    add_features(index, full["phi"][1000:], outputs=full["outputs"][1000:], targets=full["targets"][1000:])
    fresh = build_from_features(
        full["phi"], tmp_path / "fresh", outputs=full["outputs"], targets=full["targets"],
        config=IndexConfig(prior_precision=tau),
    )  # fmt: skip
    assert_same_index(index, fresh)
    grown = load_index(index).manifest
    assert grown.extra["version"] == 2 and grown.extra["updates"][0]["op"] == "add"
    assert grown.surrogate.prior_precision_source == "mean_eigenvalue"  # tau stays the recorded value

    removed = [3, 17, 500, 1100, 1199]
    remove_examples(index, removed)
    keep = np.setdiff1d(np.arange(1200), removed)
    fresh_kept = build_from_features(
        full["phi"][keep],
        tmp_path / "fresh-kept",
        outputs=full["outputs"][keep],
        targets=full["targets"][keep],
        config=IndexConfig(prior_precision=tau),
    )
    assert_same_index(index, fresh_kept)
    assert load_index(index).manifest.extra["version"] == 3


def test_an_approximate_index_gets_the_new_vectors_and_its_recall_again(tmp_path: Path) -> None:
    data = synthetic(3000, seed=1)
    config = IndexConfig(faiss_factory="IVF8,Flat", nprobe=2, recall_queries=30)
    index = build_from_features(
        data["phi"][:2500], tmp_path / "ivf", outputs=data["outputs"][:2500], targets=data["targets"][:2500],
        config=config,
    )  # fmt: skip
    add_features(index, data["phi"][2500:], outputs=data["outputs"][2500:], targets=data["targets"][2500:])
    grown = load_index(index)
    assert grown.faiss_index is not None and grown.faiss_index.ntotal == 3000
    assert set(grown.manifest.faiss.recall_at_10 or {}) == {s.value for s in Score}
    remove_examples(index, list(range(0, 3000, 3)))
    shrunk = load_index(index)
    assert shrunk.faiss_index is not None and shrunk.faiss_index.ntotal == 2000 == shrunk.n_train


@pytest.mark.parametrize("factory", ["IVF8,Flat", "OPQ8,IVF8,PQ8"])
def test_adds_fill_faiss_shards_that_answer_as_one_index(
    tmp_path: Path, factory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each add writes a shard of the new vectors only (the earlier files linked, not rewritten); the merged
    shards return what one index trained alike and holding every vector returns; the fourth shard refills
    the index as one file, and a removal does too."""
    monkeypatch.setattr(update, "MAX_FAISS_SHARDS", 3)
    data = synthetic(3000, seed=2)
    config = IndexConfig(faiss_factory=factory, nprobe=3, recall_queries=30)
    index = build_from_features(
        data["phi"][:2400], tmp_path / "ivf", outputs=data["outputs"][:2400], targets=data["targets"][:2400],
        config=config,
    )  # fmt: skip
    first_inode = (index / FAISS_FILE).stat().st_ino
    for lo, hi in ((2400, 2600), (2600, 2700)):
        add_features(
            index, data["phi"][lo:hi], outputs=data["outputs"][lo:hi], targets=data["targets"][lo:hi]
        )
    grown = load_index(index)
    assert grown.manifest.faiss.shards == [2400, 200, 100]
    assert (index / FAISS_FILE).stat().st_ino == first_inode  # linked: the build's file, unchanged
    assert [shard.ntotal for shard in shards_of(grown.faiss_index)] == [2400, 200, 100]
    # one index from the same trained copy holding every vector in order
    whole = read_faiss_index(index / FAISS_TRAINED_FILE, 0, grown.k, factory, memory_map=False)
    whole.add(information_gain_vectors(grown.surrogate, slice(0, 2700), grown.manifest.faiss.vector_scale))
    queries = np.random.default_rng(3).standard_normal((40, grown.k)).astype(np.float32)
    params = search_params(whole, SearchKnobs(nprobe=3))
    np.testing.assert_array_equal(
        grown.faiss_index.search(queries, 20, params=params)[1], whole.search(queries, 20, params=params)[1]
    )
    searcher = Searcher(
        grown.surrogate, grown.examples[KEY_PHI_NORM], grown.faiss_index, SearchKnobs(nprobe=3)
    )
    found = searcher.rank(
        grown.surrogate.query_terms(queries[0]), Score.INFORMATION_GAIN, Direction.BOTH, 5, 50
    )
    assert len(found.ids) == 5 and not found.exact
    add_features(index, data["phi"][2700:], outputs=data["outputs"][2700:], targets=data["targets"][2700:])
    compacted = load_index(index)
    assert compacted.manifest.faiss.shards is None and compacted.faiss_index.ntotal == 3000
    assert not (index / faiss_shard_file(1)).exists()
    remove_examples(index, [0, 5, 2999])
    shrunk = load_index(index)
    assert shrunk.manifest.faiss.shards is None and shrunk.faiss_index.ntotal == 2997


def test_a_damaged_faiss_shard_is_named(tmp_path: Path) -> None:
    data = synthetic(1000, seed=4)
    index = build_from_features(
        data["phi"][:900], tmp_path / "ivf", outputs=data["outputs"][:900], targets=data["targets"][:900],
        config=IndexConfig(faiss_factory="IVF4,Flat", recall_queries=10),
    )  # fmt: skip
    add_features(index, data["phi"][900:], outputs=data["outputs"][900:], targets=data["targets"][900:])
    shard = index / faiss_shard_file(1)
    damaged = bytearray(shard.read_bytes())
    damaged[-8] ^= 0xFF
    shard.chmod(0o644)
    shard.write_bytes(bytes(damaged))
    with pytest.raises(IndexCorruptError, match=faiss_shard_file(1)):
        load_index(index)


def test_a_model_index_adds_examples_featurized_with_its_own_model(tmp_path: Path, index_root: Path) -> None:
    shutil.copytree(index_root / "digits", tmp_path / "digits")
    before = load_index(tmp_path / "digits")
    _, test = load_mnist_sample(n_train=4000, seed=0)
    new = Dataset(test.inputs[100:160], test.targets[100:160], test.metadata[100:160], test.image_shape)
    add_examples(tmp_path / "digits", new)
    after = load_index(tmp_path / "digits")
    assert after.n_train == before.n_train + 60 and after.inputs is not None
    np.testing.assert_array_equal(after.inputs[-60:], new.inputs.numpy())
    np.testing.assert_array_equal(after.phi[: before.n_train], before.phi)
    # the added features are the index's own: a stored query with the same input has the same feature
    stored = load_index(index_root / "digits")
    same = Dataset(test.inputs[:1], test.targets[:1])
    add_examples(tmp_path / "digits", same)
    np.testing.assert_allclose(load_index(tmp_path / "digits").phi[-1], stored.query_phi[0], rtol=2**-10)
    # the surrogate equals a refit on the stored values with the recorded tau
    final = load_index(tmp_path / "digits")
    refit = fit_surrogate(
        final.phi, final.surrogate.beta, final.surrogate.grad_term, final.surrogate.prior_precision
    )
    np.testing.assert_allclose(final.surrogate.cholesky, refit.cholesky, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(final.surrogate.h, refit.h, rtol=1e-8)
    assert final.metadata.get_one("train", final.n_train - 2)["label"] == int(test.targets[159])


def test_bad_updates_are_refused(tmp_path: Path) -> None:
    data = synthetic(50)
    index = build_from_features(data.pop("phi"), tmp_path / "small", **data)
    with pytest.raises(ValueError, match="valid ids are 0..49"):
        remove_examples(index, [50])
    with pytest.raises(ValueError, match="distinct"):
        remove_examples(index, [1, 1])
    with pytest.raises(ValueError, match="cannot remove every training example"):
        remove_examples(index, list(range(50)))
    with pytest.raises(ValueError, match=r"added features must have shape \(m, 16\)"):
        add_features(index, np.zeros((2, 3)), outputs=np.zeros(2), targets=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="has no model"):
        add_examples(index, Dataset(np.zeros((2, 16), dtype=np.float32), np.zeros(2, dtype=np.int64)))
    assert load_index(index).manifest.extra.get("version") is None  # nothing was written


def test_a_killed_update_leaves_the_old_version_intact(tmp_path: Path) -> None:
    data = synthetic(300_000, seed=2)
    index = build_from_features(
        data["phi"][:250_000],
        tmp_path / "big",
        outputs=data["outputs"][:250_000],
        targets=data["targets"][:250_000],
    )
    np.savez(tmp_path / "new.npz", **{key: value[250_000:] for key, value in data.items()})
    script = f"""
import numpy as np
from indexer.update import add_features
new = np.load({str(tmp_path / "new.npz")!r})
add_features({str(index)!r}, new["phi"], outputs=new["outputs"], targets=new["targets"])
print("done", flush=True)
"""
    outcomes = set()
    for delay in (0.5, 1.5, 3.0, 6.0):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        loaded = load_index(index)  # every checksum verified: the old version or a complete new one
        assert loaded.n_train in (250_000, 300_000, 350_000, 400_000, 450_000)
        outcomes.add(loaded.n_train)
    assert 250_000 in outcomes  # at least one kill landed before the switch
    # what a killed update left beside the index is cleared by the next one, which finishes
    add_features(index, data["phi"][:10], outputs=data["outputs"][:10], targets=data["targets"][:10])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".big.")]
    assert leftovers == [], leftovers


def test_the_cli_adds_and_removes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from indexer.cli import app

    data = synthetic(120, seed=5)
    index = build_from_features(
        data["phi"][:100], tmp_path / "cli", outputs=data["outputs"][:100], targets=data["targets"][:100]
    )
    np.savez(tmp_path / "more.npz", **{key: value[100:] for key, value in data.items()})
    runner = CliRunner()
    shown = runner.invoke(
        app, ["add-features", "--index", str(index), "--features", str(tmp_path / "more.npz")]
    )
    assert shown.exit_code == 0 and "now holds 120" in shown.output, shown.output
    shown = runner.invoke(app, ["remove", "--index", str(index), "--ids", "0, 5,119"])
    assert shown.exit_code == 0 and "now holds 117" in shown.output, shown.output
    shown = runner.invoke(app, ["remove", "--index", str(index), "--ids", "1,x"])
    assert shown.exit_code == 2 and "comma-separated non-negative integers" in shown.output
    shown = runner.invoke(app, ["remove", "--index", str(index), "--ids", "117"])
    assert shown.exit_code == 2 and "valid ids are 0..116" in shown.output
    assert load_index(index).n_train == 117


def test_an_index_of_format_1_is_updated_into_todays_layout(tmp_path: Path) -> None:
    """A newcomer review: the new version kept format_version 1 with format-2 files, and could not load."""
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-v1"
    shutil.copytree(fixture, tmp_path / "tiny-v1")
    old = load_index(tmp_path / "tiny-v1")
    assert old.manifest.format_version == 1
    remove_examples(tmp_path / "tiny-v1", [0, 5])
    new = load_index(tmp_path / "tiny-v1")
    assert new.manifest.format_version == 2 and new.n_train == old.n_train - 2 and new.manifest.faiss.exact
    keep = np.setdiff1d(np.arange(old.n_train), [0, 5])
    np.testing.assert_array_equal(new.phi, old.phi[keep])
    refit = fit_surrogate(new.phi, new.surrogate.beta, new.surrogate.grad_term, old.surrogate.prior_precision)
    np.testing.assert_allclose(new.surrogate.h, refit.h, rtol=1e-8)


def test_an_add_writes_only_what_it_adds(tmp_path: Path) -> None:
    """The old features stay in their file (a hard link into the new version, its checksum still verified);
    the new rows go to a segment of their own; h and s of the old rows are kept as bounds."""
    data = synthetic(700, seed=6)
    index = build_from_features(
        data["phi"][:600], tmp_path / "seg", outputs=data["outputs"][:600], targets=data["targets"][:600]
    )
    before = (index / PHI_FILE).resolve()
    inode = before.stat().st_ino
    add_features(index, data["phi"][600:], outputs=data["outputs"][600:], targets=data["targets"][600:])
    grown = load_index(index)
    assert grown.manifest.counts.phi_segments == [600, 100]
    assert grown.manifest.surrogate.leverage_bounds
    assert (index / PHI_FILE).resolve().stat().st_ino == inode  # the same file, not a copy
    assert (index / phi_segment_file(1)).exists()
    np.testing.assert_array_equal(np.asarray(grown.phi), data["phi"].astype(np.float16))
    # the linked file is still checked: altering it (in place, so every version that links it) is named
    with open(index / PHI_FILE, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x3c\x00\x3c")
    with pytest.raises(IndexCorruptError, match=PHI_FILE):
        load_index(index)


def test_many_adds_compact_the_segments_and_equal_a_fresh_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(update, "MAX_PHI_SEGMENTS", 3)
    data = synthetic(900, seed=7)
    index = build_from_features(
        data["phi"][:500], tmp_path / "many", outputs=data["outputs"][:500], targets=data["targets"][:500]
    )
    tau = load_index(index).surrogate.prior_precision
    seen = []
    for start in range(500, 900, 100):
        rows = slice(start, start + 100)
        add_features(index, data["phi"][rows], outputs=data["outputs"][rows], targets=data["targets"][rows])
        seen.append(load_index(index).manifest.counts.phi_segments)
    assert seen == [[500, 100], [500, 100, 100], None, [800, 100]]  # the third add compacted into one file
    fresh = build_from_features(
        data["phi"], tmp_path / "fresh", outputs=data["outputs"], targets=data["targets"],
        config=IndexConfig(prior_precision=tau),
    )  # fmt: skip
    assert_same_index(index, fresh)


def test_on_demand_leverage_equals_brute_force() -> None:
    rng = np.random.default_rng(8)
    phi = rng.standard_normal((300, 6)).astype(np.float16)
    beta = rng.uniform(0.05, 0.25, 300)
    precision = np.eye(6) * 2.0 + (phi.astype(np.float64).T * beta) @ phi.astype(np.float64)
    cholesky = np.linalg.cholesky(precision)
    h = np.einsum("nk,kj,nj->n", phi.astype(np.float64), np.linalg.inv(precision), phi.astype(np.float64))
    s = np.maximum(1 - beta * h, 1e-3)
    leverage = OnDemandLeverage(cholesky, RowSegments([phi[:100], phi[100:]]), beta, h + 1, s / 2, 1e-3)
    h_col, s_col = LeverageColumn(leverage, "h"), LeverageColumn(leverage, "s")
    rows = np.array([299, 0, 150, 150, 7])
    np.testing.assert_allclose(h_col[rows], h[rows], rtol=1e-10)
    np.testing.assert_allclose(s_col[rows], s[rows], rtol=1e-10)
    assert s_col[5] == pytest.approx(s[5], rel=1e-10) and isinstance(s_col[5], float)
    np.testing.assert_allclose(np.asarray(h_col), h, rtol=1e-10)
    np.testing.assert_allclose(s_col[10:20], s[10:20], rtol=1e-10)
    np.testing.assert_array_equal(h_col.bound, h + 1)
    np.testing.assert_array_equal(s_col.bound, s / 2)
    assert leverage.n_clamped() == int(np.sum(1 - beta * h < 1e-3)) and h_col.shape == (300,)
    with pytest.raises(ValueError, match="one row per example"):
        OnDemandLeverage(cholesky, phi[:10], beta, h, s, 1e-3)
    with pytest.raises(ValueError, match="'h' or 's'"):
        LeverageColumn(leverage, "x")


def test_a_segmented_scan_equals_the_whole_scan() -> None:
    rng = np.random.default_rng(10)
    phi = rng.standard_normal((1000, K)).astype(np.float16)
    norm = np.linalg.norm(phi.astype(np.float64), axis=1)
    whole, parts = (
        FeatureScan(phi, norm),
        SegmentedScan(RowSegments([phi[:300], phi[300:301], phi[301:]]), norm),
    )
    b = rng.standard_normal(K)
    exact = phi.astype(np.float64) @ b
    for x, err in (whole.inner(b), parts.inner(b)):
        assert np.all(np.abs(x.numpy() - exact) <= err.numpy())  # each within its error bound
    many = rng.standard_normal((4, K))
    exact_many = many @ phi.astype(np.float64).T
    for x, err in (whole.inner_many(many), parts.inner_many(many)):
        assert x.shape == (4, 1000) and np.all(np.abs(x.numpy() - exact_many) <= err.numpy())
