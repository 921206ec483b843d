"""pvt_fast::patch_embed: the composite (CPU), the op's contract, the CUDA extension's build products
(SASS, register use, the CMake host test of the kernel's core) and, on a GPU, the kernel itself."""
import importlib.util
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pvt_fast.ops import patch_embed as pe
from helpers import assert_close

REPO = Path(__file__).resolve().parents[1]

# name, B, Cin, H, W, Cout, k, stride, padding
GEOMETRIES = [
    ("v1-stage1-k4s4", 2, 3, 13, 9, 64, 4, 4, 0),
    ("v1-stage1-aligned", 1, 3, 16, 20, 32, 4, 4, 0),
    ("v1-later-k2s2", 2, 8, 11, 7, 37, 2, 2, 0),
    ("v2-stage1-k7s4p3", 2, 3, 13, 9, 16, 7, 4, 3),
    ("v2-later-k3s2p1", 1, 6, 9, 10, 24, 3, 2, 1),
    ("pad-exceeds-window", 1, 2, 5, 4, 8, 3, 1, 2),
]
GEOMETRY_IDS = [g[0] for g in GEOMETRIES]


def _make_inputs(B, Cin, H, W, Cout, k, layout, dtype=torch.float32, param_dtype=None, device="cpu", seed=0):
    """x as the layout expects (the nhwc grid is the channels-last view of an image), conv and norm params."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(B, Cin, H, W, generator=gen)
    if layout == "nhwc":
        x = image.to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    else:
        x = image
    weight = torch.randn(Cout, Cin, k, k, generator=gen) * (Cin * k * k) ** -0.5
    bias = torch.randn(Cout, generator=gen) * 0.5
    norm_weight = 1 + 0.2 * torch.randn(Cout, generator=gen)
    norm_bias = 0.1 * torch.randn(Cout, generator=gen)
    param_dtype = param_dtype or dtype
    return (x.to(device=device, dtype=dtype), weight.to(device=device, dtype=param_dtype),
            bias.to(device=device, dtype=param_dtype), norm_weight.to(device=device, dtype=param_dtype),
            norm_bias.to(device=device, dtype=param_dtype))


def _reference(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    """Conv + bias + LayerNorm in float64 from x's values and the weight rounded to x's dtype."""
    image = x.permute(0, 3, 1, 2) if layout == "nhwc" else x
    y = F.conv2d(image.double(), weight.to(x.dtype).double(), bias.double(), stride, padding)
    return F.layer_norm(y.flatten(2).transpose(1, 2), (weight.shape[0],), norm_weight.double(),
                        norm_bias.double(), eps)


# --- the composite (every device without the CUDA kernel) ---------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_composite_matches_conv_layernorm(geometry, layout):
    _, B, Cin, H, W, Cout, k, s, p = geometry
    args = _make_inputs(B, Cin, H, W, Cout, k, layout)
    tokens, Ho, Wo = pe.patch_embed(*args, 1e-6, s, p, layout)
    assert (Ho, Wo) == ((H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1)
    assert tokens.shape == (B, Ho * Wo, Cout) and tokens.dtype == torch.float32 and tokens.is_contiguous()
    assert_close(tokens, _reference(*args, s, p, 1e-6, layout), atol=1e-5, rtol=1e-5, what="composite fp32")


def test_composite_bf16_input_fp32_params():
    """Autocast's situation: bf16 activations, fp32 weights; output in bf16."""
    args = _make_inputs(2, 8, 11, 7, 40, 2, "nhwc", dtype=torch.bfloat16, param_dtype=torch.float32)
    tokens, _, _ = pe.patch_embed(*args, 1e-5, 2, 0, "nhwc")
    assert tokens.dtype == torch.bfloat16
    assert_close(tokens, _reference(*args, 2, 0, 1e-5, "nhwc"), atol=1e-2, rtol=1e-2, what="composite bf16")


