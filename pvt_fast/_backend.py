"""Which implementation a model runs, decided once when the model is built.

``reference`` is the official eager math op for op; ``sdpa`` uses PyTorch ops with
``scaled_dot_product_attention`` and layout-free views; ``fused`` runs the Triton kernels and the CUDA
patch embedding; ``auto`` picks ``fused`` when CUDA is available and ``sdpa`` otherwise, and the
``PVT_FAST_BACKEND`` environment variable overrides that choice.
"""
import os

import torch

BACKENDS = ("reference", "sdpa", "fused")
ENV_VAR = "PVT_FAST_BACKEND"


def _check_name(name, source):
    if name not in BACKENDS + ("auto",):
        valid = ", ".join(repr(b) for b in ("auto",) + BACKENDS)
        raise ValueError(f"{source} must be one of {valid}, got {name!r}")


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
    return "fused" if torch.cuda.is_available() else "sdpa"
