"""Facts every kernel module shares: Triton's names for the dtypes, the fp32 dot precision, the SM count of a
device, and the last-dim-stride-1 view the kernels read tensors through."""
import functools

import torch

# torch dtype -> Triton type string (signatures of the ahead-of-time specs).
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dot_inputs(dtype):
    """What ``tl.dot`` multiplies for tensors of ``dtype``: ``"16-bit"`` (fp16/bf16 on tensor cores), or fp32 as
    ``"tf32"`` (tensor cores) or ``"ieee"`` (exact fp32 FMAs). fp32 follows PyTorch's float32 matmul
    precision, read at call time: "highest" means ieee, "high" and "medium" allow tf32."""
    if dtype != torch.float32:
        return "16-bit"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def input_precision(dot):
    """``tl.dot``'s ``input_precision`` for :func:`dot_inputs`' answer (16-bit operands ignore it)."""
    return "tf32" if dot == "tf32" else "ieee"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device):
    """Streaming multiprocessors of ``device`` (1 for the CPU, where the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def unit_last_stride(t):
    """``t`` itself when its last dimension has stride 1 (the kernels take every other stride), else a
    contiguous copy. Empty tensors and a last dimension of size 1 need no copy."""
    if t.numel() == 0 or t.shape[-1] == 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()
