"""Group ``mlp-dwconv``: the middle of pvt_v2_b2's stage-1 MLP, GELU(depthwise 3x3 conv) on the fc1 output
(B, N, 512) laid out on the (res/4) x (res/4) grid.

- ``torch``: the official transpose -> depthwise conv -> transpose -> GELU (the reference op table);
- ``fused``: the fused op table.
"""
import pytest
import torch

from harness import ITEMSIZE, OP_CASES, OP_IMPLS, op_table, random_tensor, require_bytes, run_benchmark

HIDDEN = 512  # 64 channels x mlp ratio 8


@pytest.mark.benchmark(group="mlp-dwconv")
@pytest.mark.parametrize("resolution,batch", OP_CASES)
@pytest.mark.parametrize("impl", list(OP_IMPLS))
def test_mlp_dwconv(benchmark, impl, resolution, batch):
    side = resolution // 4
    tokens = side * side
    tensor_bytes = batch * tokens * HIDDEN * ITEMSIZE
    ops = op_table(OP_IMPLS[impl])
    require_bytes(5 * tensor_bytes, f"mlp dwconv at {resolution}x{resolution}, batch {batch}")
    weight, bias = random_tensor(HIDDEN, 1, 3, 3, scale=(2 / 9) ** 0.5), random_tensor(HIDDEN, scale=0.1)

    def dwconv_gelu(x):
        return ops.dwconv_gelu(x, side, side, weight, bias, False)

    with torch.no_grad():
        run_benchmark(benchmark, dwconv_gelu, lambda: (random_tensor(batch, tokens, HIDDEN),), impl=impl,
                      resolution=resolution, batch=batch, flops=2 * batch * tokens * HIDDEN * 9,
                      moved_bytes=2 * tensor_bytes)
