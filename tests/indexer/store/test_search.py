"""The one store and its retrieval (DESIGN.md 2.1): the exact scan of the stored features equals the
brute-force top-k of every score and direction, for float16 and float32 storage, at any scale of the
features and on the chunked float32 path; an approximate index's recorded recall is the recall recomputed;
knobs are checked; precomputed features round-trip; loading does not read the features into RAM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from indexer.cli import app
from indexer.config import IndexConfig
from indexer.enums import Direction, Score
from indexer.exceptions import IndexFormatError
from indexer.gp.scores import signed_score
from indexer.gp.surrogate import fit_surrogate
from indexer.precomputed import build_from_features
from indexer.store import search as search_module
from indexer.store.layout import FAISS_FILE, KEY_PHI_NORM, PHI_FILE
from indexer.store.reader import load_index
from indexer.store.records import row_norms
from indexer.store.search import (
    FeatureScan,
    RankRequest,
    Searcher,
    SearchKnobs,
    faster_half_kernel,
    information_gain_vectors,
    make_approximate_index,
    measure_recall,
    recall_queries,
    search_params,
    vector_scale,
)
from indexer.store.sections import FaissInfo


def brute_force(surrogate, phi_q: np.ndarray, score: Score, direction: Direction, top_k: int) -> list[int]:
    """The exact answer: every example scored in float64 by the surrogate, sorted (ties by id)."""
    terms = surrogate.query_terms(phi_q)
    signed = signed_score(score, surrogate.scores(terms))
    key = {Direction.PROPONENTS: signed, Direction.OPPONENTS: -signed, Direction.BOTH: np.abs(signed)}[
        direction
    ]
    eligible = {Direction.PROPONENTS: signed > 0, Direction.OPPONENTS: signed < 0}.get(
        direction, np.ones(len(signed), dtype=bool)
    )
    order = np.lexsort((np.arange(len(signed)), -key))
    return order[eligible[order]][:top_k].tolist()


def problem(n: int, k: int, dtype: str, scale: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, k)) * 2
    phi = (centres[rng.integers(0, 20, n)] + rng.standard_normal((n, k))) * scale
    phi[:5] = 0.0  # zero features score 0, never NaN (DESIGN.md 1.5)
    stored = phi.astype(dtype)
    margin = rng.standard_normal(n) * 3
    p = 1 / (1 + np.exp(-margin))
    surrogate = fit_surrogate(stored, p * (1 - p), 1 - p)
    queries = (centres[rng.integers(0, 20, 8)] + rng.standard_normal((8, k))) * scale
    return surrogate, row_norms(stored), queries


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_the_exact_scan_is_the_brute_force_top_k(dtype: str, scale: float) -> None:
    surrogate, norms, queries = problem(3000, 24, dtype, scale)
    searcher = Searcher(surrogate, norms)
    assert searcher.scan.mode == (faster_half_kernel(24) if dtype == "float16" else "float32")
    for phi_q in queries:
        terms = surrogate.query_terms(phi_q)
        for score in Score:
            for direction in Direction:
                # a shallow start (5) makes the scan deepen until its bound proves the answer
                found = searcher.rank(terms, score, direction, 10, 5)
                assert found.exact
                assert found.ids.tolist() == brute_force(surrogate, phi_q, score, direction, 10), (
                    score,
                    direction,
                )
                want = surrogate.scores(terms, found.ids)
                for s in Score:  # the same formulas; BLAS may sum another batch of rows in another order
                    np.testing.assert_allclose(found.scores[s], want[s], rtol=1e-12, atol=1e-300)


def test_the_chunked_float32_path_is_exact_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_module, "_UPCAST_BYTES", 64 * 16 * 4 + 4)  # blocks of 64 rows, the last of 16
    surrogate, norms, queries = problem(2000, 16, "float16")
    searcher = Searcher(surrogate, norms)
    searcher.scan.mode = "upcast"  # the path taken where the half-precision kernel breaks its error bound
    searcher.scan.relative, searcher.scan.absolute = 2.0**-23, 16 * 2.0**-23 + 2.0**-11
    for phi_q in queries[:3]:
        terms = surrogate.query_terms(phi_q)
        for score in Score:
            found = searcher.rank(terms, score, Direction.PROPONENTS, 7, 3)
            assert found.ids.tolist() == brute_force(surrogate, phi_q, score, Direction.PROPONENTS, 7)


@pytest.mark.parametrize("mode", ["half", "upcast"])
def test_the_scan_bound_holds_for_every_example(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(search_module._kernel_for_k, 64, mode)  # either kernel, whichever this CPU prefers
    surrogate, norms, queries = problem(5000, 64, "float16", scale=50.0)
    scan = FeatureScan(surrogate.phi, norms)
    assert scan.mode == mode
    for phi_q in queries:
        x, err = scan.inner(phi_q)
        exact = np.asarray(surrogate.phi, dtype=np.float64) @ phi_q
        assert np.all(np.abs(x.double().numpy() - exact) <= err.double().numpy())


def test_a_zero_query_scores_zero_everywhere() -> None:
    surrogate, norms, _ = problem(500, 8, "float16")
    found = Searcher(surrogate, norms).rank(
        surrogate.query_terms(np.zeros(8)), Score.INFLUENCE, Direction.BOTH, 5, 5
    )
    assert found.ids.tolist() == [0, 1, 2, 3, 4] and np.all(found.signed == 0)
    none = Searcher(surrogate, norms).rank(
        surrogate.query_terms(np.zeros(8)), Score.COSINE, Direction.PROPONENTS, 5, 5
    )
    assert len(none.ids) == 0


@pytest.mark.parametrize(
    ("factory", "knobs"), [("IVF16,Flat", SearchKnobs(nprobe=4)), ("HNSW16", SearchKnobs(ef_search=32))]
)
def test_recorded_recall_is_the_recall_recomputed(tmp_path: Path, factory: str, knobs: SearchKnobs) -> None:
    rng = np.random.default_rng(3)
    phi = rng.standard_normal((4000, 32)).astype(np.float32)
    query_phi = rng.standard_normal((30, 32)).astype(np.float32)
    out = build_from_features(
        phi,
        tmp_path / "approx",
        outputs=rng.standard_normal(4000),
        targets=rng.integers(0, 2, 4000),
        query_phi=query_phi,
        query_outputs=np.zeros(30),
        query_targets=np.zeros(30, dtype=np.int64),
        config=IndexConfig(
            faiss_factory=factory, recall_queries=40, nprobe=knobs.nprobe, ef_search=knobs.ef_search
        ),
    )
    index = load_index(out)
    info = index.manifest.faiss
    assert not info.exact and index.faiss_index is not None and info.recall_queries == 40
    norms = index.examples[KEY_PHI_NORM]
    exact = Searcher(index.surrogate, norms)
    approximate = Searcher(index.surrogate, norms, index.faiss_index, knobs)
    queries = recall_queries(index.surrogate, index.query_phi, 40)  # 30 stored queries + 10 training rows
    assert len(queries) == 40 and np.array_equal(queries[:30], index.query_phi.astype(np.float64))
    assert measure_recall(exact, approximate, queries, info.recall_candidates) == info.recall_at_10
    assert set(info.recall_at_10 or {}) == {s.value for s in Score}
    assert 0.5 < (info.recall_at_10 or {})["information_gain"] <= 1.0
    terms = index.surrogate.query_terms(queries[0])
    assert not approximate.rank(terms, Score.INFORMATION_GAIN, Direction.BOTH, 10, 100).exact


def test_product_quantisers_get_the_vectors_at_norm_one() -> None:
    """Information-gain vectors of norm ~0.004 (tau large against beta |phi|^2) on 70,000 examples: an IVF-PQ
    index trained on them as they are ranks its candidates worse than on the same vectors scaled by the
    build's power of two (:func:`vector_scale`; measured here 0.54 against 0.77 at 200 candidates; at
    N = 1,000,000, k = 512 with IVF1024,PQ64 the unscaled index was near random, 0.05). The scale is
    recorded, round-trips in the manifest and must be positive."""
    rng = np.random.default_rng(5)
    n, k = 70_000, 64
    centres = rng.standard_normal((64, k)) * 0.6
    phi = centres[rng.integers(0, 64, n)] + rng.standard_normal((n, k))
    p = np.full(n, 0.3)
    surrogate = fit_surrogate(phi.astype("float32"), p * (1 - p), 1 - p, prior_precision=1e6)
    z_norm = np.median(np.linalg.norm(information_gain_vectors(surrogate, slice(None)), axis=1))
    scale = vector_scale(surrogate)
    assert z_norm < 0.01 and scale == 2.0 ** round(-np.log2(z_norm))
    norms = row_norms(surrogate.phi)
    exact = Searcher(surrogate, norms)
    queries = (centres[rng.integers(0, 64, 30)] + rng.standard_normal((30, k))).astype("float32")
    recall = {}
    for factor in (1.0, scale):
        index = make_approximate_index(surrogate, "IVF16,PQ8", scale=factor)
        approximate = Searcher(surrogate, norms, index, SearchKnobs(nprobe=4))
        recall[factor] = measure_recall(exact, approximate, queries, 200)["information_gain"]
    assert recall[scale] > recall[1.0] + 0.1, recall
    info = FaissInfo(factory="IVF8,PQ16", vector_scale=scale)
    assert info.to_json()["vector_scale"] == scale and "vector_scale" not in FaissInfo("IVF8,PQ16").to_json()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(IndexFormatError, match="vector_scale must be positive and finite"):
            FaissInfo(factory="IVF8,PQ16", vector_scale=bad)


def test_knobs_are_checked_against_the_index_type() -> None:
    surrogate, _, _ = problem(600, 8, "float32")
    ivf = make_approximate_index(surrogate, "IVF4,Flat")
    hnsw = make_approximate_index(surrogate, "HNSW8")
    flat_sq = make_approximate_index(surrogate, "SQ8")
    assert search_params(ivf, SearchKnobs(nprobe=2)).nprobe == 2
    assert search_params(hnsw, SearchKnobs(ef_search=40)).efSearch == 40
    assert search_params(flat_sq, SearchKnobs()) is None
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes only"):
        search_params(hnsw, SearchKnobs(nprobe=2))
    with pytest.raises(ValueError, match="ef_search applies to HNSW indexes only"):
        search_params(ivf, SearchKnobs(ef_search=2))
    pre = make_approximate_index(surrogate, "PCA4,IVF4,Flat")
    wrapped = search_params(pre, SearchKnobs(nprobe=4))  # the IVF inside a pre-transform: every list
    assert isinstance(wrapped, faiss.SearchParametersPreTransform)
    probe = np.asarray(surrogate.phi[:3], dtype=np.float32)
    _, found = pre.search(probe, 5, params=wrapped)
    exhaustive = faiss.index_factory(4, "Flat", faiss.METRIC_INNER_PRODUCT)
    exhaustive.add(pre.chain.at(0).apply(information_gain_vectors(surrogate, slice(None))))
    assert found.tolist() == exhaustive.search(pre.chain.at(0).apply(probe), 5)[1].tolist()
    with pytest.raises(ValueError, match="cannot train 'IVF1024,Flat' on 600 vectors"):
        make_approximate_index(surrogate, "IVF1024,Flat")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_precomputed_features_round_trip(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    phi = rng.standard_normal((700, 40))
    outputs, targets = rng.standard_normal(700), rng.integers(0, 3, 700)
    out = build_from_features(
        phi, tmp_path / dtype, outputs=outputs, targets=targets, config=IndexConfig(feature_dtype=dtype, k=3)
    )
    index = load_index(out)
    assert index.phi.dtype == np.dtype(dtype) and isinstance(index.phi.base, np.memmap)  # a view of the map
    np.testing.assert_array_equal(index.phi, phi.astype(dtype))
    assert index.manifest.counts.k == 40 and index.manifest.model.spec is None and index.faiss_index is None
    refit = fit_surrogate(
        phi.astype(dtype), index.surrogate.beta, index.surrogate.grad_term
    )  # on stored values
    np.testing.assert_allclose(index.surrogate.cholesky, refit.cholesky, rtol=1e-12)
    np.testing.assert_allclose(index.surrogate.h, refit.h, rtol=1e-10)
    np.testing.assert_array_equal(index.examples["output"], outputs)
    assert index.metadata.get_one("train", 9)["label"] == int(targets[9])
    # the store: the features once plus 7 float64 per-example arrays and the SQLite row; no float64 copy
    per_example = sum(e.bytes for e in index.manifest.files.values()) / 700
    assert per_example <= 40 * np.dtype(dtype).itemsize + 7 * 8 + 120  # a small index: headers count


def test_float16_overflow_is_refused_with_the_remedy(tmp_path: Path) -> None:
    phi = np.ones((10, 4))
    phi[6, 2] = 1e6
    with pytest.raises(
        ValueError, match=r"train example 6: .* beyond float16's range .*feature_dtype='float32'"
    ):
        build_from_features(phi, tmp_path / "big", outputs=np.zeros(10), targets=np.zeros(10, dtype=np.int64))


def test_the_cli_builds_from_a_feature_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    np.savez(
        tmp_path / "f.npz",
        phi=rng.standard_normal((300, 16)).astype(np.float32),
        outputs=rng.standard_normal(300),
        targets=rng.integers(0, 2, 300),
        query_phi=rng.standard_normal((5, 16)).astype(np.float32),
        query_outputs=np.zeros(5),
        query_targets=np.zeros(5, dtype=np.int64),
    )
    shown = CliRunner().invoke(
        app, ["build-from-features", "--out", str(tmp_path / "cli"), "--features", str(tmp_path / "f.npz")]
    )
    assert shown.exit_code == 0, shown.output
    assert load_index(tmp_path / "cli").n_query == 5
    np.savez(tmp_path / "bad.npz", phi=np.zeros((3, 2)), outputs=np.zeros(3), labels=np.zeros(3))
    shown = CliRunner().invoke(
        app, ["build-from-features", "--out", str(tmp_path / "x"), "--features", str(tmp_path / "bad.npz")]
    )
    assert shown.exit_code == 2 and "unknown array(s) ['labels']" in shown.output


def _load_in_a_fresh_process(index_dir: Path, then: str = "", report: str = "") -> dict:
    """Load ``index_dir`` in a new interpreter: its RSS growth (``grown``, bytes) and, after running
    ``then``, the values of the JSON object body ``report``."""
    script = f"""
