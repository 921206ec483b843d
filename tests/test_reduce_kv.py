"""The K/V reduction kernels (conv SRA and v2-li linear SRA) against their float64 references.

Runs on CUDA, or on the CPU with TRITON_INTERPRET=1 (tiny shapes). Kernel outputs are compared with
the float64 reference under a bound set by PyTorch's own error in the same dtype (flash-attention's rule):
    max |kernel - ref64| <= RATIO * max |PyTorch(dtype) - ref64| + FLOOR.
"""
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pvt_fast.ops import eager
from pvt_fast.ops import reduce_kv as ops
from helpers import assert_close, lowp_error

EPS = 1e-5
ERROR_BOUND = {  # dtype: (RATIO, FLOOR)
    torch.float32: (2.0, 1e-5),
    torch.float16: (2.0, 1e-4),
    torch.bfloat16: (2.0, 1e-3),
}

# (B, H, W, C, sr): H, W not multiples of sr, H == sr, sr 1/2/3/4/8, C with a K tail (24, 40, 48), C == 64,
# C past one 64-wide channel block (72 -> 128, 136 -> 256).
CONV_CASES = [
    (1, 9, 13, 24, 4),
    (2, 9, 13, 40, 4),
    (2, 11, 7, 48, 2),
    (1, 5, 3, 24, 1),
    (2, 17, 10, 24, 8),
    (1, 8, 8, 40, 8),
    (2, 4, 9, 48, 4),
    (2, 6, 7, 64, 3),
    (1, 6, 5, 72, 2),
    (1, 4, 5, 136, 2),
]
# (B, H, W, C): sides 1, 3, 7, 9, 15 (overlapping and repeated bins), non-square, one window > 16 tokens.
LINEAR_CASES = [
    (1, 1, 1, 24),
    (2, 3, 5, 40),
    (1, 7, 7, 48),
    (2, 9, 15, 24),
    (1, 15, 3, 40),
    (1, 35, 29, 24),
]


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


def _kernels():
    from pvt_fast.kernels import reduce_kv

    return reduce_kv


def _inputs(B, H, W, C, sr, dtype, device, seed=0):
    """x and the four parameters, scaled like a trained block (conv output ~ unit variance)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H * W, C, generator=g)
    sr_weight = torch.randn(C, C, sr, sr, generator=g) / (C * sr * sr) ** 0.5
    sr_bias = 0.1 * torch.randn(C, generator=g)
    norm_weight = 1 + 0.2 * torch.randn(C, generator=g)
    norm_bias = 0.2 * torch.randn(C, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, sr_weight, sr_bias, norm_weight, norm_bias)]


def _run(fn, x, H, W, params, dtype=None):
    x, *params = [t.to(dtype) if dtype is not None else t for t in (x, *params)]
    return fn(x, H, W, *params, EPS)


def _assert_close(out, ref64, lowp, what):
    """``out`` within the dtype's bound of ``ref64``; ``lowp`` is PyTorch's own result in out's dtype."""
    ratio, floor = ERROR_BOUND[out.dtype]
    assert_close(out, ref64, atol=ratio * lowp_error(lowp, ref64) + floor, what=what)


# kernels ------------------------------------------------------------------------------------------------


