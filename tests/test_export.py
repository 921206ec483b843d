"""Export with dynamic image sizes: ``torch.onnx.export(..., dynamo=True)`` run by ONNX Runtime, and
``torch.export.export``, against the eager ``reference`` backend at sizes other than the export size.

CI exports the small variants with one block per stage (``depths=(1, 1, 1, 1)``: the same code paths, a
quarter of the graph); every factory at its own depth runs with --runslow.
"""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import pvt_fast
from pvt_fast.models import CONFIGS
from pvt_fast.ops import eager
from helpers import assert_close_rel

SHALLOW = dict(depths=(1, 1, 1, 1))
TOL = 1e-5  # fp32 ONNX Runtime / exported program vs eager reference (issue 11 asks < 1e-4)


def build(name, backend="sdpa", **kwargs):
    """``name`` on ``backend`` with the weights of the reference model, which is returned too."""
    torch.manual_seed(0)
    ref = pvt_fast.create_model(name, backend="reference", **kwargs).eval()
    model = pvt_fast.create_model(name, backend=backend, **kwargs).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def onnx_session(model, path, example, dynamic=True):
    """``model`` exported as a user would (dynamic batch, H and W as named strings) and loaded by ONNX Runtime."""
    shapes = {"x": {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=shapes, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(result):
    return list(result) if isinstance(result, (list, tuple)) else [result]


def check_onnx(session, ref, sizes):
    """ONNX Runtime against the eager reference at every (batch, H, W) in ``sizes``."""
    for batch, H, W in sizes:
        x = torch.randn(batch, 3, H, W)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = outputs(ref(x))
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close_rel(torch.from_numpy(g), w, TOL, f"ONNX output {i} at {batch}x{H}x{W}")


def sizes_for(model, export_size):
    """The export size, square, non-square and odd sizes, and the smallest input (square and not)."""
    m = model.min_input_size
    return [(2, *export_size), (1, 96, 96), (3, 77, 45), (1, 45, 98), (1, m, m), (2, m + 5, m)]


# --- ONNX ------------------------------------------------------------------------------------------------


ONNX_CASES = {  # id -> (factory, backend, kwargs)
    "tiny": ("pvt_tiny", "sdpa", dict(img_size=64)),  # exported at its construction size (no resize there)
    "b2_li": ("pvt_v2_b2_li", "sdpa", {}),  # adaptive 7x7 pool
    "b0-fused-features": ("pvt_v2_b0", "fused", dict(out_indices=(0, 1, 2, 3))),  # fused ops as sdpa composites
}


@pytest.fixture(scope="module", params=list(ONNX_CASES))
def onnx_case(request, tmp_path_factory):
    name, backend, kwargs = ONNX_CASES[request.param]
    ref, model = build(name, backend, **SHALLOW, **kwargs)
    session = onnx_session(model, tmp_path_factory.mktemp("onnx") / "model.onnx", torch.randn(2, 3, 64, 64))
    return ref, model, session


def test_onnx_dynamic_sizes_match_eager(onnx_case):
    ref, model, session = onnx_case
    assert [d for d in session.get_inputs()[0].shape] == ["batch", 3, "height", "width"]
    check_onnx(session, ref, sizes_for(model, (64, 64)))


def test_onnx_below_min_input_size_is_an_error(onnx_case):
    """No input check survives export, but the graph itself cannot run below the smallest input (v2-li's
    smallest input is 1 pixel)."""
    _, model, session = onnx_case
    m = model.min_input_size
    if m == 1:
        pytest.skip("every size runs")
    with pytest.raises(Exception, match="Conv|Resize"):
        session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, m - 1, m), np.float32)})


def test_onnx_static_export_refuses_other_sizes(tmp_path):
    """Exported without dynamic shapes: a fixed-size model, which ONNX Runtime says when fed another size."""
    _, model = build("pvt_v2_b0", **SHALLOW)
    session = onnx_session(model, tmp_path / "model.onnx", torch.randn(2, 3, 64, 64), dynamic=False)
    assert session.get_inputs()[0].shape == [2, 3, 64, 64]
    with pytest.raises(Exception, match="index: 3 Got: 72 Expected: 64"):
        session.run(None, {session.get_inputs()[0].name: np.zeros((2, 3, 64, 72), np.float32)})


def test_dynamic_channels_is_an_error():
    """The patch embedding's weights fix the channel count. (``torch.onnx.export`` given ``Dim`` objects
    retries with other capture strategies and then exports a fixed channel count, which ONNX Runtime enforces.)"""
    _, model = build("pvt_v2_b0", **SHALLOW)
    with pytest.raises(ValueError, match=r"channel dimension \(dim 1\) cannot be dynamic.*fix it to 3"):
        torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes={"x": {1: Dim("channels")}})


