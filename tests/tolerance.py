"""Tolerances that follow the arithmetic (STYLE.md §7): fp32 results computed in another order differ by a few ulps,
and by how many depends on the CPU (AVX2 vs AVX-512 kernels block reductions differently). Compare fp32 values in
units of fp32 rounding relative to their magnitude, never with an absolute tolerance tighter than that; keep exact
comparisons for what must be bit-identical (resume, a copy, the same kernel on the same shapes)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FP32_EPS = float(np.finfo(np.float32).eps)  # 2^-23: one ulp at 1.0
DEFAULT_ULPS = 64


def fp32_tolerance(
    reference: npt.ArrayLike, *, ulps: float = DEFAULT_ULPS, scale: float = 1.0
) -> np.ndarray:
    """Allowed |actual - reference|: `ulps` fp32 roundings of max(|reference|, scale), elementwise.

    `scale` is the magnitude of the operands the value was computed from (a log-prob near 0 is a difference of
    logits and log-normalisers of size ~`scale`, so its rounding error is relative to those, not to itself)."""
    magnitude = np.maximum(np.abs(np.asarray(reference, dtype=np.float64)), scale)
    return ulps * FP32_EPS * magnitude


def assert_fp32_close(
    actual: npt.ArrayLike,
    expected: npt.ArrayLike,
    *,
    ulps: float = DEFAULT_ULPS,
    scale: float = 1.0,
    equal_nan: bool = False,
) -> None:
    """Assert two fp32 computations of the same values agree to `ulps` roundings (see `fp32_tolerance`).

    -inf must match -inf exactly, NaN matches NaN only with `equal_nan`."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_array_equal(
        np.isneginf(actual), np.isneginf(expected), err_msg="-inf differs"
    )
    np.testing.assert_array_equal(
        np.isposinf(actual), np.isposinf(expected), err_msg="+inf differs"
    )
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    if equal_nan:
        np.testing.assert_array_equal(nan_a, nan_e, err_msg="NaN differs")
    else:
        assert not nan_a.any() and not nan_e.any(), "unexpected NaN"
    finite = np.isfinite(expected)
    error = np.abs(actual[finite] - expected[finite])
    allowed = fp32_tolerance(expected[finite], ulps=ulps, scale=scale)
    bad = error > allowed
    if bad.any():
        worst = int(np.argmax(error / allowed))
        raise AssertionError(
            f"{int(bad.sum())} of {error.size} values differ by more than {ulps} fp32 ulps: worst "
            f"{actual[finite][worst]!r} vs {expected[finite][worst]!r} (|Δ| {error[worst]:.3g}, "
            f"allowed {allowed[worst]:.3g})"
        )
