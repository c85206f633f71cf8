"""RowSegments: several row files read as one array, against numpy's concatenation (DESIGN.md 2.1)."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.segments import RowSegments, concatenated


def _parts() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((n, 3)).astype(np.float16) for n in (5, 0, 7, 1)]


@pytest.mark.parametrize(
    "rows",
    [
        slice(None),
        slice(2, 9),
        slice(5, 12),
        slice(0, 0),
        slice(11, 3),
        slice(1, 13, 3),
        slice(None, None, -2),
        np.array([12, 0, 5, 5, 6, 11]),
        np.array([-1, -13]),
        np.array([], dtype=np.int64),
        np.arange(13) % 2 == 0,
        [3, 4],
    ],
)
def test_rows_equal_the_concatenation(rows) -> None:
    parts = _parts()
    whole = np.concatenate(parts)
    seg = RowSegments(parts)
    assert seg.shape == whole.shape and len(seg) == 13 and seg.dtype == np.float16 and seg.ndim == 2
    np.testing.assert_array_equal(seg[rows], whole[rows])
    np.testing.assert_array_equal(seg[rows, 1], whole[rows, 1])


def test_single_rows_whole_arrays_and_errors() -> None:
    parts = _parts()
    whole = np.concatenate(parts)
    seg = RowSegments(parts)
    for i in (0, 4, 5, 11, 12, -1, -13):
        np.testing.assert_array_equal(seg[i], whole[i])
    assert seg[6, 2] == whole[6, 2]
    np.testing.assert_array_equal(np.asarray(seg), whole)
    np.testing.assert_array_equal(np.asarray(seg, dtype=np.float64), whole.astype(np.float64))
    assert seg.astype(np.float32).dtype == np.float32 and seg.nbytes == whole.nbytes
    with pytest.raises(IndexError):
        seg[13]
    with pytest.raises(IndexError):
        seg[np.array([0, 13])]
    with pytest.raises(ValueError, match="at least one"):
        RowSegments([])
    with pytest.raises(ValueError, match="share dtype"):
        RowSegments([parts[0], parts[2].astype(np.float32)])
    assert concatenated(parts[:1]) is parts[0] and isinstance(concatenated(parts), RowSegments)
