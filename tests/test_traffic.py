"""The traffic and roofline model (pvt_fast.kernels.traffic): its arithmetic, its byte counts against hand
counts and against the bytes the Triton interpreter really moves, and the ratios it predicts at the
benchmark shapes."""
import contextlib
import dataclasses
import os
import re

import pytest
import torch

from pvt_fast.kernels import traffic
from pvt_fast.kernels._counts import SMS, Access, Launch, OpCost

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="counts the bytes the Triton interpreter moves (TRITON_INTERPRET=1)")


# --- the roofline arithmetic ----------------------------------------------------------------------------


def test_hbm_counts_rereads_only_past_half_the_l2():
    half = traffic.L2_BYTES // 2
    small = Access("w", half, loaded=5 * half, reuse_set=half)
    large = Access("w", half + 1, loaded=5 * half, reuse_set=half + 1)
    store = Access("o", 300, stored=300)
    assert traffic.hbm_bytes(Launch("k", SMS, (small, store))) == half + 300
    assert traffic.hbm_bytes(Launch("k", SMS, (large, store))) == 5 * half + 300
    # A reuse set larger than the tensor is the tensor: 1000 bytes stay in L2 however many programs share them.
    tiny = Access("w", 1000, loaded=5000, reuse_set=half + 1)
    assert traffic.hbm_bytes(Launch("k", SMS, (tiny, store))) == 1300


