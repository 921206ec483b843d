"""Where the fused ops' Triton kernels may run, and the late import of their modules."""
import contextlib
import importlib
import os

import torch


def kernel_module(name, op, device):
    """``pvt_fast.kernels.<name>``, once it is clear the kernels can run on ``device``: CUDA, or the CPU with
    ``TRITON_INTERPRET=1`` (read at call time; the module is imported late because Triton reads that variable
    when the kernels are defined)."""
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return importlib.import_module(f"pvt_fast.kernels.{name}")
    raise RuntimeError(f"pvt_fast::{op} (backend='fused') needs CUDA tensors, or CPU tensors with "
                       f"TRITON_INTERPRET=1; got tensors on {device}. Use backend='sdpa' instead.")


def on_device(device):
    """Launch on ``device``'s current stream (a no-op context on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cast_under_autocast(op_name, op):
    """Run ``op`` in the autocast dtype in effect at call time: every floating-point tensor argument is cast
    to it, then the op runs with autocast off (``torch.library.register_autocast`` would fix one dtype)."""
    for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
        def autocast_kernel(*args, _device_type=device_type, **kwargs):
            dtype = torch.get_autocast_dtype(_device_type)
            args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            with torch.autocast(_device_type, enabled=False):
                return op(*args, **kwargs)

        torch.library.impl(op_name, key, autocast_kernel)
