"""Group ``mlp-dwconv``: the middle of pvt_v2_b2's stage-1 MLP, GELU(depthwise 3x3 conv) on the fc1 output
(B, N, 512) laid out on the (res/4) x (res/4) grid.

- ``torch``: the official transpose -> depthwise conv -> transpose -> GELU (the reference op table);
- ``fused``: the fused op table.
"""
import pytest
import torch

from harness import DEVICE, DTYPE, cases, op_table, require_bytes, run_benchmark

HIDDEN = 512  # 64 channels x mlp ratio 8
CASES = cases(cpu=[(224, 1), (512, 1)], cuda=[(224, 64), (512, 16), (1024, 4), (2048, 1), (4096, 1)])
IMPLS = {"torch": "reference", "fused": "fused"}


@pytest.mark.benchmark(group="mlp-dwconv")
@pytest.mark.parametrize("resolution,batch", CASES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_mlp_dwconv(benchmark, impl, resolution, batch):
    side = resolution // 4
    tokens = side * side
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    tensor_bytes = batch * tokens * HIDDEN * itemsize
    ops = op_table(IMPLS[impl])
    require_bytes(5 * tensor_bytes, f"mlp dwconv at {resolution}x{resolution}, batch {batch}")
    new = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=DTYPE)  # noqa: E731
    weight, bias = new(HIDDEN, 1, 3, 3) * (2 / 9) ** 0.5, new(HIDDEN) * 0.1

    def dwconv_gelu(x):
        return ops.dwconv_gelu(x, side, side, weight, bias, False)

    with torch.no_grad():
        run_benchmark(benchmark, dwconv_gelu, lambda: (new(batch, tokens, HIDDEN),), impl=impl,
                      resolution=resolution, batch=batch, flops=2 * batch * tokens * HIDDEN * 9,
                      moved_bytes=2 * tensor_bytes)