def _configs(kernels, C, sr, dtype):
    """Both blockings the launcher may pick, unsplit and split over K (the split sum then normalizes)."""
    steps = sr * sr * -(-C // 64)
    configs = kernels._blockings(C, dtype, dtype)
    return [dataclasses.replace(c, splits=s) for c in configs for s in sorted({1, min(3, steps)})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "B{}_H{}_W{}_C{}_sr{}".format(*c))
def test_reduce_kv_kernel_matches_reference(kernel_device, dtype, case):
    kernels = _kernels()
    B, H, W, C, sr = case
    x, *params = _inputs(B, H, W, C, sr, dtype, kernel_device)
    ref64 = _run(eager.reduce_kv_reference, x, H, W, params, torch.float64)
    lowp = _run(eager.reduce_kv_reference, x, H, W, params)
    weight = params[0].contiguous(memory_format=torch.channels_last)
    for config in _configs(kernels, C, sr, dtype):
        out = torch.full_like(ref64, float("nan"), dtype=dtype)
        kernels.reduce_kv(x, H, W, weight, *params[1:], EPS, out=out, config=config)
        _assert_close(out, ref64, lowp, f"reduce_kv {case} {dtype} {config}")


@pytest.mark.parametrize("layout", ["sliced", "channels_strided", "oihw_weight"])
def test_reduce_kv_kernel_reads_strided_inputs(kernel_device, layout):
    kernels = _kernels()
    B, H, W, C, sr = 2, 9, 7, 40, 2
    x, *params = _inputs(B, H, W, C, sr, torch.float32, kernel_device)
    ref64 = _run(eager.reduce_kv_reference, x, H, W, params, torch.float64)
    lowp = _run(eager.reduce_kv_reference, x, H, W, params)
    weight = params[0].contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # token stride 3C: the q columns of a fused qkv output, say
        x = torch.cat([x, torch.zeros_like(x), torch.zeros_like(x)], dim=2)[:, :, :C]
    elif layout == "channels_strided":  # (B, C, N) memory, channel stride N
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        weight = params[0].contiguous()
    out = torch.full_like(ref64, float("nan"), dtype=torch.float32)
    kernels.reduce_kv(x, H, W, weight, *params[1:], EPS, out=out)
    _assert_close(out, ref64, lowp, f"reduce_kv {layout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "B{}_H{}_W{}_C{}".format(*c))
def test_reduce_kv_linear_kernel_matches_reference(kernel_device, dtype, case):
    kernels = _kernels()
    B, H, W, C = case
    x, *params = _inputs(B, H, W, C, 1, dtype, kernel_device)
    ref64 = _run(eager.reduce_kv_linear_reference, x, H, W, params, torch.float64)
    lowp = _run(eager.reduce_kv_linear_reference, x, H, W, params)
    out = torch.full_like(ref64, float("nan"), dtype=dtype)
    kernels.reduce_kv_linear(x, H, W, *params, EPS, out=out)
    _assert_close(out, ref64, lowp, f"reduce_kv_linear {case} {dtype}")


def test_aot_specs_cover_every_launch_config(matmul_precision):
    from pvt_fast.kernels._common import TRITON_TYPES

    kernels = _kernels()
    names = {spec.name for spec in kernels.aot_specs()}
    for dtype, ty in TRITON_TYPES.items():
        x_dtypes = (torch.float32,) if dtype == torch.float32 else (dtype, torch.float32)
        for precision, setting in (("ieee", "highest"), ("tf32", "high")) if dtype == torch.float32 else (("ieee", None),):
            if setting is not None:
                matmul_precision(setting)
            for x_dtype in x_dtypes:
                for C in range(1, kernels.MAX_CHANNELS + 1, 7):
                    for rows, sr, num_sms in ((49, 8, 132), (64 * 49, 2, 132), (1, 1, 1), (10 ** 6, 4, 132)):
                        c = kernels.gemm_config(rows, C, sr, dtype, num_sms, x_dtype)
                        name = (f"reduce_kv conv_gemm x={TRITON_TYPES[x_dtype]} w={ty} {precision} M{c.block_m} "
                                f"C{c.c_main}+{c.c_tail} K{c.block_k}")
                        assert name in names, f"C={C} rows={rows}: {name} has no AotSpec"
                        if c.splits > 1 or c.c_tiles > 1:
                            block_r, block_c = kernels._split_blocks(C)
                            assert f"reduce_kv split_layer_norm {ty} R{block_r} C{block_c}" in names, f"C={C}"
        for H, W in ((1, 1), (7, 7), (56, 56), (9, 200)):
            name = f"reduce_kv adaptive_avg_pool7 {ty} T{kernels.pool_block_t(H, W)} C64"
            assert name in names, f"H={H} W={W}: {name} has no AotSpec"


# ops ----------------------------------------------------------------------------------------------------


OPS = {  # name: (op, reference name)
    "reduce_kv": (ops.reduce_kv, "reduce_kv_reference"),
    "reduce_kv_linear": (ops.reduce_kv_linear, "reduce_kv_linear_reference"),
}
OP_CASES = {"reduce_kv": (2, 9, 13, 24, 4), "reduce_kv_linear": (2, 9, 5, 24, 1)}  # (B, H, W, C, sr)


def _op_and_ref(name):
    op, ref_name = OPS[name]
    return op, getattr(eager, ref_name)


@pytest.mark.parametrize("name", OPS)
def test_op_gradients_match_float64_reference(kernel_device, name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    op, ref = _op_and_ref(name)
    B, H, W, C, sr = OP_CASES[name]
    inputs = [t.requires_grad_() for t in _inputs(B, H, W, C, sr, torch.float32, kernel_device)]
    out = op(inputs[0], H, W, *inputs[1:], EPS)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = ref(inputs64[0], H, W, *inputs64[1:], EPS)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())
    _assert_close(out.detach(), out64.detach(), _run(ref, inputs[0].detach(), H, W, [t.detach() for t in inputs[1:]]),
                  f"{name} forward")
    for arg, g, g64 in zip(("x", "sr_weight", "sr_bias", "norm_weight", "norm_bias"), grads, grads64):
        assert g.shape == g64.shape and g.dtype == torch.float32, f"{name} d{arg}: {g.shape} {g.dtype}"
        err = (g.double() - g64).abs()
        scale = g64.abs().max().item()
        if not err.max().item() <= 1e-5 * scale + 1e-6:
            first = tuple((err > 1e-5 * scale + 1e-6).nonzero()[0].tolist())
            raise AssertionError(f"{name} d{arg}: max error {err.max().item():.3g} (gradient max {scale:.3g}); "
                                 f"first at {first}: got {g[first].item()}, expected {g64[first].item()}")


@pytest.mark.parametrize("name", OPS)
def test_op_casts_parameters_to_x_dtype(kernel_device, name):
    """fp32 parameters with an fp16 x: computed in fp16 from the parameters rounded to fp16, fp32 gradients.
    Output and gradients against the float64 reference of the rounded values, bounded by PyTorch's own fp16
    error on the same computation (its autograd through the reference in fp16)."""
    op, ref = _op_and_ref(name)
    B, H, W, C, sr = OP_CASES[name]
    x, *params = _inputs(B, H, W, C, sr, torch.float32, kernel_device)
    x = x.half()
    params = [p.requires_grad_() for p in params]
    out = op(x, H, W, *params, EPS)
    assert out.dtype == torch.float16
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, params, grad_out)

    rounded = [p.detach().half() for p in params]
    results = {}
    for dtype in (torch.float64, torch.float16):
        leaves = [p.to(dtype).requires_grad_() for p in rounded]
        y = ref(x.to(dtype), H, W, *leaves, EPS)
        results[dtype] = (y.detach(), torch.autograd.grad(y, leaves, grad_out.to(dtype)))
    _assert_close(out.detach(), results[torch.float64][0], results[torch.float16][0], f"{name} forward")
    for arg, g, g64, g16 in zip(("sr_weight", "sr_bias", "norm_weight", "norm_bias"), grads, results[torch.float64][1],
                                results[torch.float16][1]):
        assert g.dtype == torch.float32, f"{name} d{arg}: {g.dtype}"
        _assert_close(g, g64, g16, f"{name} d{arg}")


@pytest.mark.parametrize("name", OPS)
def test_autocast_reads_fp32_x_in_place(kernel_device, name, monkeypatch):
    """Under autocast the kernel gets the block's fp32 x itself (no cast copy) and 16-bit parameters."""
    kernels = _kernels()
    seen = []
    launcher = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda x, *a, **k: seen.append((x.data_ptr(), x.dtype, a[2].dtype)) or
                        launcher(x, *a, **k))
    B, H, W, C, sr = OP_CASES[name]
    x, *params = _inputs(B, H, W, C, sr, torch.float32, kernel_device)
    with torch.autocast(kernel_device, dtype=torch.float16):
        out = OPS[name][0](x, H, W, *params, EPS)
    assert out.dtype == torch.float16
    assert seen == [(x.data_ptr(), torch.float32, torch.float16)], seen


