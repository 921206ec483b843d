"""Traffic and roofline model of the fused kernels, at the benchmark shapes, against the PyTorch ops they replace.

    python -m pvt_fast.kernels.report --traffic

Every fused op's forward and backward is described by its kernel module (``forward_cost`` /
``backward_cost`` and the like) as the launches its launchers make, from the same plan functions the
launchers call: grids, tiles, loop trip counts, dtypes. For each launch the model takes

- **L2 bytes**: every element every program loads or stores, each tile load counted (no credit for reuse);
- **HBM bytes**: each distinct byte once, plus the repeated loads of an operand whose reuse set (the bytes
  that must stay cached between two loads of the same byte) is larger than half the L2;
- **FLOPs**: what the launch executes (padded tiles and recomputation included), at the peak of the units
  it runs on;

and predicts ``max(HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth, FLOPs / peak)``, divided by the
fraction of the SMs its programs fill when there are fewer programs than SMs (PyTorch's kernels are
assumed to fill the GPU). An op's predicted time is the sum over its launches. Its ideal time is
``max(minimum bytes / HBM bandwidth, FLOPs / peak)``, the minimum bytes being every input read once and
every output written once, and ``R = predicted / ideal``: the cost of the traffic beyond the minimum (the
FLOPs are the same on both sides, so R measures data movement; recomputation shows as the ``flop x``
column, executed over the op's counted FLOPs).

The unfused chain beside each op is the same model applied to the PyTorch kernels the op replaces (the
``sdpa`` backend's ops; for attention the explicit matmul-softmax-matmul of the reference): each
elementwise or normalization kernel reads its inputs and writes its outputs once, and each GEMM or
convolution is a tiled GEMM with 128 x 128 tiles (A read once per column block, B once per row block),
all filling the GPU. Their loads are not known tile by tile as ours are, so the comparison leans against
the fused kernels (a depthwise conv, for one, is charged its minimum bytes). The fused ops' backward of
the patch embedding and of reduce_kv is PyTorch ops too (recomputing the forward): those rows show the
cost of the recomputation, not a kernel of ours.

The ``floor`` column (the convolution + LayerNorm forwards) is :func:`gemm_floor`: the lowest R that any
plan of single-SM tiles reaches in this model at that shape, however it tiles and splits. Where the floor
is above ``R_LIMIT`` no such plan meets it: the input or weight re-reads of tiles one SM can hold, or the
fp32 partial sums that fill the SMs, cost more than the limit allows; what remains is sharing tiles
between SMs (Hopper thread-block clusters: TMA multicast of operand tiles, split-K summed in distributed
shared memory). Where it is below, a better plan exists.

The constants are H100 SXM's, here and nowhere else (the sources are next to each).
"""
import dataclasses

import torch

from pvt_fast.kernels._counts import SMS, Access, OpCost, pytorch_gemm, pytorch_kernel

# NVIDIA H100 Tensor Core GPU datasheet (SXM5 80 GB): HBM3 3.35 TB/s; dense BF16/FP16 989.4 TFLOP/s,
# TF32 494.7 TFLOP/s, FP32 (CUDA cores) 66.9 TFLOP/s. 132 SMs (NVIDIA Hopper architecture whitepaper).
HBM_BANDWIDTH = 3.35e12
PEAK_FLOPS = {"16-bit": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}
# L2 read bandwidth measured by Chips and Cheese ("Nvidia's H100: Funny L2, and Tons of Bandwidth", July
# 2023) on an H100 PCIe (114 SMs, 1755 MHz): about 5.5 TB/s. SXM5 has more SMs and a higher clock, so
# this is a floor for it, which makes the model stricter, not kinder.
L2_BANDWIDTH = 5.5e12
L2_BYTES = 50 * 10**6  # Hopper whitepaper: 50 MB on H100 SXM5
R_LIMIT = 1.3  # the ratio every fused kernel must stay under at the benchmark shapes (issue 12)

# The benchmark shapes: these models' stages at these (image side, batch) points, in these dtypes.
MODELS = ("pvt_v2_b2", "pvt_tiny")
POINTS = ((224, 64), (1024, 1))
DTYPES = (torch.bfloat16, torch.float32)