# --- torch.export ------------------------------------------------------------------------------------------


AUTO = {"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}


def torch_export_min_size(model):
    """The smallest side at which every stage's token grid and every conv-reduced key grid has 2+ cells a side.

    torch.export traces with sizes of 2+ (its 0/1 specialization) and the program it returns asserts that the
    grids it traced that way stay so: 64 px for v1, 61 for v2 (stage 1's 8x8 reduction), 33 for v2-li."""
    n = 1
    while True:
        side, ok = n, True
        for i in range(model.num_stages):
            side = getattr(model, f"patch_embed{i + 1}").output_size(side, side)[0]
            attn = getattr(model, f"block{i + 1}")[0].attn
            keys = side // attn.sr_ratio if not attn.linear else 7
            ok = ok and side >= 2 and keys >= 2
        if ok:
            return n
        n += 1


@pytest.mark.parametrize("name, backend, kwargs", [
    ("pvt_tiny", "sdpa", dict(img_size=64, out_indices=(1, 3))),
    ("pvt_v2_b2_li", "fused", {}),
    ("pvt_v2_b0", "sdpa", {}),
], ids=["tiny-features", "b2_li-fused", "b0"])
def test_torch_export_dynamic_sizes_match_eager(name, backend, kwargs):
    ref, model = build(name, backend, **SHALLOW, **kwargs)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=AUTO)
    assert not any(str(n.target).startswith("pvt_fast.") for n in program.graph.nodes if n.op == "call_function")
    m = torch_export_min_size(model)
    assert m == {"pvt_tiny": 64, "pvt_v2_b0": 61, "pvt_v2_b2_li": 33}[name]
    run = program.module()
    for batch, H, W in [(2, 64, 64), (1, 96, 96), (3, m + 13, m + 2), (1, m, m)]:
        x = torch.randn(batch, 3, H, W)
        with torch.no_grad():
            for i, (g, w) in enumerate(zip(outputs(run(x)), outputs(ref(x)))):
                assert_close_rel(g, w, TOL, f"exported output {i} at {batch}x{H}x{W}")
    for H, W in [(m - 1, m), (m, m - 1)]:
        with pytest.raises(AssertionError, match="Guard failed"):
            run(torch.randn(1, 3, H, W))


# --- the exportable pieces -------------------------------------------------------------------------------


class _Pool(torch.nn.Module):
    def forward(self, x):
        return eager.adaptive_avg_pool2d(x, 7)


def test_exported_adaptive_pool_follows_the_input_size():
    """The pool's windows come from the traced size: exported once, exact (float64) at every other size,
    including sizes below 7 (overlapping windows) and odd, non-divisible ones."""
    program = torch.export.export(_Pool(), (torch.randn(2, 3, 56, 56, dtype=torch.float64),),
                                  dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}})
    run = program.module()
    for H, W in [(56, 56), (20, 12), (7, 7), (13, 9), (5, 3), (2, 29), (100, 71)]:
        x = torch.randn(2, 3, H, W, dtype=torch.float64)
        torch.testing.assert_close(run(x), F.adaptive_avg_pool2d(x, 7), rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"at {H}x{W}: {m}")


def test_eager_adaptive_pool_is_pytorchs():
    x = torch.randn(2, 5, 20, 13).permute(0, 1, 3, 2)
    assert torch.equal(eager.adaptive_avg_pool2d(x, 7), F.adaptive_avg_pool2d(x, 7))


@pytest.mark.parametrize("grid", [(56, 56), (14, 20), (1, 1), (1, 5)])
def test_pos_embed_resize_to_its_own_grid_is_exact(grid):
    from pvt_fast.models.pvt import resize_pos_embed

    pos = torch.randn(1, grid[0] * grid[1], 64) * 100
    assert torch.equal(resize_pos_embed(pos, grid, grid), pos)


# --- every factory (slow) -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_factory_exports_to_onnx(name, tmp_path):
    ref, model = build(name)
    session = onnx_session(model, tmp_path / "model.onnx", torch.randn(2, 3, 224, 224))
    check_onnx(session, ref, [(2, 224, 224), (1, 320, 256), (1, 97, 131), (1, model.min_input_size, 61)])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_factory_exports_with_torch_export(name):
    ref, model = build(name, out_indices=(0, 1, 2, 3))
    program = torch.export.export(model, (torch.randn(2, 3, 224, 224),), dynamic_shapes=AUTO)
    run = program.module()
    for batch, H, W in [(1, 320, 256), (2, 97, 131)]:
        x = torch.randn(batch, 3, H, W)
        with torch.no_grad():
            for i, (g, w) in enumerate(zip(run(x), ref(x))):
                assert_close_rel(g, w, TOL, f"stage {i + 1} at {batch}x{H}x{W}")