@pytest.mark.parametrize("name", OPS)
def test_opcheck(kernel_device, name):
    B, H, W, C, sr = 2, 5, 6, 16, OP_CASES[name][-1]
    x, *params = _inputs(B, H, W, C, sr, torch.float32, kernel_device)
    args = (x.requires_grad_(), H, W, *[p.requires_grad_() for p in params], EPS)
    torch.library.opcheck(getattr(torch.ops.pvt_fast, name).default, args)


@pytest.mark.parametrize("name", OPS)
def test_flop_counts(kernel_device, name):
    """The op's FLOPs are what FlopCounterMode counts on the reference path (its convolution)."""
    op, ref = _op_and_ref(name)
    B, H, W, C, sr = OP_CASES[name]
    x, *params = _inputs(B, H, W, C, sr, torch.float32, kernel_device)
    with FlopCounterMode(display=False) as fused, torch.no_grad():
        op(x, H, W, *params, EPS)
    with FlopCounterMode(display=False) as reference, torch.no_grad():
        ref(x, H, W, *params, EPS)
    assert reference.get_total_flops() > 0
    assert fused.get_total_flops() == reference.get_total_flops()


def _bad_inputs():
    B, H, W, C = 2, 8, 8, 24
    x, w, b, g, beta = _inputs(B, H, W, C, 2, torch.float32, "cpu")
    w1 = _inputs(B, H, W, C, 1, torch.float32, "cpu")[1]
    return [
        ("x_2d", ops.reduce_kv, (x[0], H, W, w, b, g, beta), ValueError, r"x must be \(B, N, C\), got \(64, 24\)"),
        ("n_mismatch", ops.reduce_kv, (x, H, W + 1, w, b, g, beta), ValueError,
         r"N == H\*W == 72 .* got \(2, 64, 24\)"),
        ("weight_c", ops.reduce_kv, (x, H, W, w[:20, :20], b, g, beta), ValueError,
         r"sr_weight must be \(C, C, sr, sr\) with C == 24, got \(20, 20, 2, 2\)"),
        ("weight_not_square", ops.reduce_kv, (x, H, W, w[..., :1], b, g, beta), ValueError,
         r"sr_weight must be \(C, C, sr, sr\)"),
        ("bias_shape", ops.reduce_kv, (x, H, W, w, b[:3], g, beta), ValueError, r"sr_bias must be \(C,\) with C == 24"),
        ("norm_shape", ops.reduce_kv, (x, H, W, w, b, g, beta[None]), ValueError, r"norm_bias must be \(C,\)"),
        ("too_small", ops.reduce_kv, (x.reshape(2, 64, 24), 1, 64, w, b, g, beta), ValueError,
         r"input too small: H=1, W=64, but the 2x2 reduction needs H >= 2 and W >= 2"),
        ("dtype", ops.reduce_kv, (x.double(), H, W, w, b, g, beta), TypeError,
         r"x must be float32, float16 or bfloat16, got torch.float64"),
        ("mixed_params", ops._reduce_kv_op, (x, H, W, w.half(), b, g, beta), TypeError,
         r"sr_bias must have x's dtype torch.float32 \(or, for a float32 x, float16 or bfloat16 as the other "
         r"parameters\), got torch.float32"),
        ("half_x_fp32_params", ops._reduce_kv_op, (x.half(), H, W, w, b, g, beta), TypeError,
         r"sr_weight must have x's dtype torch.float16"),
        ("device", ops.reduce_kv, (x, H, W, w, b, g.to("meta"), beta), ValueError,
         r"norm_weight must be on x's device cpu, got meta"),
        ("too_wide", ops.reduce_kv_linear, (torch.zeros(1, 1, 1025), 1, 1, torch.zeros(1025, 1025, 1, 1),
                                            *[torch.zeros(1025)] * 3), ValueError, r"1 <= C <= 1024"),
        ("linear_weight", ops.reduce_kv_linear, (x, H, W, w, b, g, beta), ValueError,
         r"sr_weight must be \(C, C, 1, 1\) with C == 24, got \(24, 24, 2, 2\)"),
        ("linear_ok_shapes_wrong_n", ops.reduce_kv_linear, (x, 7, 7, w1, b, g, beta), ValueError, r"N == H\*W == 49"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_input_errors(case):
    _, fn, args, error, message = case
    with pytest.raises(error, match=message):
        fn(*args, EPS)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, *params = _inputs(1, 4, 4, 16, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="backend='sdpa'"):
        ops.reduce_kv(x, 4, 4, *params, EPS)


# GPU only -----------------------------------------------------------------------------------------------


# (name, (B, H, W, C, sr)): PVT's stages at 224 (and odd sizes), C = 1024 for the widest block.
GPU_CASES = [("reduce_kv", c) for c in [(4, 56, 56, 64, 8), (4, 28, 28, 128, 4), (4, 14, 14, 320, 2),
                                         (2, 60, 44, 32, 8), (2, 8, 8, 1024, 2)]]
GPU_CASES += [("reduce_kv_linear", c) for c in [(4, 56, 56, 64, 1), (4, 14, 14, 320, 1), (4, 7, 7, 512, 1),
                                                (2, 50, 38, 128, 1)]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name, case", GPU_CASES, ids=lambda v: str(v))
def test_pvt_shapes_on_gpu(dtype, name, case):
    op, ref = _op_and_ref(name)
    B, H, W, C, sr = case
    x, *params = _inputs(B, H, W, C, sr, dtype, "cuda")
    out = op(x, H, W, *params, EPS)
    _assert_close(out, _run(ref, x, H, W, params, torch.float64), _run(ref, x, H, W, params), f"{name} {case} {dtype}")


@pytest.mark.parametrize("linear", [False, True])
def test_autocast_runs_the_reduction_in_the_autocast_dtype(kernel_device, linear):
    """The block hands reduce_kv its fp32 LayerNorm output; under autocast the conv must run in the autocast
    dtype (on tensor cores on a GPU), as eager autocast's conv2d does: its error against float64 is bounded
    by twice eager autocast's own."""
    torch.manual_seed(0)
    B, H, W, C, sr = 2, 9, 10, 32, 2
    x = torch.randn(B, H * W, C, device=kernel_device)
    weight = torch.randn(C, C, 1 if linear else sr, 1 if linear else sr, device=kernel_device) * 0.1
    params = (torch.randn(C, device=kernel_device) * 0.1, torch.ones(C, device=kernel_device),
              torch.zeros(C, device=kernel_device))
    name = "reduce_kv_linear" if linear else "reduce_kv"
    op, ref = _op_and_ref(name)
    ref64 = ref(x.double(), H, W, weight.double(), *[p.double() for p in params], 1e-5)
    with torch.autocast(kernel_device, dtype=torch.float16):
        out = op(x, H, W, weight, *params, 1e-5)
        eager_amp = ref(x, H, W, weight, *params, 1e-5)
    assert out.dtype == torch.float16
    err = ((out.double() - ref64).norm() / ref64.norm()).item()
    bound = 2 * ((eager_amp.double() - ref64).norm() / ref64.norm()).item()
    assert err <= bound, f"relative error {err:.2e} > 2x eager autocast's {bound / 2:.2e}"
