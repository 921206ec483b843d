"""The fused spatial-reduction attention (Triton forward + backward) against its float64 reference.

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tiny shapes); bf16 only on a GPU (the interpreter's
bf16 tl.dot is not meaningful). Errors are bounded by PyTorch's own error in the same dtype.
"""
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pvt_fast.ops.eager import attention_reference
from pvt_fast.ops.sra_attention import attention, sra_attention
from helpers import assert_close, lowp_error

# (dtype) -> (factor, floor): |kernel - ref64| <= factor * |torch in dtype - ref64| + floor, elementwise max.
TOL = {
    torch.float32: (4.0, 2e-6),
    torch.float16: (3.0, 2e-3),
    torch.bfloat16: (3.0, 1.6e-2),
}

# (B, N, M, heads, d): tails of every block, one key, batch 1, 5 heads, padded head dims, the v1 cls token
# (N = M = H*W + 1), several key blocks.
CASES = [
    pytest.param(2, 37, 23, 2, 32, id="tails"),
    pytest.param(1, 19, 1, 1, 48, id="one-key"),
    pytest.param(1, 21, 49, 5, 32, id="five-heads-M49"),
    pytest.param(2, 17, 17, 1, 64, id="cls-token-4x4+1"),
    pytest.param(1, 133, 150, 1, 48, id="many-blocks"),
    pytest.param(1, 128, 64, 1, 32, id="exact-blocks"),
    pytest.param(1, 9, 5, 3, 16, id="d16"),
    pytest.param(2, 20, 18, 1, 128, id="d128"),
    pytest.param(1, 17, 40, 2, 80, id="d80"),
]

# name -> (dtype, torch.get_float32_matmul_precision() during the test); "high" lets fp32 dots use tf32.
DTYPES = {
    "fp32": (torch.float32, "highest"),
    "fp32-tf32": (torch.float32, "high"),
    "fp16": (torch.float16, "highest"),
    "bf16": (torch.bfloat16, "highest"),
}


def kernels():
    from pvt_fast.kernels import sra_attention as module

    return module


def make_inputs(B, N, M, heads, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, heads * d, generator=g).to(device=device, dtype=dtype)
    kv = torch.randn(B, M, 2 * heads * d, generator=g).to(device=device, dtype=dtype)
    grad_o = torch.randn(B, N, heads * d, generator=g).to(device=device, dtype=dtype)
    return q, kv, grad_o


def reference_with_lse(q, kv, heads, scale):
    """The official attention (pvt_fast.ops.eager.attention_reference) and the logsumexp of its scaled scores."""
    B, N, C = q.shape
    d = C // heads
    scores = q.reshape(B, N, heads, d).transpose(1, 2) @ kv[..., :C].reshape(B, -1, heads, d).permute(0, 2, 3, 1)
    return attention_reference(q, kv, heads, scale), torch.logsumexp(scores * scale, dim=-1)


def reference(q, kv, heads, scale, grad_o, dtype):
    """(o, lse, dq, dkv) of the plain-PyTorch reference computed in ``dtype`` from the kernel's inputs."""
    qr = q.detach().to(dtype).requires_grad_()
    kvr = kv.detach().to(dtype).requires_grad_()
    o, lse = reference_with_lse(qr, kvr, heads, scale)
    o.backward(grad_o.to(dtype))
    return o.detach(), lse.detach(), qr.grad, kvr.grad


def assert_within(what, y, ref64, torch_lowp, dtype):
    """Elementwise: |y - ref64| <= factor * max|torch_lowp - ref64| + floor."""
    factor, floor = TOL[dtype]
    assert_close(y, ref64, atol=factor * lowp_error(torch_lowp, ref64) + floor, what=what)


