"""Group ``patch-embed``: pvt_v2_b2's overlapping patch embeddings, conv + LayerNorm to (B, N, C) tokens.

Stage 1 reads the image (B, 3, res, res) through a 7x7 stride-4 conv to 64 channels; stages 2-4 read the
previous stage's token grid (B, res/s, res/s, C) through a 3x3 stride-2 conv (64 -> 128, 128 -> 320, 320 -> 512
channels).
- ``torch``: the official conv -> flatten/transpose -> LayerNorm (the reference op table);
- ``fused``: the fused op table; the CUDA kernel's plan (fused, or split: conv tiles then a norm pass, see
  csrc/patch_embed_core.h) is recorded in extra_info as the traffic model's mirror of make_plan predicts it.
"""
import pytest
import torch

from harness import DTYPE, ITEMSIZE, OP_CASES, OP_IMPLS, op_table, random_tensor, require_bytes, run_benchmark

EPS = 1e-6
STAGES = {1: dict(c_in=3, c_out=64, kernel=7, stride=4, in_stride=1, layout="nchw"),
          2: dict(c_in=64, c_out=128, kernel=3, stride=2, in_stride=4, layout="nhwc"),
          3: dict(c_in=128, c_out=320, kernel=3, stride=2, in_stride=8, layout="nhwc"),
          4: dict(c_in=320, c_out=512, kernel=3, stride=2, in_stride=16, layout="nhwc")}


def _plan(batch, side, cfg):
    from pvt_fast.kernels import patch_embed_cuda as pe

    k = cfg["kernel"]
    pl = pe.plan(pe.Problem(batch, cfg["c_in"], side, side, cfg["c_out"], k, cfg["stride"], k // 2, cfg["layout"],
                            DTYPE))
    return f"{'split' if pl.partial else 'fused'} {pl.bm}x{pl.bn}/{pl.splits}"


@pytest.mark.benchmark(group="patch-embed")
@pytest.mark.parametrize("resolution,batch", OP_CASES)
@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("impl", list(OP_IMPLS))
def test_patch_embed(benchmark, impl, stage, resolution, batch):
    cfg = STAGES[stage]
    c_in, c_out, k, stride = cfg["c_in"], cfg["c_out"], cfg["kernel"], cfg["stride"]
    side = resolution // cfg["in_stride"]
    out_side = (side + 2 * (k // 2) - k) // stride + 1
    in_bytes = batch * side * side * c_in * ITEMSIZE
    out_bytes = batch * out_side * out_side * c_out * ITEMSIZE
    ops = op_table(OP_IMPLS[impl])
    require_bytes(in_bytes * 2 + out_bytes * 3, f"patch embedding stage {stage} at {resolution}x{resolution}, "
                  f"batch {batch}")
    weight = random_tensor(c_out, c_in, k, k, scale=(2 / (k * k * c_out)) ** 0.5)
    bias, norm_b = random_tensor(c_out, scale=0.1), random_tensor(c_out, scale=0.1)
    norm_w = 1 + random_tensor(c_out, scale=0.1)
    shape = (batch, c_in, side, side) if cfg["layout"] == "nchw" else (batch, side, side, c_in)

    def embed(x):
        return ops.patch_embed(x, weight, bias, norm_w, norm_b, EPS, stride, k // 2, cfg["layout"])

    with torch.no_grad():
        info = {"plan": _plan(batch, side, cfg)} if impl == "fused" else {}
        run_benchmark(benchmark, embed, lambda: (random_tensor(*shape),), impl=impl, resolution=resolution,
                      batch=batch, stage=stage, flops=2 * batch * out_side * out_side * c_out * c_in * k * k,
                      moved_bytes=in_bytes + out_bytes, **info)
