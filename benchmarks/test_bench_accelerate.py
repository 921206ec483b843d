"""Group ``accelerate``: models users already have, plain and accelerated in place by ``pvt_fast.accelerate``
(default backend: fused on CUDA, sdpa on CPU), same weights, ``model(x)`` under no_grad:

- ``timm`` / ``timm-accelerated``: timm's pvt_v2_b2;
- ``hf-segformer`` / ``hf-segformer-accelerated``: Hugging Face ``SegformerForSemanticSegmentation`` with the
  MiT-b2 encoder, decoder 768, 150 labels.

``flops`` is the plain model's count (torch's FlopCounterMode, one forward) for both, so ``tflops`` of the
accelerated model is an effective rate (its folded decode head does about a tenth of the plain head's work).
"""
import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness import DEVICE, DTYPE, cases, op_table, require_bytes, run_benchmark
import pvt_fast
from pvt_fast.hosts.zoo import host_pair

HOSTS = {"timm": "timm:pvt_v2_b2", "hf-segformer": "hf-segformer-b2"}
IMPLS = [impl for host in HOSTS for impl in (host, f"{host}-accelerated")]
CASES = cases(cpu=[(224, 1), (224, 8)], cuda=[(512, 16), (1024, 4), (2048, 1)])
DECODER, MLP_HIDDEN = 768, 8 * 64  # SegFormer-b2's decoder width; timm b2's widest stage-1 MLP


def _bytes_needed(resolution, batch):
    """A rough upper estimate: the weights (< 30 M parameters) plus the larger of the plain decode head's
    maps at a quarter of the resolution (4 upsampled, their concat, the fused map) and a stage-1 MLP's
    three activations."""
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    quarter = batch * (resolution // 4) ** 2
    return (30_000_000 + max(9 * DECODER, 3 * MLP_HIDDEN) * quarter) * itemsize


@functools.lru_cache(maxsize=None)
def _models(host):
    """``(accelerated, plain)`` on the benchmark device and dtype, built once per host."""
    accelerated, plain = host_pair(HOSTS[host])
    return accelerated.to(DEVICE, DTYPE), plain.to(DEVICE, DTYPE)


@functools.lru_cache(maxsize=None)
def _flops(host, resolution, batch):
    """The plain model's FLOPs at this size."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _models(host)[1](torch.zeros(batch, 3, resolution, resolution, device=DEVICE, dtype=DTYPE))
    return counter.get_total_flops()


@pytest.mark.benchmark(group="accelerate")
@pytest.mark.parametrize("resolution,batch", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_accelerate(benchmark, impl, resolution, batch):
    require_bytes(_bytes_needed(resolution, batch), f"{impl} at {resolution}x{resolution}, batch {batch}")
    if pvt_fast.resolve_backend("auto") == "fused":
        op_table("fused")  # on CPU (PVT_FAST_BACKEND=fused) skips: fused kernels are timed on CUDA only
    host = impl.removesuffix("-accelerated")
    accelerated, plain = _models(host)
    model = accelerated if impl.endswith("-accelerated") else plain

    def forward(x):
        return model(x)

    def inputs():
        return (torch.randn(batch, 3, resolution, resolution, device=DEVICE, dtype=DTYPE),)

    with torch.no_grad():
        run_benchmark(benchmark, forward, inputs, impl=impl, resolution=resolution, batch=batch,
                      model=HOSTS[host], flops=_flops(host, resolution, batch))