def check_fwd_bwd(q, kv, grad_o, heads, scale, num_splits=None):
    """Forward and backward through the launchers into NaN-filled outputs, against the float64 reference."""
    B, N, C = q.shape
    dtype, device = q.dtype, q.device
    K = kernels()
    o = torch.full((B, N, C), float("nan"), dtype=dtype, device=device)
    lse = torch.full((B, heads, N), float("nan"), dtype=torch.float32, device=device)
    K.sra_attention_fwd(q, kv, heads, scale, out=o, lse=lse)
    dq = torch.full_like(q, float("nan"))
    dkv = torch.full_like(kv, float("nan"))
    K.sra_attention_bwd(grad_o, q, kv, o, lse, heads, scale, num_splits=num_splits, dq=dq, dkv=dkv)

    ref64 = reference(q.cpu(), kv.cpu(), heads, scale, grad_o.cpu(), torch.float64)
    lowp = reference(q, kv, heads, scale, grad_o, dtype)
    for what, y, r, t in zip(("o", "lse", "dq", "dkv"), (o, lse, dq, dkv), ref64, lowp):
        assert_within(what, y.cpu(), r, t.cpu(), dtype)


def check_random(B, N, M, heads, d, dtype, device, scale=None, num_splits=None):
    q, kv, grad_o = make_inputs(B, N, M, heads, d, dtype, device)
    check_fwd_bwd(q, kv, grad_o, heads, d ** -0.5 if scale is None else scale, num_splits)


@pytest.fixture
def dtype(request):
    dtype, precision = DTYPES[request.param]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    yield dtype
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("B,N,M,heads,d", CASES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"], indirect=True)
def test_matches_reference(kernel_device, B, N, M, heads, d, dtype):
    check_random(B, N, M, heads, d, dtype, kernel_device)


def test_scale_is_honoured(kernel_device):
    check_random(1, 20, 30, 2, 32, torch.float32, kernel_device, scale=0.37)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["large", "very-negative"])
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_extreme_scores(kernel_device, sign):
    # Scores around +-500: the softmax must stay finite, and a padded key (score 0) must not leak in
    # even where exp(0 - lse) overflows (the interpreter warns about the inf * 0 in padded, unstored rows).
    B, N, M, heads, d = 1, 20, 23, 1, 32
    q, kv, grad_o = make_inputs(B, N, M, heads, d, torch.float32, kernel_device)
    q = q * 0.1 + 4.0
    kv[..., :d] = kv[..., :d] * 0.1 + 4.0 * sign
    check_fwd_bwd(q, kv, grad_o, heads, 1.0)


@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("M", [20, 90], ids=["one-block", "three-kernels"])
def test_split_query_ranges_for_dkdv(kernel_device, num_splits, M):
    # Many queries: dK/dV summed over query ranges in fp32, then cast (M <= 64 takes the one-block backward).
    check_random(1, 150, M, 1, 32, torch.float16, kernel_device, num_splits=num_splits)


def test_split_query_ranges_fp32(kernel_device):
    check_random(1, 70, 40, 1, 32, torch.float32, kernel_device, num_splits=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_split_sum_adds_in_split_order(kernel_device, dtype, splits):
    """The split sum is the fp32 sum in split order, rounded once: bitwise, over a tail block (2 * 1024 + 37
    elements). Values of mixed magnitude make a different order or an early rounding show. (Triton's
    interpreter rounds fp32 -> bf16 toward zero, GPUs to nearest: under it the bf16 result is the truncation.)"""
    g = torch.Generator().manual_seed(3)
    partial = (torch.randn(splits, 2, 1061, generator=g) * torch.logspace(-4, 4, splits)[:, None, None]).to(
        kernel_device)
    out = torch.full((2, 1061), float("nan"), dtype=dtype, device=kernel_device)
    kernels()._split_sum_into(out, partial)
    expected = partial[0].clone()
    for s in range(1, splits):
        expected += partial[s]
    if dtype == torch.bfloat16 and kernel_device == "cpu":
        expected = (expected.view(torch.int32) & -65536).view(torch.float32)  # exact in bf16
    assert torch.equal(out, expected.to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,M,heads,d", CASES + [
    pytest.param(2, 3136, 49, 1, 64, id="pvt-stage1-224"),
    pytest.param(1, 1025, 1025, 2, 64, id="cls-token-32x32+1"),
    pytest.param(1, 300, 200, 1, 128, id="d128"),
])
@pytest.mark.parametrize("dtype", list(DTYPES), indirect=True)
def test_matches_reference_gpu(B, N, M, heads, d, dtype):
    check_random(B, N, M, heads, d, dtype, "cuda")