def test_strided_input():
    """Any strides: a channels-last image read as "nchw" and a sliced grid read as "nhwc"."""
    x, weight, bias, nw, nb = _make_inputs(2, 5, 14, 10, 24, 2, "nchw")
    x_cl = x.to(memory_format=torch.channels_last)
    assert_close(pe.patch_embed(x_cl, weight, bias, nw, nb, 1e-5, 2, 0, "nchw")[0],
                 _reference(x, weight, bias, nw, nb, 2, 0, 1e-5, "nchw"), atol=1e-5, rtol=1e-5,
                 what="channels-last nchw")
    grid = torch.randn(2, 14, 12, 5)[:, :, 1:11]
    assert_close(pe.patch_embed(grid, weight, bias, nw, nb, 1e-5, 2, 0, "nhwc")[0],
                 _reference(grid, weight, bias, nw, nb, 2, 0, 1e-5, "nhwc"), atol=1e-5, rtol=1e-5, what="sliced nhwc")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gradients_match_autograd_of_conv_layernorm(layout):
    B, Cin, H, W, Cout, k, s, p = 2, 4, 9, 11, 20, 3, 2, 1
    args = [t.requires_grad_() for t in _make_inputs(B, Cin, H, W, Cout, k, layout)]
    grad_out = torch.randn(B, ((H + 2 * p - k) // s + 1) * ((W + 2 * p - k) // s + 1), Cout)
    grads = torch.autograd.grad(pe.patch_embed(*args, 1e-5, s, p, layout)[0], args, grad_out)
    leaves = [t.detach().double().requires_grad_() for t in args]
    ref_grads = torch.autograd.grad(_reference(*leaves, s, p, 1e-5, layout), leaves, grad_out.double())
    for name, g, r in zip(("x", "weight", "bias", "norm_weight", "norm_bias"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck(layout):
    args = _make_inputs(2, 3, 13, 9, 16, 3, layout)
    torch.library.opcheck(torch.ops.pvt_fast.patch_embed.default, (*args, 2, 1, 1e-5, layout))
    grad_args = tuple(t.clone().requires_grad_() for t in args)
    torch.library.opcheck(torch.ops.pvt_fast.patch_embed.default, (*grad_args, 2, 1, 1e-5, layout))


def test_out_variant_writes_every_element():
    args = _make_inputs(2, 3, 13, 9, 16, 4, "nchw")
    out = torch.full((2, 6, 16), float("nan"))
    torch.ops.pvt_fast._patch_embed_out(*args, 4, 0, 1e-5, "nchw", out)
    assert_close(out, _reference(*args, 4, 0, 1e-5, "nchw"), atol=1e-5, rtol=1e-5, what="out variant")
    with pytest.raises(ValueError, match=r"out must be a \(B, Ho\*Wo, Cout\) == \(2, 6, 16\)"):
        torch.ops.pvt_fast._patch_embed_out(*args, 4, 0, 1e-5, "nchw", torch.empty(2, 6, 15))


def test_autocast_casts_the_input():
    """Under autocast the conv reads x and the weight rounded to bf16 (as autocast's conv2d does) and writes
    bf16: against the float64 result of the rounded inputs, only the output's rounding is left."""
    args = _make_inputs(1, 3, 16, 12, 32, 4, "nchw")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, _, _ = pe.patch_embed(*args, 1e-5, 4, 0, "nchw")
    assert tokens.dtype == torch.bfloat16
    rounded = [args[0].bfloat16(), args[1].bfloat16(), *args[2:]]
    ref = _reference(*rounded, 4, 0, 1e-5, "nchw")
    err = (tokens.double() - ref).norm() / ref.norm()
    assert err <= 2 * (ref.bfloat16().double() - ref).norm() / ref.norm(), f"relative error {err:.2e}"


def test_flop_formula():
    """The op's FLOPs are what FlopCounterMode counts on the reference path (its convolution)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pvt_fast.ops.eager import patch_embed_reference

    args = _make_inputs(2, 6, 9, 10, 24, 3, "nhwc")
    counts = []
    for fn in (pe.patch_embed, patch_embed_reference):
        with FlopCounterMode(display=False) as counter:
            fn(*args, 1e-5, 2, 1, "nhwc")
        counts.append(counter.get_total_flops())
    assert counts[1] > 0 and counts[0] == counts[1], counts


def _bad_call(**overrides):
    args = dict(zip(("x", "weight", "bias", "norm_weight", "norm_bias"), _make_inputs(2, 3, 13, 9, 16, 4, "nchw")))
    args.update(eps=1e-5, stride=4, padding=0, layout="nchw")
    args.update(overrides)
    return pe.patch_embed(**args)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(layout="nhw"), ValueError, r'layout must be "nchw" or "nhwc", got \'nhw\''),
    (dict(x=torch.randn(3, 13, 9)), ValueError, r'x must be \(B, Cin, H, W\) for layout "nchw", got \(3, 13, 9\)'),
    (dict(x=torch.randn(2, 4, 13, 9)), ValueError,
     r'x must be \(B, Cin, H, W\) with Cin == weight.shape\[1\] == 3 for layout "nchw", got \(2, 4, 13, 9\)'),
    (dict(layout="nhwc"), ValueError,
     r'x must be \(B, H, W, Cin\) with Cin == weight.shape\[1\] == 3 for layout "nhwc", got \(2, 3, 13, 9\)'),
    (dict(weight=torch.randn(16, 3, 4, 3)), ValueError,
     r"weight must be \(Cout, Cin, k, k\) with a square kernel and no empty dimension, got \(16, 3, 4, 3\)"),
    (dict(weight=torch.randn(16, 0, 4, 4), x=torch.randn(2, 0, 13, 9)), ValueError,
     r"weight must be \(Cout, Cin, k, k\) with a square kernel and no empty dimension, got \(16, 0, 4, 4\)"),
    (dict(bias=torch.randn(15)), ValueError, r"bias must be \(Cout,\) == \(16,\), got \(15,\)"),
    (dict(norm_bias=torch.randn(16, 1)), ValueError, r"norm_bias must be \(Cout,\) == \(16,\), got \(16, 1\)"),
    (dict(x=torch.randn(2, 3, 13, 9).double()), TypeError,
     r"x must be float32, float16 or bfloat16, got torch.float64"),
    (dict(weight=torch.randn(16, 3, 4, 4).half()), TypeError,
     r"weight must have x's dtype \(torch.float32\) or float32, got torch.float16"),
    (dict(norm_weight=torch.randn(16).bfloat16()), TypeError,
     r"bias, norm_weight and norm_bias must share one dtype"),
    (dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
    (dict(x=torch.randn(2, 3, 3, 9)), ValueError, r"x's padded size \(3, 9\) must be at least the kernel size 4"),
    (dict(bias=torch.randn(16, device="meta")), ValueError, r"bias must be on x's device cpu, got meta"),
])
def test_bad_inputs_are_named(overrides, error, message):
    with pytest.raises(error, match=message):
        _bad_call(**overrides)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(pe, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pe._warn_fallback_once()
        pe._warn_fallback_once()
    assert len(caught) == 1 and "PyTorch composite" in str(caught[0].message)


# --- build products: the CMake host test, SASS and register use --------------------------------------


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    """csrc/ built with CMake (plain C++: the kernel's core, no nvcc): the build directory."""
    if shutil.which("cmake") is None or shutil.which("ctest") is None:
        pytest.skip("cmake not installed")
    build = tmp_path_factory.mktemp("cmake") / "build"
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build)], ["cmake", "--build", str(build), "-j2"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return build


def test_cmake_host_test(host_build):
    """csrc/tests/patch_embed_host_test.cpp drives the kernel's tile functions over whole problems."""
    result = subprocess.run(["ctest", "--test-dir", str(host_build), "--output-on-failure"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"ctest failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


# (B, Cin, H, W, Cout, k, s, p, layout): resident and streamed plans, both layouts, Cout 320 and 1024, each
# at least three tiles (the emulation runs three blocks; the launcher never starts more blocks than tiles),
# and make_plan's choice where that is a split plan (the stage-4 case, among others).
TRAFFIC_CASES = [(2, 3, 64, 56, 64, 7, 4, 3, "nchw"), (2, 3, 72, 64, 64, 4, 4, 0, "nchw"),
                 (1, 64, 11, 9, 128, 3, 2, 1, "nhwc"), (1, 128, 7, 9, 320, 2, 2, 0, "nhwc"),
                 (1, 16, 6, 6, 1024, 2, 2, 0, "nhwc"), (1, 320, 16, 16, 512, 3, 2, 1, "nhwc")]
# (case, (warps, bm, bn), splits wanted): split plans forced, with tails in tokens, chunks and channels (Cout
# 136: npad 144 in two 128-channel blocks).
SPLIT_TRAFFIC_CASES = [((1, 128, 7, 9, 320, 2, 2, 0, "nhwc"), (4, 64, 64), 3),
                       ((2, 3, 67, 53, 64, 7, 4, 3, "nchw"), (8, 128, 64), 2),
                       ((1, 320, 9, 7, 512, 3, 2, 1, "nhwc"), (16, 64, 256), 4),
                       ((2, 20, 13, 9, 136, 3, 2, 1, "nhwc"), (16, 128, 128), 8)]
_PLAN_FIELDS = ("bm", "bn", "npad", "bk", "chunks", "chunks_per_split", "splits", "col_blocks", "row_tiles", "tiles",
                "partial", "vec", "warps")
_COUNTED = ("x", "weight", "out", "workspace_stored", "workspace_loaded")


def _host_json(host_build, *args):
    import json

    result = subprocess.run([str(host_build / "patch_embed_host_test"), *map(str, args)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_plan_matches(measured, plan):
    assert {k: measured[k] for k in _PLAN_FIELDS} == {k: getattr(plan, k) for k in _PLAN_FIELDS}
    assert measured["smem"] == plan.smem_bytes


def _case_id(c):
    return "x".join(map(str, c[:8])) + c[8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRAFFIC_CASES, ids=_case_id)
def test_traffic_model_matches_the_kernel_core(host_build, case, dtype):
    """pvt_fast.kernels.patch_embed_cuda (the traffic model's Python mirror of the plan) against the C++ plan,
    and its element counts against what the host test's emulation of three blocks reads and writes."""
    from pvt_fast.kernels import patch_embed_cuda as pe_model

    p = pe_model.Problem(*case, dtype)
    measured = _host_json(host_build, "--traffic", *case, p.elem, 3)
    plan = pe_model.plan(p)
    _assert_plan_matches(measured, plan)
    counts = pe_model.counts(p, blocks=3)
    assert {k: measured[k] for k in _COUNTED} == {k: counts[k] for k in _COUNTED}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case, shape, splits", SPLIT_TRAFFIC_CASES, ids=lambda c: _case_id(c) if isinstance(c, tuple)
                         and len(c) == 9 else None)
def test_split_plan_traffic_matches_the_kernel_core(host_build, case, shape, splits, dtype):
    """Split plans forced: plan and counts (x per column block, weight per row tile, the workspace written
    once and read once) against the emulation of both kernels on three blocks each."""
    from pvt_fast.kernels import patch_embed_cuda as pe_model

    p = pe_model.Problem(*case, dtype)
    measured = _host_json(host_build, "--traffic", *case, p.elem, 3, *shape, splits)
    plan = pe_model.split_plan(p, shape, splits)
    assert plan.partial and measured["partial"]
    _assert_plan_matches(measured, plan)
    assert (measured["norm_bm"], measured["norm_tiles"], measured["norm_smem"]) == tuple(
        getattr(pe_model.norm_plan(p, plan), k) for k in ("bm", "tiles", "smem_bytes"))
    counts = pe_model.counts(p, blocks=3, pl=plan)
    assert {k: measured[k] for k in _COUNTED} == {k: counts[k] for k in _COUNTED}


def test_plan_choice_matches_the_kernel_core(host_build):
    """make_plan (C++) and plan() (Python) pick the same plan, with the same estimate, at every benchmark
    shape: the C++ chooser's constants and formula are the traffic model's."""
    from pvt_fast.kernels import patch_embed_cuda as pe_model
    from pvt_fast.kernels import traffic

    split = 0
    for model in traffic.MODELS:
        for side, batch in traffic.POINTS:
            for st in traffic.stages(model, side, batch):
                for dtype in traffic.DTYPES:
                    p = pe_model.Problem.for_stage(st, dtype)
                    for kind in ("auto", "fused", "split"):
                        measured = _host_json(host_build, "--plan", p.B, p.cin, p.H, p.W, p.cout, p.k, p.s, p.p,
                                              p.layout, p.elem, kind)
                        plan = pe_model.plan(p, kind)
                        _assert_plan_matches(measured, plan)
                        assert measured["seconds"] == pytest.approx(pe_model.estimated_seconds(p, plan), rel=1e-12)
                        assert plan.partial == (kind == "split") or kind == "auto"
                    split += pe_model.plan(p).partial
    assert split >= 8  # stages 3 and 4 of both models in bf16 take split plans


def _cuobjdump():
    try:
        import triton
    except ImportError:
        pytest.skip("triton (which ships cuobjdump) is not installed")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"cuobjdump not found at {tool}")
    return str(tool)


def _extension_path():
    if not pe.extension_loaded():
        pytest.skip(f"the CUDA extension is not built: {pe._EXTENSION_ERROR}")
    return importlib.util.find_spec("pvt_fast._C").origin


def _kernels_by_arch(text):
    """{(arch, mangled kernel name): SASS} from `cuobjdump -sass`."""
    kernels, arch, name = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch, name = m.group(1), None
        elif m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1)
            kernels[(arch, name)] = []
        elif name is not None:
            kernels[(arch, name)].append(line)
    return {key: "\n".join(lines) for key, lines in kernels.items() if "patch_embed_kernel" in key[1]}


def test_extension_registers_the_cuda_kernels():
    _extension_path()
    for op in ("pvt_fast::patch_embed", "pvt_fast::_patch_embed_out"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), torch._C._dispatch_dump(op)


def test_sass_uses_tensor_cores_for_half_types():
    sass = subprocess.run([_cuobjdump(), "-sass", _extension_path()], capture_output=True, text=True, check=True).stdout
    kernels = _kernels_by_arch(sass)
    archs = {arch for arch, _ in kernels}
    assert archs and all(int(a[3:]) >= 80 for a in archs), f"expected sm_80+ code, got {sorted(archs)}"
    for (arch, name), code in kernels.items():
        hmma = re.findall(r"HMMA\.\S+", code)
        if "__nv_bfloat16" in name:
            assert any(".BF16" in h for h in hmma), f"{arch} {name}: no bf16 HMMA"
        elif "__half" in name:
            assert hmma, f"{arch} {name}: no HMMA"
    assert sum("__nv_bfloat16" in n for _, n in kernels) >= len(archs) and \
        sum("__half" in n for _, n in kernels) >= len(archs), sorted(kernels)


def test_built_kernels_do_not_spill():
    usage = subprocess.run([_cuobjdump(), "-res-usage", _extension_path()], capture_output=True, text=True,
                           check=True).stdout
    lines = re.findall(r"Function (\S*patch_embed_\w*kernel\S*):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)",
                       usage)
    assert any("norm_kernel" in name for name, _ in lines), usage[-2000:]
    assert any("norm" not in name for name, _ in lines), usage[-2000:]
    for name, resources in lines:
        assert "STACK:0 " in resources and "LOCAL:0" in resources, f"{name}: {resources}"


def _nvcc():
    candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    nvcc = shutil.which("nvcc") or (str(candidate) if candidate.exists() else None)
    if nvcc is None:
        pytest.skip("nvcc not found")
    return nvcc


def test_ptxas_reports_no_spills(tmp_path):
    """Compiles csrc/patch_embed.cu as setup.py does (torch's half-conversion defines) for sm_80 and sm_90."""
    cmd = [_nvcc(), "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v", "-c",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "-I", str(REPO / "csrc"), str(REPO / "csrc" / "patch_embed.cu"),
           "-o", str(tmp_path / "patch_embed.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    # every instantiation (conv tiles: 3 dtypes x 2 vector widths; norm pass: 3 dtypes), both architectures
    assert len(spills) >= 2 * 9, result.stderr[-4000:]
    assert all(s == ("0", "0") for s in spills), result.stderr[-4000:]


# --- the CUDA kernel ---------------------------------------------------------------------------------

CUDA_GEOMETRIES = [
    # name, B, Cin, H, W, Cout, k, stride, padding, layout
    ("v1-stage1-tails", 2, 3, 61, 45, 64, 4, 4, 0, "nchw"),
    ("v1-stage1-vector", 2, 3, 32, 40, 64, 4, 4, 0, "nchw"),
    ("v1-stage2", 2, 64, 19, 15, 128, 2, 2, 0, "nhwc"),
    ("v1-stage3-streamed", 1, 128, 13, 11, 320, 2, 2, 0, "nhwc"),
    ("v2-stage1", 2, 3, 67, 53, 64, 7, 4, 3, "nchw"),
    ("v2-stage2", 1, 64, 29, 23, 128, 3, 2, 1, "nhwc"),
    ("v2-stage4-streamed", 1, 320, 9, 7, 512, 3, 2, 1, "nhwc"),
    ("v2-stage4-split", 1, 320, 64, 64, 512, 3, 2, 1, "nhwc"),  # split plans: fp32, bf16 and fp16
    ("v2-stage3-split", 2, 128, 30, 26, 320, 3, 2, 1, "nhwc"),
    ("cout-1024", 1, 16, 6, 10, 1024, 2, 2, 0, "nhwc"),
    ("odd-cout-odd-cin", 3, 5, 13, 9, 37, 3, 2, 1, "nhwc"),
    ("batch1-one-token", 1, 3, 4, 4, 48, 4, 4, 0, "nchw"),
]
# Output rounding dominates: bf16 keeps 8 significant bits, fp16 11; fp32 accumulates in fp32.
CUDA_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


def _run_kernel_poisoned(args, stride, padding, eps, layout):
    x, weight = args[0], args[1]
    H, W = (x.shape[2], x.shape[3]) if layout == "nchw" else (x.shape[1], x.shape[2])
    Ho, Wo = pe.output_size(H, W, weight.shape[2], stride, padding)
    out = torch.full((x.shape[0], Ho * Wo, weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    torch.ops.pvt_fast._patch_embed_out(*args, stride, padding, eps, layout, out)
    return out


def _require_kernel():
    if not pe.extension_loaded():
        pytest.fail(f"GPU present but the CUDA extension is not built: {pe._EXTENSION_ERROR}")


@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["auto", "fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("geometry", CUDA_GEOMETRIES, ids=[g[0] for g in CUDA_GEOMETRIES])
def test_cuda_kernel_matches_reference(geometry, dtype, plan, monkeypatch):
    """Every geometry on make_plan's choice, on the fused plan and on a split plan (PVT_FAST_PATCH_EMBED_PLAN;
    Cout under 64 has no split shape and stays fused)."""
    _require_kernel()
    monkeypatch.setenv("PVT_FAST_PATCH_EMBED_PLAN", plan)
    _, B, Cin, H, W, Cout, k, s, p, layout = geometry
    args = _make_inputs(B, Cin, H, W, Cout, k, layout, dtype=dtype, device="cuda")
    out = _run_kernel_poisoned(args, s, p, 1e-6, layout)
    atol, rtol = CUDA_TOLERANCES[dtype]
    assert_close(out, _reference(*args, s, p, 1e-6, layout), atol=atol, rtol=rtol, what=f"cuda {dtype}")
    assert_close(pe.patch_embed(*args, 1e-6, s, p, layout)[0], out.double(), atol=0, rtol=0,
                 what="functional == out variant")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_kernel_fp32_params_and_strides(layout):
    """bf16 activations with fp32 weights (autocast), strided x and weight."""
    _require_kernel()
    x, weight, bias, nw, nb = _make_inputs(2, 8, 21, 17, 96, 3, layout, dtype=torch.bfloat16,
                                           param_dtype=torch.float32, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)  # same values, other strides
    weight = weight.to(memory_format=torch.channels_last)
    out = _run_kernel_poisoned((x, weight, bias, nw, nb), 2, 1, 1e-5, layout)
    assert_close(out, _reference(x, weight, bias, nw, nb, 2, 1, 1e-5, layout), atol=1e-2, rtol=1e-2, what="fp32 params")


@pytest.mark.gpu
def test_cuda_v1_stage1_full_size_no_fallback():
    _require_kernel()
    args = _make_inputs(8, 3, 224, 224, 64, 4, "nchw", dtype=torch.bfloat16, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, Ho, Wo = pe.patch_embed(*args, 1e-6, 4, 0, "nchw")
    fallbacks = [str(w.message) for w in caught if "PyTorch composite" in str(w.message)]
    assert not fallbacks, f"CUDA call reached the composite: {fallbacks}"
    assert (Ho, Wo) == (56, 56)
    assert_close(tokens, _reference(*args, 4, 0, 1e-6, "nchw"), atol=1e-2, rtol=1e-2, what="v1 stage 1 at 224")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_gradients(layout):
    _require_kernel()
    args = [t.requires_grad_() for t in _make_inputs(2, 4, 9, 11, 20, 3, layout, device="cuda")]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the backward recomputes with cuDNN
        out = pe.patch_embed(*args, 1e-5, 2, 1, layout)[0]
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, args, grad_out)
    leaves = [t.detach().double().requires_grad_() for t in args]
    ref = torch.autograd.grad(_reference(*leaves, 2, 1, 1e-5, layout), leaves, grad_out.double())
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("case, message", [
    ("x_on_cpu", r"x must be a CUDA tensor"),
    ("weight_on_cpu", r"weight must be on x's device"),
    ("cout_2048", r"weight must have 1 to 1024 output channels"),
    ("weight_fp16_x_bf16", r"weight must have x's dtype"),
    ("bad_layout", r'layout must be "nchw" or "nhwc"'),
    ("bias_shape", r"bias must be \(Cout,\) == \(16,\), got \(15,\)"),
])
def test_cuda_kernel_names_bad_inputs(case, message):
    _require_kernel()
    x, weight, bias, nw, nb = _make_inputs(2, 3, 13, 9, 16, 4, "nchw", dtype=torch.bfloat16, device="cuda")
    layout = "nchw"
    if case == "x_on_cpu":
        x = x.cpu()
    elif case == "weight_on_cpu":
        weight = weight.cpu()
    elif case == "cout_2048":
        weight, bias, nw, nb = torch.randn(2048, 3, 4, 4, device="cuda", dtype=torch.bfloat16), *(
            torch.randn(2048, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    elif case == "weight_fp16_x_bf16":
        weight = weight.half()
    elif case == "bad_layout":
        layout = "hwc"
    elif case == "bias_shape":
        bias = bias[:15]
    # The C++ checks, reached without the Python wrapper's.
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.pvt_fast.patch_embed(x, weight, bias, nw, nb, 4, 0, 1e-5, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", ["4:64:64", "8:128:64", "8:64:128", "16:128:128", "16:64:256"])
def test_cuda_every_split_shape(shape, dtype, monkeypatch):
    """Each split block shape forced, three splits, on Cout 320 (npad 320: the 128- and 256-channel blocks
    have a tail) and 208 tokens (a token tail in every row tile)."""
    _require_kernel()
    monkeypatch.setenv("PVT_FAST_PATCH_EMBED_PLAN", f"split:{shape}:3")
    args = _make_inputs(1, 64, 31, 25, 320, 3, "nhwc", dtype=dtype, device="cuda")
    out = _run_kernel_poisoned(args, 2, 1, 1e-6, "nhwc")
    atol, rtol = CUDA_TOLERANCES[dtype]
    assert_close(out, _reference(*args, 2, 1, 1e-6, "nhwc"), atol=atol, rtol=rtol, what=f"split {shape} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("value, message", [
    ("streamed", r'PVT_FAST_PATCH_EMBED_PLAN must be "auto", "fused", "split" or "split:W:BM:BN:S", got "streamed"'),
    ("split:8:64:64:2", r'"split:8:64:64:2" names no split plan for Cout 16'),
    ("split:4:64:64:2", r'"split:4:64:64:2" names no split plan for Cout 16: .* BN <= 16'),
])
def test_cuda_plan_variable_is_checked(value, message, monkeypatch):
    _require_kernel()
    monkeypatch.setenv("PVT_FAST_PATCH_EMBED_PLAN", value)
    x, weight, bias, nw, nb = _make_inputs(1, 3, 8, 8, 16, 4, "nchw", dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=message):
        torch.ops.pvt_fast.patch_embed(x, weight, bias, nw, nb, 4, 0, 1e-5, "nchw")


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_int64_offsets():
    """More than 2^31 output elements: 32 images of 4096x4096 at stride 4, Cout 64 (4.3 GB of tokens)."""
    _require_kernel()
    if torch.cuda.get_device_properties(0).total_memory < 40 << 30:
        pytest.skip("needs 40 GB of GPU memory")
    x, weight, bias, nw, nb = _make_inputs(1, 3, 64, 64, 64, 4, "nchw", dtype=torch.bfloat16, device="cuda")
    big = torch.randn(32, 3, 4096, 4096, device="cuda", dtype=torch.bfloat16)
    tokens, _, _ = pe.patch_embed(big, weight, bias, nw, nb, 1e-6, 4, 0, "nchw")
    assert tokens.numel() > 2**31
    for b in (0, 31):  # the first and the last image, compared image by image
        ref = _reference(big[b:b + 1], weight, bias, nw, nb, 4, 0, 1e-6, "nchw")
        assert_close(tokens[b:b + 1], ref, atol=1e-2, rtol=1e-2, what=f"image {b}")