import json, sys
import numpy as np
from indexer.store.faiss_index import read_faiss_index
from indexer.store.reader import load_index
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
index = load_index({str(index_dir)!r})
after = rss()
{then}
print(json.dumps({{"grown": after - before, {report}}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_loading_maps_the_features_instead_of_reading_them(tmp_path: Path) -> None:
    """RSS after loading grows by far less than the features' size (measured in a fresh process)."""
    rng = np.random.default_rng(4)
    n, k = 120_000, 256  # 61 MB of float16 features
    out = build_from_features(
        rng.standard_normal((n, k), dtype=np.float32),
        tmp_path / "mapped",
        outputs=rng.standard_normal(n),
        targets=rng.integers(0, 2, n),
    )
    phi_bytes = (out / PHI_FILE).stat().st_size
    grown = _load_in_a_fresh_process(out)["grown"]
    assert grown < 0.25 * phi_bytes, (grown, phi_bytes)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16"])
def test_loading_maps_the_faiss_index_instead_of_reading_it(tmp_path: Path, factory: str) -> None:
    """An IVF index's lists and an HNSW index's vectors stay in the file (FAISS's mmap IO flags): RSS
    after loading grows by far less than the vectors' bytes, and the mapped index answers as one read
    whole."""
    rng = np.random.default_rng(5)
    n, k, m = 40_000, 128, 20  # a 20 MB FAISS file of float32 vectors
    out = build_from_features(
        rng.standard_normal((n, k), dtype=np.float32), tmp_path / "mapped",
        outputs=rng.standard_normal(n), targets=rng.integers(0, 2, n),
        query_phi=rng.standard_normal((m, k), dtype=np.float32), query_outputs=rng.standard_normal(m),
        query_targets=rng.integers(0, 2, m), config=IndexConfig(faiss_factory=factory, recall_queries=m),
    )  # fmt: skip
    faiss_bytes = (out / FAISS_FILE).stat().st_size
    then = f"""
queries = np.random.default_rng(6).standard_normal((5, {k})).astype(np.float32)
whole = read_faiss_index(index.path / "{FAISS_FILE}", {n}, {k}, {factory!r}, memory_map=False)
mapped_ids, whole_ids = index.faiss_index.search(queries, 10)[1], whole.search(queries, 10)[1]
"""
    if factory.startswith("IVF"):  # mapped lists, their per-search prefetch threads off
        then += """
import faiss
lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index.faiss_index).invlists)
prefetch = lists.prefetch_nthread if isinstance(lists, faiss.OnDiskInvertedLists) else -1
"""
    else:
        then += "prefetch = 0\n"
    report = '"same": bool(np.array_equal(mapped_ids, whole_ids)), "prefetch": prefetch'
    found = _load_in_a_fresh_process(out, then, report)
    assert found["prefetch"] == 0
    vector_bytes = n * k * 4  # HNSW's graph is read into RAM; the vectors of both stay in the file
    assert found["grown"] < faiss_bytes - vector_bytes + 0.2 * vector_bytes, (found, faiss_bytes)
    assert found["same"]


def test_the_scan_stops_early_where_no_unseen_example_can_qualify() -> None:
    """A newcomer review: these reranked all N examples in float64 (a client-triggerable cost)."""
    surrogate, norms, queries = problem(4000, 24, "float16")
    searcher = Searcher(surrogate, norms)
    zero = searcher.rank(surrogate.query_terms(np.zeros(24)), Score.INFLUENCE, Direction.PROPONENTS, 10, 20)
    assert len(zero.ids) == 0 and zero.depth == 20
    # proponents of the inner product for a query anti-correlated with every feature: none exist
    anti = surrogate.query_terms(-np.asarray(surrogate.phi, dtype=np.float64).mean(0))
    found = searcher.rank(anti, Score.INNER_PRODUCT, Direction.PROPONENTS, 10, 20)
    assert found.ids.tolist() == brute_force(
        surrogate, anti.phi, Score.INNER_PRODUCT, Direction.PROPONENTS, 10
    )
    for scale in (1e-30, 1e30):  # the scan takes b / |b|: neither underflows nor overflows float32
        phi_q = queries[0] * scale
        for score in Score:
            ranked = searcher.rank(surrogate.query_terms(phi_q), score, Direction.BOTH, 10, 20)
            assert ranked.ids.tolist() == brute_force(surrogate, phi_q, score, Direction.BOTH, 10), score
            assert ranked.depth < 4000


def test_float64_features_are_scanned_in_float64() -> None:
    surrogate, norms, queries = problem(800, 8, "float64")
    searcher = Searcher(surrogate, norms)
    assert searcher.scan.mode == "float64"
    found = searcher.rank(surrogate.query_terms(queries[1]), Score.COSINE, Direction.OPPONENTS, 5, 5)
    assert found.ids.tolist() == brute_force(surrogate, queries[1], Score.COSINE, Direction.OPPONENTS, 5)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_a_batch_ranks_each_query_as_it_ranks_alone(dtype: str) -> None:
    surrogate, norms, queries = problem(3000, 24, dtype, scale=3.0)
    searcher = Searcher(surrogate, norms)
    requests = [
        RankRequest(surrogate.query_terms(phi_q), score, direction, top_k, candidates)
        for phi_q in [*queries[:4], np.zeros(24)]
        for score in Score
        for direction in Direction
        for top_k, candidates in [(10, 5), (3, 200)]
    ]
    batch = searcher.rank_many(requests)
    assert len(batch) == len(requests)
    for r, many in zip(requests, batch, strict=True):
        one = searcher.rank(r.query, r.score, r.direction, r.top_k, r.candidates)
        assert many.ids.tolist() == one.ids.tolist() and many.exact
        for s in Score:  # the same float64 rerank of the same rows
            np.testing.assert_array_equal(many.scores[s], one.scores[s])
        np.testing.assert_array_equal(many.signed, one.signed)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_the_batched_scan_bound_holds_for_every_example(dtype: str) -> None:
    surrogate, norms, queries = problem(5000, 64, dtype, scale=50.0)
    units = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    x, err = FeatureScan(surrogate.phi, norms).inner_many(units)
    exact = units @ np.asarray(surrogate.phi, dtype=np.float64).T
    assert x.shape == (len(queries), 5000) and x.is_contiguous()
    assert np.all(np.abs(x.double().numpy() - exact) <= err.double().numpy())


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW16"])
def test_an_approximate_batch_searches_once_and_answers_each_query_alone(
    tmp_path: Path, factory: str
) -> None:
    rng = np.random.default_rng(5)
    phi = rng.standard_normal((3000, 16)).astype(np.float32)
    out = build_from_features(
        phi,
        tmp_path / "approx",
        outputs=rng.standard_normal(3000),
        targets=rng.integers(0, 2, 3000),
        config=IndexConfig(faiss_factory=factory, seed=0),
    )
    data = load_index(out)
    searcher = Searcher(data.surrogate, data.examples[KEY_PHI_NORM], data.faiss_index)
    requests = [
        RankRequest(data.surrogate.query_terms(q), score, Direction.BOTH, 5, depth)
        for q in rng.standard_normal((4, 16))
        for score in (Score.INFORMATION_GAIN, Score.INFLUENCE)
        for depth in (20, 80)  # two depths: one search each (an HNSW search depends on its k)
    ]
    for r, many in zip(requests, searcher.rank_many(requests), strict=True):
        one = searcher.rank(r.query, r.score, r.direction, r.top_k, r.candidates)
        assert not many.exact and many.depth == one.depth
        assert many.ids.tolist() == one.ids.tolist()
        np.testing.assert_array_equal(many.signed, one.signed)