@pytest.mark.parametrize("B,N", [(0, 5), (2, 0)])
def test_empty_batch_or_queries(kernel_device, B, N):
    q, kv, _ = make_inputs(B, N, 3, 1, 32, torch.float32, kernel_device)
    q.requires_grad_()
    kv.requires_grad_()
    out = attention(q, kv, 1, 0.2)
    out.sum().backward()
    assert out.shape == (B, N, 32) and q.grad.shape == q.shape
    assert torch.equal(kv.grad, torch.zeros_like(kv))


def test_strided_inputs(kernel_device):
    # q and kv as column slices of wider tensors (e.g. a fused qkv projection): read in place via strides.
    B, N, M, heads, d = 2, 19, 23, 2, 32
    C = heads * d
    g = torch.Generator().manual_seed(1)
    qx = torch.randn(B, N, 3 * C, generator=g).to(kernel_device)
    kvx = torch.randn(B, M, 3 * C, generator=g).to(kernel_device)
    q, kv = qx[:, :, C:2 * C], kvx[:, :, :2 * C]
    o, lse = kernels().sra_attention_fwd(q, kv, heads, 0.2)
    o_ref, lse_ref = reference_with_lse(q.cpu().double(), kv.cpu().double(), heads, 0.2)
    torch.testing.assert_close(o.cpu().double(), o_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), lse_ref, rtol=0, atol=1e-5)


