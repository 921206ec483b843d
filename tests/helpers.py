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
