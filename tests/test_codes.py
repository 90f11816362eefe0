"""cellmorph.codes: block-wise factorizing gives pandas' codes in narrow types."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellmorph.codes as codes_mod
from cellmorph.codes import factorize, narrowest_signed, where


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(codes_mod, "BLOCK", 7)  # many blocks, values first seen in later ones


@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize(
    "values",
    [
        pd.Series(["P2", "P10", None, "P1", "P2", "P10", "P3"] * 5 + ["P0"], dtype="string"),
        pd.Series(["b", "a", np.nan, "c", "a"] * 4, dtype=object),
        pd.Series([5, 3, 5, 9, 3, 1, 1, 7, 5, 2] * 3),
        pd.Series(pd.array(["x", "y", None, "x"] * 6, dtype="string[pyarrow]")),
    ],
)
def test_codes_and_uniques_are_those_of_pandas(values, sort):
    codes, uniques = factorize(values, sort=sort)
    expect_codes, expect_uniques = pd.factorize(values, sort=sort)
    np.testing.assert_array_equal(codes, expect_codes)
    assert [str(u) for u in uniques] == [str(u) for u in expect_uniques]
    assert codes.dtype == np.int8


def test_the_type_widens_with_the_number_of_values():
    assert narrowest_signed(127) is np.int8 and narrowest_signed(128) is np.int16
    assert narrowest_signed(40_000) is np.int32 and narrowest_signed(2**40) is np.int64
    codes, uniques = factorize(pd.Series(np.arange(300) % 200), sort=True)
    assert codes.dtype == np.int16 and len(uniques) == 200


def test_where_is_flatnonzero_of_the_masks_in_int32():
    rng = np.random.default_rng(0)
    a, b = rng.random(100) < 0.5, rng.random(100) < 0.5
    np.testing.assert_array_equal(where(a), np.flatnonzero(a))
    np.testing.assert_array_equal(where(a, b, ~a | b), np.flatnonzero(a & b))
    assert where(a).dtype == np.int32 and len(where(np.zeros(0, bool))) == 0


def test_bincount_a_block_at_a_time_is_numpys():
    from cellmorph.codes import bincount

    v = np.random.default_rng(1).integers(0, 9, 100).astype(np.int8)
    np.testing.assert_array_equal(bincount(v), np.bincount(v))
    np.testing.assert_array_equal(bincount(v, minlength=20), np.bincount(v, minlength=20))
    assert len(bincount(np.zeros(0, np.int8), minlength=3)) == 3


def test_repeat_a_block_at_a_time_is_numpys():
    from cellmorph.codes import repeat

    rng = np.random.default_rng(2)
    v = rng.integers(0, 1000, 100).astype(np.int32)
    counts = rng.integers(0, 5, 100).astype(np.uint8)
    got = repeat(v, counts)
    np.testing.assert_array_equal(got, np.repeat(v, counts))
    assert got.dtype == np.int32 and len(repeat(v[:0], counts[:0])) == 0
    with pytest.raises(ValueError, match="3 counts for 100 values"):
        repeat(v, counts[:3])