def test_launch_time_is_the_slowest_roof_stretched_by_idle_sms():
    memory = Launch("k", SMS, (Access("x", 3_350_000, loaded=3_350_000),))
    assert traffic.launch_seconds(memory) == pytest.approx(1e-6)  # 3.35 MB at 3.35 TB/s
    l2 = Launch("k", SMS, (Access("x", 100, loaded=11_000_000),))
    assert traffic.launch_seconds(l2) == pytest.approx(2e-6)  # 11 MB at 5.5 TB/s
    math = Launch("k", SMS, (Access("x", 100, loaded=100),), flops=989_400_000, peak="16-bit")
    assert traffic.launch_seconds(math) == pytest.approx(1e-6)
    half = Launch("k", SMS // 2, memory.accesses)
    assert traffic.launch_seconds(half) == pytest.approx(2e-6)
    assert traffic.launch_seconds(Launch("torch", 1, memory.accesses, pytorch=True)) == pytest.approx(1e-6)


def test_ratio_is_predicted_over_ideal():
    # Two launches through an intermediate: 3.35 MB in, 3.35 MB intermediate written and read, 3.35 MB out.
    x = 3_350_000
    cost = OpCost((Launch("a", SMS, (Access("in", x, loaded=x), Access("tmp", x, stored=x))),
                   Launch("b", SMS, (Access("tmp", x, loaded=x), Access("out", x, stored=x)))), 2 * x, 0)
    s = traffic.summarize(cost)
    assert (s.l2, s.hbm, s.minimum) == (4 * x, 4 * x, 2 * x)
    assert s.predicted == pytest.approx(4e-6) and s.ideal == pytest.approx(2e-6) and s.ratio == pytest.approx(2.0)


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


# --- hand counts --------------------------------------------------------------------------------------


def _by_kernel(cost):
    return {launch.kernel: launch for launch in cost.launches}


def test_attention_counts_by_hand(matmul_precision):
    """B 1, N 5 queries, M 3 keys, C 32, one head: one program per kernel (16-key blocks, M <= 16)."""
    from pvt_fast.kernels import sra_attention as sa

    p = sa.Problem(1, 5, 3, 32, 1, torch.bfloat16)
    q, kv, lse = 5 * 32 * 2, 3 * 64 * 2, 5 * 4
    fwd = sa.forward_cost(p, num_sms=1)
    (launch,) = fwd.launches
    assert (launch.programs, launch.loaded, launch.stored) == (1, q + kv, q + lse)
    assert launch.flops == 2 * 2 * 128 * 16 * 32  # two dots of a 128-query x 16-key x 32-column tile
    assert fwd.minimum_bytes == q + kv + q + lse and fwd.useful_flops == 4 * 5 * 3 * 32
    (one,) = sa.backward_cost(p, num_sms=1).launches  # 16-bit, every key in one block: one kernel
    assert (one.kernel, one.loaded, one.stored) == ("sra_attention_bwd_one_block", kv + 3 * q + lse, q + kv)
    assert one.flops == 5 * 2 * 32 * 16 * 32  # five dots of a 32-query x 16-key x 32-column tile

    matmul_precision("highest")  # fp32 dots on FMAs: the three-kernel backward with 16 x 16 tiles
    p = sa.Problem(1, 5, 3, 32, 1, torch.float32)
    q, kv = 5 * 32 * 4, 3 * 64 * 4
    k0 = 32 * 4  # the dQ program reads the head's first key once more (the offset taken out of dQ)
    bwd = _by_kernel(sa.backward_cost(p, num_sms=1))
    assert (bwd["sra_attention_bwd_delta"].loaded, bwd["sra_attention_bwd_delta"].stored) == (2 * q, lse)
    dkdv = bwd["sra_attention_bwd_dkdv"]  # K/V once; q, dO, lse, delta of every query once; dK/dV written
    assert (dkdv.loaded, dkdv.stored, dkdv.flops) == (kv + 2 * q + 2 * lse, kv, 4 * 2 * 16 * 16 * 32)
    dq = bwd["sra_attention_bwd_dq"]
    assert (dq.loaded, dq.stored, dq.flops) == (2 * q + 2 * lse + kv + k0, q, 3 * 2 * 16 * 16 * 32)


def test_dwconv_counts_by_hand():
    """B 1, a 2 x 3 grid, 4 channels, bf16: one program per direction. Forward: both image rows, each loaded
    once (its column neighbours come from the same tile), the 3 columns inside the 16-wide tile. Backward:
    x the same; dy only on the 14 tile lanes where g has a whole window (all 3 columns here); dx written;
    fp32 partial sums: 9 d weight taps and d bias per channel."""
    from pvt_fast.kernels import mlp_dwconv as md

    p = md.Problem(1, 2, 3, 4, torch.bfloat16)
    x, t = 2 * 3 * 4 * 2, 2 * 3 * 4 * 2
    (launch,) = md.forward_cost(p).launches
    assert (launch.programs, launch.loaded, launch.stored) == (1, x + 9 * 4 * 2 + 4 * 2, t)
    bwd = md.backward_cost(p).launches[0]
    assert (bwd.programs, bwd.loaded, bwd.stored) == (1, 2 * x + 9 * 4 * 2 + 4 * 2, t + 10 * 4 * 4)

    # 30 columns: the forward's programs own 14 columns and load 16 (a halo column each side, inside the
    # image only): 15 + 16 + 3 columns; the backward's own 12 and load 16 (two halo columns each side): 14 +
    # 16 + 8 columns of x, and the middle 14 lanes of dy: 13 + 14 + 7.
    p = md.Problem(1, 1, 30, 4, torch.bfloat16)
    (launch,) = md.forward_cost(p).launches
    assert launch.accesses[0].loaded == (15 + 16 + 3) * 4 * 2
    x_loads, dy_loads = md.backward_cost(p).launches[0].accesses[:2]
    assert (x_loads.loaded, dy_loads.loaded) == ((14 + 16 + 8) * 4 * 2, (13 + 14 + 7) * 4 * 2)


def test_patch_embed_counts_by_hand():
    """B 1, 2 channels, 5 x 5 image, 8 outputs, k 3, stride 2, padding 1: a 3 x 3 grid; per output row the taps
    inside the image are 2, 3, 2 (7 along each axis); one resident block reads the packed weight once, 8 rows
    of K = 18 padded to 32."""
    from pvt_fast.kernels import patch_embed_cuda as pe

    p = pe.Problem(1, 2, 5, 5, 8, 3, 2, 1, "nhwc", torch.bfloat16)
    assert pe.counts(p) == {"x": 2 * 7 * 7, "weight": 8 * 32, "params": 3 * 8, "out": 9 * 8, "workspace_stored": 0,
                            "workspace_loaded": 0}
    plan = pe.plan(p)
    assert (plan.npad, plan.bm, plan.bk, plan.chunks, plan.tiles, plan.partial) == (16, 128, 32, 1, 1, False)


def test_patch_embed_split_counts_by_hand():
    """The same 3 x 3 grid from 8 channels into 72 outputs (npad 80), on a split plan of 64 x 64 tiles: two
    column blocks (0-63, 64-127) each gather all of x (8 channels x 7 x 7 taps), K = 72 (pitch 80) in two
    chunks of 64, one per split; each row tile reads the weight once (72 rows x 80 columns, the second chunk's
    columns past the pitch not at all); the workspace holds 2 splits x 9 tokens x 80 channels, written once
    and read once; the norm pass (rows of 80 channels: 8 lanes, 16 rows a tile) is one block."""
    from pvt_fast.kernels import patch_embed_cuda as pe

    p = pe.Problem(1, 8, 5, 5, 72, 3, 2, 1, "nhwc", torch.bfloat16)
    plan = pe.split_plan(p, (4, 64, 64), 2)
    assert (plan.npad, plan.bk, plan.chunks, plan.chunks_per_split, plan.splits, plan.col_blocks, plan.tiles) == (
        80, 64, 2, 1, 2, 2, 4)
    assert pe.counts(p, pl=plan) == {"x": 2 * 8 * 7 * 7, "weight": 72 * 80, "params": 3 * 72, "out": 9 * 72,
                                     "workspace_stored": 2 * 9 * 80, "workspace_loaded": 2 * 9 * 80}
    assert pe.norm_plan(p, plan).bm == 16


def test_patch_embed_plan_kinds():
    """kind "fused" and "split" restrict the candidates as PVT_FAST_PATCH_EMBED_PLAN does; Cout under 64 has no
    split shape (the narrowest is 64 channels), so "split" falls back to the default fused plan; other kinds are
    refused."""
    from pvt_fast.kernels import patch_embed_cuda as pe

    wide = pe.Problem(1, 64, 30, 30, 128, 3, 2, 1, "nhwc", torch.bfloat16)
    assert not pe.plan(wide, "fused").partial and pe.plan(wide, "split").partial
    narrow = pe.Problem(1, 3, 30, 30, 48, 4, 4, 0, "nchw", torch.bfloat16)
    assert pe.plan(narrow, "split") == pe.fused_plan(narrow) and not pe.plan(narrow, "fused").partial
    with pytest.raises(ValueError, match='kind must be "auto", "fused" or "split", got \'both\''):
        pe.plan(wide, "both")


def test_patch_embed_plan_is_the_models_best():
    """make_plan ranks plans by a closed-form estimate (mirrored in Python); at every benchmark shape the plan
    it picks is the fastest of its candidates under the full traffic model."""
    from pvt_fast.kernels import patch_embed_cuda as pe

    for model in traffic.MODELS:
        for side, batch in traffic.POINTS:
            for st in traffic.stages(model, side, batch):
                for dtype in traffic.DTYPES:
                    p = pe.Problem.for_stage(st, dtype)
                    seconds = {pl: traffic.summarize(pe.forward_cost(p, pl)).predicted for pl in pe.candidates(p)}
                    chosen = seconds[pe.plan(p)]
                    best = min(seconds.values())
                    assert chosen <= best * 1.001, f"{st.label} {dtype}: {chosen} > {best}"


# --- the interpreter's bytes ----------------------------------------------------------------------------


@contextlib.contextmanager
def interpreter_bytes():
    """Bytes every Triton load and store moves while the block runs (masked-off lanes move nothing)."""
    from triton.runtime import interpreter

    counts = {"loaded": 0, "stored": 0}
    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def moved(ptrs, mask):
        return int(mask.data.sum()) * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def counted_load(self, ptrs, mask, *args):
        counts["loaded"] += moved(ptrs, mask)
        return load(self, ptrs, mask, *args)

    def counted_store(self, ptrs, value, mask, *args):
        counts["stored"] += moved(ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield counts
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


def _modelled(cost):
    kernels = [launch for launch in cost.launches if not launch.pytorch]
    return {"loaded": sum(k.loaded for k in kernels), "stored": sum(k.stored for k in kernels)}


@interpreted
@pytest.mark.parametrize("B, N, M, C, heads, dtype, splits", [
    (2, 37, 23, 64, 2, torch.float16, None), (1, 133, 150, 48, 1, torch.float32, None),
    (1, 150, 20, 32, 1, torch.float16, 3), (1, 150, 90, 32, 1, torch.float16, 2)])
def test_attention_model_matches_interpreter(B, N, M, C, heads, dtype, splits):
    """One-block (M <= 64, 16-bit) and three-kernel backwards, split (with the split sum) and not."""
    from pvt_fast.kernels import sra_attention as sa

    g = torch.Generator().manual_seed(0)
    q, grad = (torch.randn(B, N, C, generator=g).to(dtype) for _ in range(2))
    kv = torch.randn(B, M, 2 * C, generator=g).to(dtype)
    p = sa.Problem(B, N, M, C, heads, dtype)
    with interpreter_bytes() as moved:
        o, lse = sa.sra_attention_fwd(q, kv, heads, 0.1)
    assert moved == _modelled(sa.forward_cost(p, num_sms=1))
    with interpreter_bytes() as moved:
        sa.sra_attention_bwd(grad, q, kv, o, lse, heads, 0.1, num_splits=splits)
    cost = sa.backward_cost(p, num_sms=1, num_splits=splits)
    assert sum(launch.kernel == "sra_attention_split_sum" for launch in cost.launches) == (splits is not None)
    assert moved == _modelled(cost)


@interpreted
@pytest.mark.parametrize("B, H, W, C, dtype", [(2, 11, 9, 72, torch.float32), (1, 9, 19, 20, torch.float16),
                                              (1, 16, 27, 36, torch.float32)])
def test_dwconv_model_matches_interpreter(B, H, W, C, dtype):
    from pvt_fast.kernels import mlp_dwconv as md

    x = torch.randn(B, H * W, C).to(dtype)
    weight, bias = torch.randn(C, 1, 3, 3).to(dtype), torch.randn(C).to(dtype)
    p = md.Problem(B, H, W, C, dtype)
    with interpreter_bytes() as moved:
        md.dwconv_gelu_fwd(x, H, W, weight, bias, False)
    assert moved == _modelled(md.forward_cost(p))
    with interpreter_bytes() as moved:
        md.dwconv_gelu_bwd(x, x, H, W, weight, bias, True)
    assert moved == _modelled(md.backward_cost(p))


@interpreted
@pytest.mark.parametrize("B, H, W, C, sr, x_dtype, dtype", [
    (1, 9, 13, 24, 4, torch.float32, torch.float32), (2, 11, 7, 48, 2, torch.float16, torch.float16),
    (1, 4, 5, 136, 2, torch.float32, torch.float32), (1, 6, 6, 160, 2, torch.float32, torch.float16)])
def test_reduce_kv_model_matches_interpreter(B, H, W, C, sr, x_dtype, dtype):
    """The launcher's own choice, and every blocking (whole rows, channel tiles) split and unsplit."""
    from pvt_fast.kernels import reduce_kv as rk

    x = torch.randn(B, H * W, C).to(x_dtype)
    weight = torch.randn(C, C, sr, sr).to(dtype).contiguous(memory_format=torch.channels_last)
    vec = torch.randn(C).to(dtype)
    p = rk.Problem(B, H, W, C, sr, x_dtype, dtype)
    with interpreter_bytes() as moved:
        rk.reduce_kv(x, H, W, weight, vec, vec, vec, 1e-5)
    assert moved == _modelled(rk.forward_cost(p, num_sms=1))
    rows, x_bytes = B * (H // sr) * (W // sr), B * (H // sr) * (W // sr) * sr * sr * C * x.element_size()
    blockings = rk._blockings(C, dtype, x_dtype)
    for config in (dataclasses.replace(b, splits=s) for b in blockings for s in (1, 2)):
        with interpreter_bytes() as moved:
            rk.reduce_kv(x, H, W, weight, vec, vec, vec, 1e-5, config=config)
        launches, _ = rk._gemm_launches(rows, config, p, x_bytes, "x")
        assert moved == _modelled(OpCost(tuple(launches), 0, 0)), config


@interpreted
def test_reduce_kv_linear_model_matches_interpreter():
    from pvt_fast.kernels import reduce_kv as rk

    B, H, W, C = 2, 9, 15, 40
    x = torch.randn(B, H * W, C)
    weight, vec = torch.randn(C, C, 1, 1), torch.randn(C)
    with interpreter_bytes() as moved:
        rk.reduce_kv_linear(x, H, W, weight, vec, vec, vec, 1e-5)
    assert moved == _modelled(rk.linear_forward_cost(rk.Problem(B, H, W, C, 1, torch.float32), num_sms=1))


# --- the benchmark shapes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows():
    return traffic.benchmark_rows()


def test_every_fused_op_and_direction_is_modelled(rows):
    ops = {row.op for row in rows}
    assert ops == {f"{op} {d}" for op in ("patch_embed", "reduce_kv", "sra_attention", "dwconv_gelu")
                   for d in ("fwd", "bwd")}
    assert {row.stage.model for row in rows} == set(traffic.MODELS)
    assert len({(row.stage.side, row.stage.batch) for row in rows}) == len(traffic.POINTS)


def test_report_ends_with_the_worst_ratio(rows, capsys):
    from pvt_fast.kernels import report

    assert report.main(["--traffic", "--filter", "s1 224px b64 bfloat16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 3 and all(re.search(r"  traffic x\d+\.\d\d$", line) for line in lines[2:-1]), lines
    assert lines[-1].startswith("traffic: worst x") and "s1 224px b64 bfloat16" in lines[-1]


# Where the kernels are not yet under R_LIMIT at the benchmark shapes: (op, dtype) -> the worst ratio allowed
# for now and why. A ratchet: a row over its bound fails (a regression), and an entry with no row over
# R_LIMIT any more fails too (remove it). The reasons are the open work of issue 12.
RATIO_GAPS = {
    ("patch_embed fwd", "bfloat16"): (6.1, "an implicit GEMM at tensor-core speed is L2-bound in this model "
                                          "for any tile one SM holds (64-128 x 128 here: 43-64 FLOP/B against "
                                          "the 180 the L2 feeds); split plans add an fp32 workspace round trip; "
                                          "the worst rows are at single-SM floors over the limit (IMPROVABLE)"),
    ("reduce_kv fwd", "bfloat16"): (5.5, "a conv with K = sr^2 C >> C: each row block reads the whole weight "
                                         "(L2), split-K partial sums cost fp32 round trips; C = 320 worst; "
                                         "the worst rows are at single-SM floors over the limit (IMPROVABLE)"),
    ("sra_attention fwd", "bfloat16"): (3.1, "1024 px stages 2-4 at batch 1: each query block reads all of "
                                             "its head's K/V; few query blocks for 132 SMs"),
    ("sra_attention bwd", "bfloat16"): (2.2, "1024 px: three-kernel backward re-reads q/dO per 128 keys and "
                                             "K/V per query block; stage 4 has 8 heads of 1024 keys"),
}
# (op, dtype) whose fused kernels the model predicts slower than the unfused PyTorch chain at some benchmark
# shape. The chain is charged only its minimum bytes (its kernels' own tiling is unknown, GEMMs aside), the
# fused kernels every tile load: the comparison leans against them, but these are the rows to fix.
SLOWER_THAN_UNFUSED = {("patch_embed fwd", "bfloat16"), ("patch_embed fwd", "float32"),
                       ("reduce_kv fwd", "bfloat16"), ("reduce_kv fwd", "float32"),
                       ("sra_attention bwd", "float32")}


# Rows of the convolution + LayerNorm forwards over R_LIMIT whose single-SM floor (traffic.gemm_floor) is under
# it: a better plan of single-SM tiles exists. Every other such row is at a floor above R_LIMIT: no tiling one
# SM holds meets the limit there, only tiles shared between SMs (Hopper clusters) could.
IMPROVABLE = {("patch_embed fwd", "pvt_v2_b2 s2 224px b64 bfloat16"),
              ("patch_embed fwd", "pvt_v2_b2 s1 1024px b1 bfloat16"),
              ("reduce_kv fwd", "pvt_v2_b2 s1 224px b64 bfloat16"),
              ("reduce_kv fwd", "pvt_tiny s1 224px b64 bfloat16")}


def _key(row):
    return row.op, str(row.dtype)[6:]


def test_no_plan_beats_the_single_sm_floor(rows):
    """The floor is a lower bound: a plan under it means a byte or FLOP the model of that plan left out."""
    gemms = [row for row in rows if row.gemm is not None]
    assert {row.op for row in gemms} == {"patch_embed fwd", "reduce_kv fwd"}
    for row in gemms:
        s = traffic.summarize(row.fused)
        floor, _ = traffic.gemm_floor(row.gemm, s.ideal)
        assert floor <= s.ratio * (1 + 1e-9), f"{row.op} {row.shape}: x{s.ratio:.3f} under its floor x{floor:.3f}"


def test_gaps_of_the_gemms_are_at_floors_over_the_limit(rows):
    improvable = set()
    for row in rows:
        if row.gemm is None:
            continue
        s = traffic.summarize(row.fused)
        if s.ratio > traffic.R_LIMIT and traffic.gemm_floor(row.gemm, s.ideal)[0] <= traffic.R_LIMIT:
            improvable.add((row.op, row.shape))
    assert improvable == IMPROVABLE


def test_gemm_floor_by_hand():
    """One SM, and a problem one 128 x 256 tile covers: the floor is that tile, reading everything once."""
    g = traffic.Gemm(rows=128, cols=256, inner=4096, a_bytes=128 * 4096 * 2, elem=2, peak="16-bit")
    seconds = max((128 * 4096 * 2 + 256 * 4096 * 2 + 128 * 256 * 2) / traffic.L2_BANDWIDTH,
                  2 * 128 * 256 * 4096 / traffic.PEAK_FLOPS["16-bit"])
    assert traffic.gemm_floor(g, 1e-6, sms=1) == (pytest.approx(seconds / 1e-6), (128, 256, 1))
    # 132 SMs: the one tile would leave 131 idle (132 times as long); the floor splits the work instead
    R, (bm, bn, splits) = traffic.gemm_floor(g, 1e-6, sms=132)
    assert R < 132 * seconds / 1e-6 / 10 and (128 // bm) * (256 // bn) * splits > 10


def test_ratio_at_the_benchmark_shapes(rows):
    over = {}
    for row in rows:
        if not row.kernels:
            continue
        ratio = traffic.summarize(row.fused).ratio
        bound, _ = RATIO_GAPS.get(_key(row), (traffic.R_LIMIT, ""))
        assert ratio <= bound, f"{row.op} {row.shape}: traffic x{ratio:.2f} > {bound}"
        if ratio > traffic.R_LIMIT:
            over[_key(row)] = max(over.get(_key(row), 0), ratio)
    assert set(over) == set(RATIO_GAPS), f"now under x{traffic.R_LIMIT}: {set(RATIO_GAPS) - set(over)}"


def test_fused_not_slower_than_unfused(rows):
    slower = {_key(row) for row in rows if row.kernels and
              traffic.summarize(row.fused).predicted > traffic.summarize(row.unfused).predicted}
    assert slower == SLOWER_THAN_UNFUSED, (f"newly slower: {slower - SLOWER_THAN_UNFUSED}; "
                                           f"no longer slower: {SLOWER_THAN_UNFUSED - slower}")


def test_attention_plans_follow_the_model():
    """pvt_v2_b2 at 1024 px batch 1. Stage 2 (N 16384, M 1024, 2 heads): 256-query blocks give 128 programs
    for 132 SMs and read each head's K/V half as often as 128-query blocks, so the forward takes them. Stage 4
    (N = M = 1024, 8 heads, d 64): dK/dV's 128-key blocks make 64 programs; two query ranges would make 128,
    but their 4 MB of fp32 partial sums (written, then read by the split sum) gain less than the 5% margin a
    split must clear, four ranges lose: dK/dV runs unsplit; its dQ and forward take 64-query blocks (128
    programs rather than 64)."""
    from pvt_fast.kernels import sra_attention as sa

    stage2 = sa.Problem(1, 16384, 1024, 128, 2, torch.bfloat16)
    cfg, grid = sa.forward_plan(stage2, 132)
    assert (cfg.block_n, grid) == (256, (64, 2))
    stage4 = sa.Problem(1, 1024, 1024, 512, 8, torch.bfloat16)
    plan = sa.backward_plan(stage4, 132)
    assert plan.num_splits == 1 and plan.dq.block_n == 64 and sa.forward_plan(stage4, 132)[0].block_n == 64
    seconds = {n: traffic.summarize(sa.backward_cost(stage4, 132, n)).predicted for n in (1, 2, 4)}
    assert seconds[1] / (1 + sa._SPLIT_MARGIN) < seconds[2] < seconds[1] < seconds[4]
    # exact fp32 (d 64): 32-query blocks in 8 warps, half the K/V reads of 16 (stage 1 at 224 px batch 64)
    assert sa.forward_plan(sa.Problem(64, 3136, 49, 64, 1, torch.float32), 132)[0].block_n == 32
    # the interpreter's single "SM": no program is idle, so the fewest bytes win (the widest blocks, no split)
    assert sa.forward_plan(stage2, 1)[0].block_n == 256 and sa.backward_plan(stage4, 1).num_splits == 1
