"""Whole models on the fused backend against the reference backend: forward and every parameter gradient.
On CPU this runs the Triton kernels under TRITON_INTERPRET=1 (tiny inputs)."""
import pytest
import torch
import torch.nn.functional as F

import pvt_fast
from helpers import assert_close


def pair(name, device, **kwargs):
    torch.manual_seed(0)
    ref = pvt_fast.create_model(name, backend="reference", num_classes=10, **kwargs).to(device)
    fused = pvt_fast.create_model(name, backend="fused", num_classes=10, **kwargs).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("name, size", [("pvt_tiny", (64, 72)), ("pvt_v2_b0", (61, 64)), ("pvt_v2_b2_li", (29, 35))])
def test_fused_model_matches_reference(name, size, kernel_device):
    ref, fused = pair(name, kernel_device)
    x = torch.randn(2, 3, *size, device=kernel_device)
    target = torch.randint(0, 10, (2,), device=kernel_device)
    outs = []
    for model in (ref, fused):
        out = model(x)
        F.cross_entropy(out, target).backward()
        outs.append(out)
    assert_close(outs[1], outs[0], atol_of_max=1e-5, what="logits")
    for (n, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, atol_of_max=1e-4, what=f"grad of {n}")


def test_fused_pyramid_matches_reference(kernel_device):
    ref, fused = pair("pvt_v2_b0", kernel_device, out_indices=(0, 1, 2, 3))
    x = torch.randn(1, 3, 64, 64, device=kernel_device)
    with torch.no_grad():
        for got, want in zip(fused(x), ref(x)):
            assert_close(got, want, atol_of_max=1e-5, what="stage map")


def test_attn_dropout_routes_to_sdpa(kernel_device):
    from pvt_fast.ops import eager
    model = pvt_fast.pvt_v2_b0(backend="fused", attn_drop_rate=0.1)
    assert model.block1[0].attn._ops.attention is eager.attention_sdpa
    plain = pvt_fast.pvt_v2_b0(backend="fused")
    assert plain.block1[0].attn._ops.attention is not eager.attention_sdpa


def test_fused_model_compiles_without_graph_breaks(kernel_device):
    ref, fused = pair("pvt_v2_b0", kernel_device)
    x = torch.randn(1, 3, 64, 64, device=kernel_device)
    out = torch.compile(fused, fullgraph=True)(x)
    out.square().sum().backward()
    want = ref(x)
    want.square().sum().backward()
    assert_close(out.detach(), want.detach(), atol_of_max=1e-5, what="compiled logits")
    for (n, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, atol_of_max=1e-4, what=f"grad of {n}")
