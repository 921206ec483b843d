"""The tests' one closeness check, and the low-precision error its bounds are built from."""
import torch


def assert_close(actual, expected, *, atol=0.0, rtol=0.0, atol_of_max=0.0, what="output"):
    """Every element within ``atol + atol_of_max * max|expected| + rtol * |expected|`` of ``expected``, in
    float64; NaN or inf in ``actual`` fails (an element a kernel never wrote, if outputs were poisoned).

    ``atol_of_max`` is a tolerance relative to the tensor's scale (fine for outputs with elements near zero);
    a bound derived from the reference's own low-precision error goes in ``atol`` (see :func:`lowp_error`).
    On failure: how many elements are off, the first one's index and values, and the largest error.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    err = (actual - expected).abs()
    bound = atol + atol_of_max * expected.abs().max().item() + rtol * expected.abs()
    bad = ~(err <= bound)  # NaN is bad
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        bound_there = bound if isinstance(bound, float) else bound[where].item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at {where}: got "
            f"{actual[where].item():.8g}, expected {expected[where].item():.8g} (bound {bound_there:.3g}); "
            f"largest error {err.nan_to_num(float('inf')).max().item():.3g}")


def lowp_error(lowp, ref64):
    """``max |lowp - ref64|``: how far the reference computation itself lands from float64 when run in a low
    precision. Tests bound a low-precision result by a small multiple of it (as flash-attention's tests do)
    instead of a fixed tolerance."""
    return (lowp.detach().cpu().double() - ref64.detach().cpu().double()).abs().max().item()
