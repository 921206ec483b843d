"""pvt_fast::dwconv_gelu (kernels/mlp_dwconv.py, pvt_fast/ops/mlp_dwconv.py) against the float64 reference.

Runs on CUDA, or on the CPU with TRITON_INTERPRET=1 (tiny shapes: the interpreter costs about a second per
program of the backward).
"""
import pytest
import torch

from pvt_fast.kernels import mlp_dwconv as kernels
from pvt_fast.ops.eager import dwconv_gelu_reference
from pvt_fast.ops.mlp_dwconv import dwconv_gelu
import helpers

# (B, H, W, hidden). The forward's programs own 7 rows x 14 columns x 64 channels, the backward's 14 or 7
# rows x 12 columns x 32 channels (kernels.FORWARD, kernels.BACKWARD_TILINGS); these cover 1-pixel images
# and rows, row/column/channel tails, several programs along each axis (their overlapping halo columns and
# rows) and batch 2.
SHAPES = [
    (1, 1, 1, 20),
    (2, 2, 7, 72),
    (1, 7, 1, 20),
    (1, 11, 9, 72),
    (1, 9, 19, 20),
    (1, 16, 13, 36),
]
# Per dtype: (atol as a fraction of the reference's largest magnitude, rtol). The kernels accumulate in
# fp32 from the same rounded inputs the reference sees (g = dy * GELU'(pre) too: it stays in registers),
# so the error is the outputs' rounding plus fp32 sums.
OUT_TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (5e-4, 1e-3), torch.bfloat16: (4e-3, 8e-3)}
GRAD_TOL = {torch.float32: (1e-6, 4e-6), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}


def make_inputs(B, H, W, C, dtype, device, param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H * W, C, generator=gen)
    weight = torch.randn(C, 1, 3, 3, generator=gen) * 0.4
    bias = torch.randn(C, generator=gen) * 0.2
    grad_out = torch.randn(B, H * W, C, generator=gen)
    param_dtype = param_dtype or dtype
    return (x.to(device, dtype), weight.to(device, param_dtype), bias.to(device, param_dtype),
            grad_out.to(device, dtype))


def reference(x, H, W, weight, bias, relu_prologue, grad_out):
    """Output and (x, weight, bias) gradients of the plain-PyTorch reference in float64."""
    x64, w64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, weight, bias))
    y = dwconv_gelu_reference(x64, H, W, w64, b64, relu_prologue)
    y.backward(grad_out.cpu().double())
    return y.detach(), x64.grad, w64.grad, b64.grad


def assert_close(actual, expected, tol, what):
    """Every element within ``tol`` = (atol relative to the largest |expected|, rtol) of ``expected``."""
    atol_of_max, rtol = tol
    helpers.assert_close(actual, expected, atol_of_max=atol_of_max, rtol=rtol, what=what)


def run_kernels(x, H, W, weight, bias, relu_prologue, grad_out, tiling=None):
    """Forward and backward launchers with NaN-poisoned outputs."""
    y = kernels.dwconv_gelu_fwd(x, H, W, weight, bias, relu_prologue, out=torch.full_like(x, float("nan")))
    grad_x, grad_weight, grad_bias = kernels.dwconv_gelu_bwd(
        grad_out, x, H, W, weight, bias, relu_prologue, grad_x=torch.full_like(x, float("nan")), tiling=tiling
    )
    return y, grad_x, grad_weight, grad_bias


