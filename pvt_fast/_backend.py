"""Which implementation a model runs, decided once when the model is built.

``reference`` is the official eager math op for op; ``sdpa`` uses PyTorch ops with
``scaled_dot_product_attention`` and layout-free views; ``fused`` runs the Triton kernels and the CUDA
patch embedding. ``auto`` picks ``fused`` only on a CUDA device whose architecture is in
:data:`FUSED_VERIFIED` (the fused suite and ``python -m pvt_fast check`` passed there on real hardware),
and ``sdpa`` everywhere else; the ``PVT_FAST_BACKEND`` environment variable overrides that choice.
"""
import os

import torch

BACKENDS = ("reference", "sdpa", "fused")
ENV_VAR = "PVT_FAST_BACKEND"

# Compute capability -> the recorded GPU run (under benchmarks/results/) in which the fused test suite and
# ``python -m pvt_fast check`` passed on that architecture. Empty until such a run is recorded: no fused
# kernel has run on a GPU yet, so ``auto`` resolves to ``sdpa`` on CUDA too; ``backend="fused"`` or
# ``PVT_FAST_BACKEND=fused`` opts in.
FUSED_VERIFIED = {}


def _check_name(name, source):
    if name not in BACKENDS + ("auto",):
        valid = ", ".join(repr(b) for b in ("auto",) + BACKENDS)
        raise ValueError(f"{source} must be one of {valid}, got {name!r}")


def fused_verified():
    """Whether the current CUDA device's architecture is one the fused kernels have passed on."""
    return torch.cuda.is_available() and tuple(torch.cuda.get_device_capability()) in FUSED_VERIFIED


def resolve_backend(backend="auto"):
    """Turn ``backend`` (``"auto"``, ``"reference"``, ``"sdpa"`` or ``"fused"``) into a concrete name."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    _check_name(backend, "backend")
    if backend != "auto":
        return backend
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        _check_name(override, ENV_VAR)
        if override != "auto":
            return override
    return "fused" if fused_verified() else "sdpa"