def test_grad_through_lse(kernel_device):
    # lse is an output of the op: its gradient enters the backward as delta - grad_lse.
    B, N, M, heads, d = 1, 21, 30, 2, 32
    q, kv, _ = make_inputs(B, N, M, heads, d, torch.float32, kernel_device)
    q.requires_grad_()
    kv.requires_grad_()
    o, lse = sra_attention(q, kv, heads, 0.3)
    (o.square().sum() + lse.sin().sum()).backward()
    q64 = q.detach().cpu().double().requires_grad_()
    kv64 = kv.detach().cpu().double().requires_grad_()
    o64, lse64 = reference_with_lse(q64, kv64, heads, 0.3)
    (o64.square().sum() + lse64.sin().sum()).backward()
    torch.testing.assert_close(q.grad.cpu().double(), q64.grad, rtol=0, atol=2e-5)
    torch.testing.assert_close(kv.grad.cpu().double(), kv64.grad, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", ["fp16"], indirect=True)
def test_grad_through_lse_with_key_offset(kernel_device, dtype):
    # With a gradient into lse, rowsum(dS) = grad_lse instead of 0, so the dQ kernel's shared-key-offset term
    # (scale grad_lse k0, ~15 here) is added back outside it, in fp32, and a 16-bit dQ is rounded once. The
    # first key (k0) lies far from the others, so dS (K - k0) is ~20x dQ itself. (Rounding it to fp16 before
    # the addition gave 5.0e-3 here, against 1.3e-3 now and PyTorch fp16's own 3.1e-3: inside this bound.)
    B, N, M, heads, d = 1, 4, 3, 1, 32
    gen = torch.Generator().manual_seed(5)
    q = (1e-3 * torch.randn(B, N, d, generator=gen)).to(kernel_device, dtype)
    kv = torch.randn(B, M, 2 * d, generator=gen)
    kv[:, 0, :d] += 50.0
    kv[:, 1:, :d] -= 25.0
    kv = kv.to(kernel_device, dtype)
    grad_o = torch.zeros(B, N, d)
    grad_lse = torch.ones(B, heads, N)

    def grads(fn, q, kv):
        q, kv = q.detach().clone().requires_grad_(), kv.detach().clone().requires_grad_()
        o, lse = fn(q, kv, heads, 0.3)
        torch.autograd.backward((o, lse), (grad_o.to(o), grad_lse.to(lse)))
        return q.grad, kv.grad

    got = grads(sra_attention, q, kv)
    ref64 = grads(reference_with_lse, q.cpu().double(), kv.cpu().double())
    lowp = grads(reference_with_lse, q.cpu(), kv.cpu())
    for what, y, r, t in zip(("dq", "dkv"), got, ref64, lowp):
        assert_within(what, y.cpu(), r, t, dtype)


def test_backward_is_deterministic(kernel_device):
    q, kv, grad_o = make_inputs(2, 70, 40, 2, 32, torch.float16, kernel_device)
    K = kernels()
    o, lse = K.sra_attention_fwd(q, kv, 2, 0.2)
    first = K.sra_attention_bwd(grad_o, q, kv, o, lse, 2, 0.2, num_splits=2)
    second = K.sra_attention_bwd(grad_o, q, kv, o, lse, 2, 0.2, num_splits=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_opcheck(kernel_device):
    q, kv, grad_o = make_inputs(1, 20, 9, 2, 32, torch.float32, kernel_device)
    torch.library.opcheck(torch.ops.pvt_fast.sra_attention.default, (q.requires_grad_(), kv.requires_grad_(), 2, 0.25))
    o, lse = sra_attention(q.detach(), kv.detach(), 2, 0.25)
    torch.library.opcheck(torch.ops.pvt_fast.sra_attention_backward.default,
                          (grad_o, q.detach(), kv.detach(), o, lse, None, 2, 0.25))


def test_flop_counts(kernel_device):
    """Forward and backward FLOPs are what FlopCounterMode counts on the reference path (its matmuls)."""
    B, N, M, heads, d = 1, 20, 9, 2, 32
    q, kv, _ = make_inputs(B, N, M, heads, d, torch.float32, kernel_device)
    counts = []
    for fn in (attention, attention_reference):
        qi, kvi = q.clone().requires_grad_(), kv.clone().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            fn(qi, kvi, heads, 0.25).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[1] > 0 and counts[0] == counts[1], counts


def test_autocast_casts_both_inputs(kernel_device):
    # A low-precision q with an fp32 kv: both go to the autocast dtype; grads return in each input's dtype.
    amp_dtype = torch.float16
    q, kv, _ = make_inputs(1, 20, 9, 2, 32, torch.float32, kernel_device)
    q = q.to(amp_dtype).requires_grad_()
    kv.requires_grad_()
    with torch.autocast(kernel_device, dtype=amp_dtype):
        out = attention(q, kv, 2, 0.25)
    assert out.dtype == amp_dtype
    out.float().sum().backward()
    assert q.grad.dtype == amp_dtype and kv.grad.dtype == torch.float32
    expected = attention_reference(q.detach().double(), kv.detach().to(amp_dtype).double(), 2, 0.25)
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), rtol=0, atol=2e-3)


def test_torch_compile_fullgraph(kernel_device):
    # Inductor traces the op through its fake impls, forward and backward, and calls the kernels.
    B, N, M, heads, d = 1, 20, 9, 2, 32
    q, kv, _ = make_inputs(B, N, M, heads, d, torch.float32, kernel_device)
    w = torch.randn(heads * d, heads * d, device=kernel_device)

    def block(q, kv):
        return attention(q, kv, heads, d ** -0.5) @ w

    runs = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        qi, kvi = q.clone().requires_grad_(), kv.clone().requires_grad_()
        y = fn(qi, kvi)
        y.square().sum().backward()
        runs.append((y.detach(), qi.grad, kvi.grad))
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_shape,kv_shape,heads,dtypes,match", [
    ((2, 5), (2, 3, 8), 1, None, r"q must be \(B, N, C\), got \(2, 5\)"),
    ((2, 5, 4), (2, 3, 4), 1, None, r"kv must be \(B, M, 2C\) with B == 2 and 2C == 8, got \(2, 3, 4\)"),
    ((2, 5, 4), (3, 3, 8), 1, None, r"kv must be \(B, M, 2C\) with B == 2"),
    ((2, 5, 4), (2, 0, 8), 1, None, r"kv must have at least one key \(M >= 1\), got \(2, 0, 8\)"),
    ((2, 5, 4), (2, 3, 8), 3, None, r"num_heads must divide C = 4, got 3"),
    ((1, 5, 258), (1, 3, 516), 2, None, r"head dim C // num_heads must be <= 128, got 258 // 2 = 129"),
    ((1, 5, 4), (1, 3, 8), 1, (torch.float32, torch.float16), r"kv must have q's dtype torch.float32"),
    ((1, 5, 4), (1, 3, 8), 1, (torch.float64, torch.float64), r"q must be float32, float16 or bfloat16"),
])
def test_input_errors(q_shape, kv_shape, heads, dtypes, match):
    q_dtype, kv_dtype = dtypes or (torch.float32, torch.float32)
    q = torch.zeros(q_shape, dtype=q_dtype)
    kv = torch.zeros(kv_shape, dtype=kv_dtype)
    with pytest.raises(ValueError, match=match):
        attention(q, kv, heads, 1.0)


