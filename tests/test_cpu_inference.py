"""The ``sdpa`` backend's CPU inference path (oneDNN linear and depthwise conv + GELU): the same numbers as
float64 PyTorch, taken only where nothing needs gradients or autocast."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import pvt_fast
from pvt_fast.ops import eager
from helpers import assert_close_rel


def _ops_run(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape, out, bias", [((2, 37, 24), 40, True), ((1, 5, 64), 7, False), ((3, 1, 9), 128, True)])
def test_linear_matches_float64(shape, out, bias, residual):
    x = torch.randn(*shape)
    w = torch.randn(out, shape[-1]) / shape[-1] ** 0.5
    b = torch.randn(out) if bias else None
    shortcut = torch.randn(*shape[:-1], out) if residual else None
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    if residual:
        want = want + shortcut.double()
    with torch.inference_mode():
        got = eager.linear_sdpa(x, w, b, shortcut)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: eager.linear_sdpa(x, w, b, shortcut))
    assert_close_rel(got, want, 1e-6)


@pytest.mark.parametrize("B, H, W, C, relu", [(2, 7, 9, 24, False), (1, 1, 5, 16, True), (1, 13, 1, 40, False)])
def test_dwconv_gelu_matches_float64(B, H, W, C, relu):
    x = torch.randn(B, H * W, C)
    w, b = torch.randn(C, 1, 3, 3) / 3, torch.randn(C)
    grid = (F.relu(x) if relu else x).double().reshape(B, H, W, C).permute(0, 3, 1, 2)
    want = F.gelu(F.conv2d(grid, w.double(), b.double(), padding=1, groups=C)).flatten(2).transpose(1, 2)
    with torch.no_grad():
        got = eager.dwconv_gelu_sdpa(x, H, W, w, b, relu)
        assert "mkldnn::_convolution_pointwise" in _ops_run(lambda: eager.dwconv_gelu_sdpa(x, H, W, w, b, relu))
    assert_close_rel(got, want, 1e-6)


def test_training_autocast_and_plain_tensors_keep_pytorch_ops():
    model = pvt_fast.pvt_v2_b0(backend="sdpa", depths=(1, 1, 1, 1))
    x = torch.randn(1, 3, 64, 64)
    seen = _ops_run(lambda: model(x).sum().backward())
    assert "aten::addmm" in seen and not any(n.startswith("mkldnn::") for n in seen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        seen = _ops_run(lambda: model(x))
    assert not any(n.startswith("mkldnn::") for n in seen)
    with torch.no_grad():
        assert any(n.startswith("mkldnn::_linear") for n in _ops_run(lambda: model(x)))
