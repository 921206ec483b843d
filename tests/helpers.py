"""The tests' closeness checks (element-wise, and norm-wise for whole outputs and gradients) and the
low-precision error their bounds are built from."""
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


def rel_err(y, y_ref):
    """||y - y_ref|| / ||y_ref|| over the whole tensor, in float64 (the norm-wise criterion of the in-place
    acceleration: a whole output or gradient compared at once)."""
    y, y_ref = y.double(), y_ref.double()
    return ((y - y_ref).norm() / y_ref.norm()).item()


def assert_close_rel(y, y_ref, tol, what="output"):
    """``rel_err(y, y_ref) < tol``; on failure, where the largest difference is."""
    assert y.shape == y_ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(y_ref.shape)}"
    err = rel_err(y, y_ref)
    if not err < tol:
        diff = (y.double() - y_ref.double()).abs()
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{what}: relative error {err:.3e} >= {tol:.1e}; largest difference "
                             f"{diff.max().item():.3e} at {where}: {y[where].item()} vs {y_ref[where].item()}")


def assert_tensors_close(tensors, reference, tol, what):
    """Per name ||t - ref|| / ||ref||. Gradients that the math makes zero hold rounding noise only (the key
    bias: softmax ignores a shift shared by all keys; in train mode, a per-channel constant before the decode
    head's BatchNorm, which subtracts the batch mean): their norms are 1e-8 of the largest or less, with
    noise of that order, where real ones are above 1e-5 of it; the error is measured against at least 1e-3
    of the largest reference norm."""
    assert tensors.keys() == reference.keys()
    largest = max(r.double().norm() for r in reference.values() if r is not None)
    for name, ref in reference.items():
        t = tensors[name]
        assert (t is None) == (ref is None), f"{what} {name}: None on one side only"
        if ref is None:
            continue
        err = ((t.double() - ref.double()).norm() / max(ref.double().norm(), 1e-3 * largest)).item()
        assert err < tol, f"{what} {name}: relative error {err:.3e} >= {tol:.0e}"

def lowp_error(lowp, ref64):
    """``max |lowp - ref64|``: how far the reference computation itself lands from float64 when run in a low
    precision. Tests bound a low-precision result by a small multiple of it (as flash-attention's tests do)
    instead of a fixed tolerance."""
    return (lowp.detach().cpu().double() - ref64.detach().cpu().double()).abs().max().item()
