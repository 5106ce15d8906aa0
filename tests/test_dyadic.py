import numpy as np
import pytest

from dyadiq.dyadic import dyadic, requantize


@pytest.mark.parametrize("real", [1e-6, 0.0123, 0.5, 0.999, 1.0, 3.75, 1234.5])
def test_dyadic_is_close_and_in_range(real):
    m, k = dyadic(real)
    assert 0 <= m[0] < 2**31 and 0 <= k[0] <= 31
    assert abs(m[0] / 2.0 ** k[0] - real) <= 0.5 / 2.0 ** k[0] + 1e-18


def test_dyadic_zero_and_negative():
    m, _ = dyadic(0.0)
    assert m[0] == 0
    with pytest.raises(ValueError):
        dyadic(-1.0)


def test_requantize_rounds_half_up_with_floor_shift():
    acc = np.array([5, 6, 7, -5, -6, -7, 0], np.int64)
    # multiplier 1/4 exactly: m = 1, k = 2; x/4 rounded half up: 1.25->1, 1.5->2, 1.75->2,
    # -1.25->-1, -1.5->-1 (half up), -1.75->-2
    np.testing.assert_array_equal(requantize(acc, 1, 2), [1, 2, 2, -1, -1, -2, 0])


def test_requantize_matches_exact_rational_rounding():
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**31) + 1, 2**31 - 1, size=10_000)
    m, k = dyadic(0.000731)
    got = requantize(acc, m, k)
    # exact: floor(acc*m/2^k + 1/2) with Python integers
    want = np.array([(int(a) * int(m[0]) + (1 << (int(k[0]) - 1))) >> int(k[0]) for a in acc])
    np.testing.assert_array_equal(got, want)


def test_per_channel_broadcast():
    acc = np.arange(12, dtype=np.int64).reshape(1, 3, 2, 2) * 100
    m, k = dyadic(np.array([0.5, 0.25, 1.0]))
    out = requantize(acc, m.reshape(1, 3, 1, 1), k.reshape(1, 3, 1, 1))
    np.testing.assert_array_equal(out[0, 0], np.round(acc[0, 0] * 0.5 + 1e-9))
    np.testing.assert_array_equal(out[0, 2], acc[0, 2])
