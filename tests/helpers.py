"""Small utilities shared by the tests."""
import torch


def rel_err(y, y_ref):
    """||y - y_ref|| / ||y_ref|| over the whole tensor, in float64."""
    y, y_ref = y.double(), y_ref.double()
    return ((y - y_ref).norm() / y_ref.norm()).item()


def assert_close_rel(y, y_ref, tol, what="output"):
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
