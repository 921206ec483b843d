"""Group ``sra-attention``: one attention layer of pvt_v2_b2's stage 1 (C=64, 1 head, sr 8) from its
input tokens x and queries q, N = (res/4)^2 tokens.

- ``plain``: global attention over all N tokens, kv = Linear(x), softmax(Q K^T) V with the N x N scores
  materialized (what a ViT with 4x4 patches costs);
- ``sdpa-global``: the same global attention through ``scaled_dot_product_attention``;
- ``reference`` / ``sdpa`` / ``fused``: spatial-reduction attention, kv = Linear(reduce_kv(x)) over
  M = N/64 keys, through that backend's op table.
"""
import pytest
import torch
import torch.nn.functional as F

from harness import ITEMSIZE, cases, op_table, random_tensor, require_bytes, require_flops, run_benchmark
from pvt_fast.ops import get_backend_ops
from pvt_fast.profiler import attention_matrix_bytes, plain_attention_bytes

DIM, HEADS, SR = 64, 1, 8
EPS = 1e-6
GLOBAL = {"plain": "reference", "sdpa-global": "sdpa"}  # impl -> the table whose attention it runs
IMPLS = ["plain", "sdpa-global", "reference", "sdpa", "fused"]
CASES = cases(cpu=[(224, 1), (512, 1)],
              cuda=[(224, 64), (512, 16), (1024, 1), (1024, 8), (2048, 1), (4096, 1), (8192, 1)])


def _flops(impl, batch, tokens, keys):
    if impl in GLOBAL:
        return 2 * batch * tokens * DIM * 2 * DIM + 4 * batch * tokens * tokens * DIM
    return (2 * batch * keys * DIM * DIM * SR * SR + 2 * batch * keys * DIM * 2 * DIM
            + 4 * batch * tokens * keys * DIM)


def _bytes_needed(impl, batch, tokens, keys):
    activations = 8 * batch * tokens * DIM * ITEMSIZE  # x, q, kv, output and layout copies
    if impl == "plain":
        return activations + plain_attention_bytes(tokens, DIM, HEADS, batch, ITEMSIZE)
    if impl == "reference":
        return activations + attention_matrix_bytes(batch, HEADS, tokens, keys, ITEMSIZE)
    return activations


@pytest.mark.benchmark(group="sra-attention")
@pytest.mark.parametrize("resolution,batch", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_sra_attention(benchmark, impl, resolution, batch):
    side = resolution // 4
    tokens = side * side
    keys = (side // SR) ** 2
    ops = get_backend_ops(GLOBAL[impl]) if impl in GLOBAL else op_table(impl)
    what = f"{impl} at {resolution}x{resolution}, batch {batch}"
    require_bytes(_bytes_needed(impl, batch, tokens, keys), what)
    flops = _flops(impl, batch, tokens, keys)
    require_flops(flops, what)
    kv_w, kv_b = random_tensor(2 * DIM, DIM, scale=0.1), random_tensor(2 * DIM, scale=0.5)
    sr_w, sr_b = random_tensor(DIM, DIM, SR, SR, scale=0.025), random_tensor(DIM, scale=0.5)
    norm_w, norm_b = 1 + random_tensor(DIM, scale=0.05), random_tensor(DIM, scale=0.05)
    scale = (DIM // HEADS) ** -0.5

    if impl in GLOBAL:
        def layer(x, q):
            return ops.attention(q, F.linear(x, kv_w, kv_b), HEADS, scale, 0.0)
    else:
        def layer(x, q):
            reduced = ops.reduce_kv(x, side, side, sr_w, sr_b, norm_w, norm_b, EPS)
            return ops.attention(q, F.linear(reduced, kv_w, kv_b), HEADS, scale, 0.0)

    with torch.no_grad():
        run_benchmark(benchmark, layer, lambda: (random_tensor(batch, tokens, DIM, scale=0.5),
                                                  random_tensor(batch, tokens, DIM, scale=0.5)),
                      impl=impl, resolution=resolution, batch=batch, tokens=tokens,
                      keys=tokens if impl in GLOBAL else keys, flops=flops,
                      moved_bytes=3 * batch * tokens * DIM * ITEMSIZE)