def test_device_mismatch_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.raises(ValueError, match="kv must be on q's device"):
        attention(torch.zeros(1, 5, 4, device="cuda"), torch.zeros(1, 3, 8), 1, 1.0)


def test_dropout_is_refused():
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        attention(torch.zeros(1, 5, 4), torch.zeros(1, 3, 8), 1, 1.0, dropout_p=0.1)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"):
        attention(torch.zeros(1, 5, 4), torch.zeros(1, 3, 8), 1, 1.0)


def test_interpreter_flag_is_read_at_call_time():
    # Importing the op module must not import Triton kernels (that would fix the interpreter mode).
    import subprocess
    import sys

    code = "import sys, pvt_fast.ops.sra_attention; print('pvt_fast.kernels.sra_attention' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.slow
def test_offsets_past_2_31_elements_gpu():
    """q and o hold more than 2**31 elements (a 4096x4096 image's stage 1 is 2**20 tokens; this is 32x that):
    rows at the far end must be right, which int32 offsets would wrap. Attention is per query row, so the
    reference runs on the last rows only."""
    C, M, tail = 64, 64, 512
    N = 2 ** 31 // C + 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, N, C, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(1, M, 2 * C, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = attention(q, kv, 1, C ** -0.5)
    want = torch.softmax(q[:, -tail:].double() @ kv[..., :C].double().transpose(1, 2) * C ** -0.5, -1) @ kv[..., C:].double()
    err = ((out[:, -tail:].double() - want).norm() / want.norm()).item()
    assert err < 1e-2, f"relative error {err:.2e} in the last {tail} rows"


@pytest.mark.parametrize("triton_version, numpy_version, fails", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.8.0", "2.4.6", False)])
def test_interpreter_version_guard(monkeypatch, triton_version, numpy_version, fails):
    """Triton 3.6's interpreter cannot run runtime-bound loops on numpy >= 2.4: a clear error instead of
    'only 0-dimensional arrays can be converted to Python scalars' from every kernel."""
    import numpy
    import triton

    import pvt_fast.kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if fails:
        with pytest.raises(ImportError, match=r"triton 3\.6\.0 needs numpy < 2\.4.*found numpy 2\.4\.6"):
            pvt_fast.kernels._check_interpreter()
    else:
        pvt_fast.kernels._check_interpreter()


@pytest.mark.parametrize("M", [20, 90])
@pytest.mark.parametrize("dtype,d", [(torch.float16, 32), (torch.float32, 48)], ids=["fp16-d32", "fp32-d48"])
def test_plans_for_a_large_gpu(kernel_device, monkeypatch, M, dtype, d):
    """The narrow query blocks and the many dK/dV splits a GPU with many SMs gets for a small problem (fp32
    with "highest" precision: the 16-query exact-fp32 blocks, 32 being the default)."""
    K = kernels()
    monkeypatch.setattr(K, "num_sms", lambda device: 1 << 16)
    cfg, _ = K.forward_plan(K.Problem(1, 150, M, 2 * d, 2, dtype), 1 << 16)
    assert cfg.block_n == (16 if dtype == torch.float32 else 64)
    check_random(1, 150, M, 2, d, dtype, kernel_device)