def hbm_bytes(launch):
    """Each distinct byte once, plus every re-read of a tensor whose reuse set does not fit in half the L2. A
    reuse set is at most the tensor itself: programs that hold slices of all of it hold no more than all of it."""
    total = 0
    for a in launch.accesses:
        total += a.distinct
        if a.loaded > a.distinct and min(a.reuse_set, a.distinct) > L2_BYTES // 2:
            total += a.loaded - a.distinct
    return total


def launch_seconds(launch, sms=SMS):
    """The launch's roofline time, stretched when its programs leave some of the ``sms`` SMs idle."""
    seconds = max(hbm_bytes(launch) / HBM_BANDWIDTH, (launch.loaded + launch.stored) / L2_BANDWIDTH,
                  launch.flops / PEAK_FLOPS[launch.peak])
    fill = 1.0 if launch.pytorch else min(1.0, launch.programs / sms)
    return seconds / fill


@dataclasses.dataclass(frozen=True)
class Summary:
    """The model's figures for one op direction (an :class:`OpCost`)."""

    l2: int
    hbm: int
    minimum: int
    flops: int
    useful_flops: int
    predicted: float
    ideal: float

    @property
    def ratio(self):
        return self.predicted / self.ideal


def summarize(cost):
    compute = sum(launch.flops / PEAK_FLOPS[launch.peak] for launch in cost.launches)
    return Summary(
        l2=sum(launch.loaded + launch.stored for launch in cost.launches),
        hbm=sum(hbm_bytes(launch) for launch in cost.launches),
        minimum=cost.minimum_bytes,
        flops=sum(launch.flops for launch in cost.launches),
        useful_flops=cost.useful_flops,
        predicted=sum(launch_seconds(launch) for launch in cost.launches),
        ideal=max(cost.minimum_bytes / HBM_BANDWIDTH, compute),
    )


# --- the floor of single-SM tiles for the GEMM-like ops ----------------------------------------------

# The largest output tile one SM can accumulate: 128 x 256 fp32 sums are 128 KB, half its 256 KB register file
# (H100 has 64K 32-bit registers per SM; CUTLASS's and FlashAttention-3's largest Hopper tiles are this size).
MAX_TILE_ELEMENTS = 128 * 256


@dataclasses.dataclass(frozen=True)
class Gemm:
    """A convolution + LayerNorm as the GEMM the model sees: ``rows`` tokens x ``cols`` channels over
    ``inner`` products each, reading ``a_bytes`` of input (each distinct byte; the windows a token gathers may
    overlap), weight and output of ``elem``-byte elements, at ``peak``; the LayerNorm needs whole rows of sums."""

    rows: int
    cols: int
    inner: int
    a_bytes: int
    elem: int
    peak: str

    @property
    def b_bytes(self):
        return self.cols * self.inner * self.elem

    @property
    def out_bytes(self):
        return self.rows * self.cols * self.elem