def check_against_reference(x, H, W, weight, bias, relu_prologue, grad_out, results, what):
    y_ref, gx_ref, gw_ref, gb_ref = reference(x, H, W, weight, bias, relu_prologue, grad_out)
    y, grad_x, grad_weight, grad_bias = results
    assert_close(y, y_ref, OUT_TOL[x.dtype], f"{what} output")
    if grad_x is not None:
        assert_close(grad_x, gx_ref, GRAD_TOL[x.dtype], f"{what} grad x")
        assert_close(grad_weight, gw_ref, GRAD_TOL[x.dtype], f"{what} grad weight")
        assert_close(grad_bias, gb_ref, GRAD_TOL[x.dtype], f"{what} grad bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("relu_prologue", [False, True], ids=["gelu", "relu_gelu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(kernel_device, shape, relu_prologue, dtype):
    B, H, W, C = shape
    x, weight, bias, grad_out = make_inputs(B, H, W, C, dtype, kernel_device)
    y = kernels.dwconv_gelu_fwd(x, H, W, weight, bias, relu_prologue, out=torch.full_like(x, float("nan")))
    check_against_reference(x, H, W, weight, bias, relu_prologue, grad_out, (y, None, None, None), "forward")


BACKWARD_CASES = [(shape, torch.float32) for shape in SHAPES] + [
    (SHAPES[1], torch.float16),
    (SHAPES[3], torch.float16),
]


@pytest.mark.parametrize("relu_prologue", [False, True], ids=["gelu", "relu_gelu"])
@pytest.mark.parametrize("shape, dtype", BACKWARD_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in BACKWARD_CASES])
def test_backward_matches_reference(kernel_device, shape, dtype, relu_prologue):
    B, H, W, C = shape
    x, weight, bias, grad_out = make_inputs(B, H, W, C, dtype, kernel_device)
    results = run_kernels(x, H, W, weight, bias, relu_prologue, grad_out)
    check_against_reference(x, H, W, weight, bias, relu_prologue, grad_out, results, "kernels")


@pytest.mark.parametrize("tiling", kernels.BACKWARD_TILINGS, ids=lambda t: f"rows{t.rows}")
@pytest.mark.parametrize("shape", [(1, 16, 13, 36), (2, 30, 5, 20)], ids=lambda s: "x".join(map(str, s)))
def test_backward_every_tiling(kernel_device, shape, tiling):
    """Each backward tiling, whichever the launcher would pick: 2-5 row blocks, halo rows shared between them."""
    B, H, W, C = shape
    x, weight, bias, grad_out = make_inputs(B, H, W, C, torch.float32, kernel_device, seed=1)
    results = run_kernels(x, H, W, weight, bias, True, grad_out, tiling=tiling)
    check_against_reference(x, H, W, weight, bias, True, grad_out, results, f"{tiling.rows} rows")


