"""Where the fused ops' kernels may run, the late import of their modules, and how they meet autocast."""
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


def to_autocast_dtype(dtype, *args):
    """``args`` with every floating-point tensor cast to ``dtype`` (the default autocast cast)."""
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def register_autocast(op_name, op, cast=to_autocast_dtype):
    """Run ``op`` under autocast as ``op(*cast(dtype, *args))`` with autocast off, ``dtype`` being the autocast
    dtype in effect at call time (``torch.library.register_autocast`` would fix one dtype). ``cast`` decides
    which arguments change: the default casts every floating-point tensor; an op that reads an fp32 input
    and rounds it in its kernel keeps that input as it is."""
    for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
        def autocast_kernel(*args, _device_type=device_type):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch.autocast(_device_type, enabled=False):
                return op(*cast(dtype, *args))

        torch.library.impl(op_name, key, autocast_kernel)