def gemm_floor(gemm, ideal, sms=SMS):
    """The lowest ``R`` (over ``ideal`` seconds) that any plan of single-SM tiles reaches in this model, a lower
    bound for the op's kernels, however tiled: every ``bm x bn`` tile (powers of two from 16, or every column
    at once; at most :data:`MAX_TILE_ELEMENTS`) with its inner dimension split ``S`` ways (1-32) reads at least
    the whole input once per column block and the weight once per row block; where a tile holds less than a
    whole row, or ``S > 1``, its fp32 sums make a round trip through memory (written, then read by a pass that
    normalizes and writes the output); a launch of fewer programs than SMs is stretched as any other. The
    gather overlap of strided windows, padding, the weight packing and the parameters are not charged.
    Returns ``(R, (bm, bn, S))``."""
    sizes = [1 << i for i in range(4, 9)]
    best = None
    for bm in sizes:
        for bn in sizes + [gemm.cols]:
            if bm * bn > MAX_TILE_ELEMENTS or bn > gemm.cols:
                continue
            row_blocks, col_blocks = -(-gemm.rows // bm), -(-gemm.cols // bn)
            for splits in range(1, 33):
                sums = 4 * splits * gemm.rows * gemm.cols if splits > 1 or bn < gemm.cols else 0
                l2 = gemm.a_bytes * col_blocks + gemm.b_bytes * row_blocks + (sums or gemm.out_bytes)
                flops = 2 * gemm.rows * gemm.cols * gemm.inner
                tiles = max(l2 / L2_BANDWIDTH, flops / PEAK_FLOPS[gemm.peak])
                seconds = tiles / min(1.0, row_blocks * col_blocks * splits / sms)
                if sums:
                    seconds += (sums + gemm.out_bytes) / HBM_BANDWIDTH
                if best is None or seconds < best[0]:
                    best = seconds, (bm, bn, splits)
    return best[0] / ideal, best[1]


# --- the benchmark shapes ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a model at one input size: what its fused ops are called with."""

    model: str
    side: int
    batch: int
    index: int  # 1-based
    v2: bool
    cin: int  # patch embedding input channels
    C: int
    kernel: int
    stride: int
    padding: int
    H_in: int
    H: int  # token grid side
    heads: int
    sr: int
    hidden: int  # MLP hidden width (v2's dwconv runs on it)
    cls_token: bool  # v1's last stage attends over N + 1 tokens

    @property
    def label(self):
        return f"{self.model} s{self.index} {self.side}px b{self.batch}"

    @property
    def N(self):
        return self.H * self.H + self.cls_token

    @property
    def M(self):
        return (self.H // self.sr) ** 2 if self.sr > 1 else self.N


def stages(model, side, batch):
    """The four stages of ``model`` (a name in ``pvt_fast.models.CONFIGS``) on a ``side`` x ``side`` image."""
    from pvt_fast.models import CONFIGS

    _, cfg = CONFIGS[model]
    v2 = model.startswith("pvt_v2")
    out, H_in, cin = [], side, 3
    for i, C in enumerate(cfg["embed_dims"]):
        if v2:
            k, s, p = (7, 4, 3) if i == 0 else (3, 2, 1)
        else:
            k = s = cfg["patch_size"] if i == 0 else 2
            p = 0
        H = (H_in + 2 * p - k) // s + 1
        out.append(Stage(model, side, batch, i + 1, v2, cin, C, k, s, p, H_in, H, cfg["num_heads"][i],
                         cfg["sr_ratios"][i], int(C * cfg["mlp_ratios"][i]), not v2 and i == len(cfg["embed_dims"]) - 1))
        H_in, cin = H, C
    return out


# --- the unfused PyTorch chains ---------------------------------------------------------------------


def _gemm_peak(dtype):
    from pvt_fast.kernels._common import dot_inputs

    dot = dot_inputs(dtype)
    return "fp32" if dot == "ieee" else dot


def unfused_attention(st, dtype, backward):
    """S = scale Q K^T, P = softmax(S), O = P V per head (the reference); backward by autograd."""
    e = torch.empty((), dtype=dtype).element_size()
    B, N, M, C, h = st.batch, st.N, st.M, st.C, st.heads
    d, peak = C // h, _gemm_peak(dtype)
    q, kv, s = B * N * C * e, B * M * 2 * C * e, B * h * N * M * e

    def per_head(name, rows, cols, inner, **kw):
        g = pytorch_gemm(name, rows, cols, inner, e, peak=peak, **kw)
        return dataclasses.replace(g, accesses=tuple(dataclasses.replace(
            a, distinct=a.distinct * B * h, loaded=a.loaded * B * h, stored=a.stored * B * h) for a in g.accesses),
            flops=g.flops * B * h)

    if not backward:
        launches = (per_head("q @ k^T", N, M, d, a="q", b="k", c="scores"),
                    pytorch_kernel("softmax", {"scores": s}, {"probs": s}),
                    per_head("p @ v", N, d, M, a="probs", b="v", c="o"))
        return OpCost(launches, q + kv + q, 4 * B * N * M * C)
    launches = (per_head("dp = do @ v^T", N, M, d, a="grad_o", b="v", c="grad_probs"),
                per_head("dv = p^T @ do", M, d, N, a="probs", b="grad_o", c="dv"),
                pytorch_kernel("softmax_backward", {"probs": s, "grad_probs": s}, {"grad_scores": s}),
                per_head("dq = ds @ k", N, d, M, a="grad_scores", b="k", c="dq"),
                per_head("dk = ds^T @ q", M, d, N, a="grad_scores", b="q", c="dk"))
    return OpCost(launches, 2 * q + kv + s + q + kv, 8 * B * N * M * C)


def _conv_gemm(name, rows, cout, k_dim, x_bytes, e, peak):
    return pytorch_gemm(name, rows, cout, k_dim, e, a="x", b="weight", c="y", a_distinct=x_bytes, peak=peak)


def _layer_norm(rows, C, e, prefix=""):
    return pytorch_kernel(prefix + "layer_norm", {"y": rows * C * e}, {"out": rows * C * e, "stats": 8 * rows})


def _layer_norm_backward(rows, C, e):
    return pytorch_kernel("layer_norm_backward", {"grad_out": rows * C * e, "y": rows * C * e, "stats": 8 * rows},
                          {"grad_y": rows * C * e})


def _conv_backward(rows, cout, k_dim, x_bytes, e, peak):
    """cuDNN's data and weight gradients, as GEMMs of the conv's sizes."""
    dgrad = pytorch_gemm("conv dgrad", rows, k_dim, cout, e, a="grad_y", b="weight", c="grad_x", peak=peak)
    dgrad = dataclasses.replace(dgrad, accesses=dgrad.accesses[:2] + (Access("grad_x", x_bytes, stored=x_bytes),))
    wgrad = pytorch_gemm("conv wgrad", cout, k_dim, rows, e, a="grad_y", b="x", c="grad_weight", peak=peak)
    return dgrad, wgrad


def conv_layer_norm_chains(rows, cout, k_dim, x_bytes, e, dtype):
    """The PyTorch ops of a conv + LayerNorm: forward, the unfused backward, and the fused ops' backward
    (which recomputes the conv and the LayerNorm statistics before differentiating them)."""
    peak = _gemm_peak(dtype)
    y = rows * cout * e
    forward = (_conv_gemm("conv", rows, cout, k_dim, x_bytes, e, peak), _layer_norm(rows, cout, e))
    backward = (_layer_norm_backward(rows, cout, e),) + _conv_backward(rows, cout, k_dim, x_bytes, e, peak)
    recompute = (_conv_gemm("recompute conv", rows, cout, k_dim, x_bytes, e, peak),
                 _layer_norm(rows, cout, e, "recompute "))
    flops = 2 * rows * cout * k_dim
    return (OpCost(forward, x_bytes + y, flops), OpCost(backward, y + x_bytes + y + x_bytes, 2 * flops),
            OpCost(recompute + backward, y + x_bytes + y + x_bytes, 2 * flops))


def unfused_dwconv(st, dtype, backward):
    e = torch.empty((), dtype=dtype).element_size()
    t = st.batch * st.H * st.H * st.hidden * e
    if not backward:
        return OpCost((pytorch_kernel("depthwise conv", {"x": t}, {"y": t}), pytorch_kernel("gelu", {"y": t}, {"out": t})),
                      2 * t, 18 * t // e)
    return OpCost((pytorch_kernel("gelu_backward", {"grad_out": t, "y": t}, {"grad_y": t}),
                   pytorch_kernel("depthwise dgrad", {"grad_y": t}, {"grad_x": t}),
                   pytorch_kernel("depthwise wgrad", {"grad_y": t, "x": t}, {"grad_weight": 36 * st.hidden})),
                  3 * t, 36 * t // e)


# --- rows ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    op: str  # e.g. "sra_attention fwd"
    stage: Stage
    dtype: torch.dtype
    fused: OpCost
    unfused: OpCost
    kernels: bool  # the fused side launches pvt_fast kernels (False: only PyTorch ops, e.g. a backward)
    gemm: Gemm = None  # the convolution's GEMM, for the forwards of the patch embedding and reduce_kv

    @property
    def shape(self):
        return f"{self.stage.label} {str(self.dtype)[6:]}"


def _gemm_of(cost, rows, cols, inner, a_bytes, e):
    """The :class:`Gemm` of a conv + LayerNorm forward whose fused launches are ``cost``, at the peak its
    convolution kernel (the launch with FLOPs) runs at."""
    return Gemm(rows, cols, inner, a_bytes, e, next(launch.peak for launch in cost.launches if launch.flops))


def _rows_for(st, dtype):
    from pvt_fast.kernels import mlp_dwconv, patch_embed_cuda, reduce_kv, sra_attention

    e = torch.empty((), dtype=dtype).element_size()
    pe = patch_embed_cuda.Problem.for_stage(st, dtype)
    x_bytes = st.batch * st.cin * st.H_in ** 2 * e
    pe_fwd, pe_bwd, pe_recompute = conv_layer_norm_chains(pe.M, st.C, pe.K, x_bytes, e, dtype)
    pe_cost = patch_embed_cuda.forward_cost(pe)
    rows = [Row("patch_embed fwd", st, dtype, pe_cost, pe_fwd, True, _gemm_of(pe_cost, pe.M, st.C, pe.K, x_bytes, e)),
            Row("patch_embed bwd", st, dtype, pe_recompute, pe_bwd, False)]
    if st.sr > 1:
        p = reduce_kv.Problem(st.batch, st.H, st.H, st.C, st.sr, dtype)
        tokens, k_dim = st.batch * (st.H // st.sr) ** 2, st.C * st.sr ** 2
        x_bytes = tokens * k_dim * e
        fwd, bwd, recompute = conv_layer_norm_chains(tokens, st.C, k_dim, x_bytes, e, dtype)
        cost = reduce_kv.forward_cost(p)
        rows += [Row("reduce_kv fwd", st, dtype, cost, fwd, True, _gemm_of(cost, tokens, st.C, k_dim, x_bytes, e)),
                 Row("reduce_kv bwd", st, dtype, recompute, bwd, False)]
    p = sra_attention.Problem(st.batch, st.N, st.M, st.C, st.heads, dtype)
    rows += [Row("sra_attention fwd", st, dtype, sra_attention.forward_cost(p), unfused_attention(st, dtype, False),
                 True),
             Row("sra_attention bwd", st, dtype, sra_attention.backward_cost(p), unfused_attention(st, dtype, True),
                 True)]
    if st.v2:
        p = mlp_dwconv.Problem(st.batch, st.H, st.H, st.hidden, dtype)
        rows += [Row("dwconv_gelu fwd", st, dtype, mlp_dwconv.forward_cost(p), unfused_dwconv(st, dtype, False), True),
                 Row("dwconv_gelu bwd", st, dtype, mlp_dwconv.backward_cost(p), unfused_dwconv(st, dtype, True), True)]
    return rows


def benchmark_rows():
    """Every (op direction, stage, dtype) of the benchmark shapes, under torch's default fp32 matmul precision
    ("highest": fp32 dots are exact fp32)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return [row for model in MODELS for side, batch in POINTS for st in stages(model, side, batch)
                for dtype in DTYPES for row in _rows_for(st, dtype)]
    finally:
        torch.set_float32_matmul_precision(saved)


def format_rows(rows):
    header = ("op", "shape", "programs", "L2 MB", "HBM MB", "min MB", "GFLOP", "flop x", "pred us", "ideal us",
              "unfused us", "floor", "")
    table = []
    worst = None
    for row in rows:
        s, u = summarize(row.fused), summarize(row.unfused)
        programs = max((launch.programs for launch in row.fused.launches if not launch.pytorch), default=0)
        table.append((row.op + ("" if row.kernels else " (PyTorch ops)"), row.shape, str(programs),
                      f"{s.l2 / 1e6:.1f}", f"{s.hbm / 1e6:.1f}", f"{s.minimum / 1e6:.1f}", f"{s.flops / 1e9:.2f}",
                      f"{s.flops / max(1, s.useful_flops):.2f}", f"{s.predicted * 1e6:.1f}", f"{s.ideal * 1e6:.1f}",
                      f"{u.predicted * 1e6:.1f}", f"x{gemm_floor(row.gemm, s.ideal)[0]:.2f}" if row.gemm else "",
                      f"traffic x{s.ratio:.2f}"))
        if row.kernels and (worst is None or s.ratio > worst[0]):
            worst = (s.ratio, row.op, row.shape)
    widths = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if worst is not None:
        lines.append(f"traffic: worst x{worst[0]:.2f} ({worst[1]}, {worst[2]})")
    return "\n".join(lines)


__all__ = ["HBM_BANDWIDTH", "L2_BANDWIDTH", "L2_BYTES", "MAX_TILE_ELEMENTS", "PEAK_FLOPS", "R_LIMIT", "Gemm", "Row",
           "Summary", "benchmark_rows", "format_rows", "gemm_floor", "hbm_bytes", "launch_seconds", "stages",
           "summarize"]