def test_op_autograd_fp16_tokens_fp32_parameters(kernel_device):
    """The autocast case: fc1 hands over fp16 tokens, the conv parameters stay fp32."""
    B, H, W, C = 2, 3, 5, 24
    x, weight, bias, grad_out = make_inputs(B, H, W, C, torch.float16, kernel_device, param_dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = dwconv_gelu(leaves[0], H, W, leaves[1], leaves[2], True)
    y.backward(grad_out)
    assert y.dtype == torch.float16 and y.is_contiguous()
    assert [t.grad.dtype for t in leaves] == [torch.float16, torch.float32, torch.float32]
    results = (y, leaves[0].grad, leaves[1].grad, leaves[2].grad)
    check_against_reference(x, H, W, weight, bias, True, grad_out, results, "op")


def test_strided_tokens(kernel_device):
    """Tokens read in place from a wider buffer (token stride != hidden, unaligned start)."""
    B, H, W, C = 2, 5, 3, 20
    x, weight, bias, grad_out = make_inputs(B, H, W, C, torch.float32, kernel_device)
    wide = torch.full((B, H * W, C + 9), float("nan"), device=kernel_device)
    wide[:, :, 3:3 + C] = x
    x_view = wide[:, :, 3:3 + C]
    results = run_kernels(x_view, H, W, weight, bias, False, grad_out)
    check_against_reference(x, H, W, weight, bias, False, grad_out, results, "strided")


def test_strided_gradients(kernel_device):
    """dy read and dx written in place in wider buffers too (the backward's three token tensors each with their
    own stride), with the ReLU prologue, over two row and two column blocks."""
    B, H, W, C = 2, 16, 13, 20
    x, weight, bias, grad_out = make_inputs(B, H, W, C, torch.float32, kernel_device)

    def in_wide(t, pad):
        wide = torch.full((B, H * W, C + pad), float("nan"), device=kernel_device)
        wide[:, :, 1:1 + C] = t
        return wide[:, :, 1:1 + C]

    grad_x = in_wide(torch.zeros_like(x), 7)
    y = kernels.dwconv_gelu_fwd(in_wide(x, 5), H, W, weight, bias, True)
    _, grad_weight, grad_bias = kernels.dwconv_gelu_bwd(in_wide(grad_out, 3), in_wide(x, 5), H, W, weight, bias,
                                                        True, grad_x=grad_x)
    check_against_reference(x, H, W, weight, bias, True, grad_out, (y, grad_x, grad_weight, grad_bias), "strided")


def test_weight_grad_is_deterministic(kernel_device):
    B, H, W, C = 1, 16, 13, 20  # two row blocks x two column blocks: four partial sums per channel
    x, weight, bias, grad_out = make_inputs(B, H, W, C, torch.float32, kernel_device)
    first = kernels.dwconv_gelu_bwd(grad_out, x, H, W, weight, bias, True)
    second = kernels.dwconv_gelu_bwd(grad_out, x, H, W, weight, bias, True)
    for name, a, b in zip(("grad x", "grad weight", "grad bias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_backward_op_strides_match_its_fake(kernel_device):
    """torch.compile plans buffers from the fake impl: the real outputs must have its (contiguous) strides."""
    B, H, W, C = 1, 5, 4, 24
    x, weight, bias, grad_out = make_inputs(B, H, W, C, torch.float32, kernel_device)
    args = (grad_out, x, H, W, weight, bias, False)
    real = torch.ops.pvt_fast.dwconv_gelu_backward(*args)
    torch.library.opcheck(torch.ops.pvt_fast.dwconv_gelu_backward.default, args)
    for name, t in zip(("grad x", "grad weight", "grad bias"), real):
        assert t.is_contiguous(), f"{name} has strides {t.stride()} for shape {tuple(t.shape)}"


def test_opcheck(kernel_device):
    B, H, W, C = 1, 3, 4, 20
    x, weight, bias, _ = make_inputs(B, H, W, C, torch.float32, kernel_device)
    args = (x.requires_grad_(), H, W, weight.requires_grad_(), bias.requires_grad_(), True)
    torch.library.opcheck(torch.ops.pvt_fast.dwconv_gelu.default, args)


def test_flop_counts(kernel_device):
    """The op's FLOPs are what FlopCounterMode counts for the same convolution: forward on the reference path;
    forward and backward on the depthwise conv written as a dense one-channel conv over B * C images
    (FlopCounterMode's backward formula ignores groups, so the grouped reference cannot serve there)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    B, H, W, C = 2, 3, 5, 24
    x, weight, bias, _ = make_inputs(B, H, W, C, torch.float32, kernel_device)

    def total(fn, *args, backward):
        leaves = [t.clone().requires_grad_(backward) for t in args]
        with FlopCounterMode(display=False) as counter:
            out = fn(*leaves)
            if backward:
                out.sum().backward()
        return counter.get_total_flops()

    fused = total(lambda x, w, b: dwconv_gelu(x, H, W, w, b, True), x, weight, bias, backward=False)
    assert fused == total(lambda x, w, b: dwconv_gelu_reference(x, H, W, w, b, True), x, weight, bias, backward=False)
    dense = total(lambda x, w: F.conv2d(x, w, padding=1), x.transpose(1, 2).reshape(B * C, 1, H, W),
                  weight[:1], backward=True)
    assert dense > 0
    assert total(lambda x, w, b: dwconv_gelu(x, H, W, w, b, True), x, weight, bias, backward=True) == dense


@pytest.mark.parametrize("case, error, message", [
    (dict(x=(15, 20)), ValueError, r"x must be \(B, N, hidden\) with N == H\*W == 3\*5, got \(15, 20\)"),
    (dict(x=(1, 14, 20)), ValueError, r"N == H\*W == 3\*5, got \(1, 14, 20\)"),
    (dict(weight=(20, 3, 3)), ValueError, r"weight must be \(hidden, 1, 3, 3\) == \(20, 1, 3, 3\), got \(20, 3,"),
    (dict(weight=(21, 1, 3, 3)), ValueError, r"weight must be .* got \(21, 1, 3, 3\)"),
    (dict(bias=(21,)), ValueError, r"bias must be \(hidden,\) == \(20,\), got \(21,\)"),
    (dict(x_dtype=torch.float64), TypeError, "x must be float32, float16 or bfloat16, got torch.float64"),
    (dict(bias_dtype=torch.int32), TypeError, "bias must be float32, float16 or bfloat16, got torch.int32"),
    (dict(weight_device="meta"), ValueError, "weight must be on x's device cpu, got meta"),
    (dict(x=(1, 0, 20), H=0), ValueError, "H and W must be >= 1, got H=0, W=5"),
], ids=["x-2d", "x-tokens", "weight-rank", "weight-hidden", "bias-hidden", "x-dtype", "bias-dtype",
        "weight-device", "empty-grid"])
def test_input_errors(case, error, message):
    H, W = case.get("H", 3), case.get("W", 5)
    x = torch.randn(case.get("x", (1, 15, 20)), dtype=case.get("x_dtype", torch.float32))
    weight = torch.randn(case.get("weight", (20, 1, 3, 3)), device=case.get("weight_device", "cpu"))
    bias = torch.randn(case.get("bias", (20,))).to(case.get("bias_dtype", torch.float32))
    with pytest.raises(error, match=message):
        dwconv_gelu(x, H, W, weight, bias, False)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, bias, _ = make_inputs(1, 2, 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*backend='sdpa'"):
        dwconv_gelu(x, 2, 2, weight, bias, False)


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16_params", "fp32_params"])
@pytest.mark.parametrize("shape", [(2, 28, 28, 128), (3, 7, 7, 200), (1, 13, 30, 72)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bf16_matches_reference(shape, param_dtype):
    B, H, W, C = shape
    for relu_prologue in (False, True):
        x, weight, bias, grad_out = make_inputs(B, H, W, C, torch.bfloat16, "cuda", param_dtype=param_dtype)
        results = run_kernels(x, H, W, weight, bias, relu_prologue, grad_out)
        what = f"bf16 relu={relu_prologue}"
        check_against_reference(x, H, W, weight, bias, relu_prologue, grad_out, results, what)


@pytest.mark.gpu
@pytest.mark.slow
def test_forward_speed_pvt_v2_b2_stage1():
    """The target: >= 3x the official chain (tokens -> NCHW -> dwconv -> tokens -> GELU) on H100 for
    pvt_v2_b2 stage 1 (hidden 512, 56x56, batch 64, bf16)."""
    import triton

    from pvt_fast.ops import eager

    B, H, W, C = 64, 56, 56, 512
    x, weight, bias, _ = make_inputs(B, H, W, C, torch.bfloat16, "cuda", param_dtype=torch.float32)
    w16, b16 = weight.bfloat16(), bias.bfloat16()
    ms_fused = triton.testing.do_bench(lambda: dwconv_gelu(x, H, W, weight, bias, False), return_mode="median")
    ms_chain = triton.testing.do_bench(lambda: eager.dwconv_gelu_reference(x, H, W, w16, b16, False),
                                       return_mode="median")
    ms_views = triton.testing.do_bench(lambda: eager.dwconv_gelu_sdpa(x, H, W, w16, b16, False),
                                       return_mode="median")
    gb_per_s = 2 * x.numel() * x.element_size() / (ms_fused * 1e-3) / 1e9  # one read, one write
    print(f"\n{torch.cuda.get_device_name()}: fused {ms_fused * 1e3:.1f} us ({gb_per_s:.0f} GB/s), "
          f"official chain {ms_chain * 1e3:.1f} us ({ms_chain / ms_fused:.2f}x), "
          f"channels-last views {ms_views * 1e3:.1f} us ({ms_views / ms_fused:.2f}x)")
    if torch.cuda.get_device_capability() == (9, 0):
        assert ms_chain / ms_fused >= 3.0


@pytest.mark.gpu
@pytest.mark.slow
def test_offsets_past_2_31_elements_gpu():
    """A token tensor of more than 2**31 elements: the last image rows (which int32 offsets would wrap) are
    compared with the reference computed on those rows and their halo only."""
    C, W = 64, 4096
    H = 2 ** 31 // (C * W) + 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, H * W, C, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(C, 1, 3, 3, device="cuda", generator=gen) * 0.3
    bias = torch.randn(C, device="cuda", generator=gen) * 0.1
    out = dwconv_gelu(x, H, W, weight, bias, False)
    rows = 4  # the last 3 rows, and the one above them as their halo
    crop = x[:, -rows * W:].double()
    want = dwconv_gelu_reference(crop, rows, W, weight.double(), bias.double(), False)[:, W:]
    err = ((out[:, -(rows - 1) * W:].double() - want).norm() / want.norm()).item()
    assert err < 1e-2, f"relative error {err:.2e} in the last {rows - 1} rows"
