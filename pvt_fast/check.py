"""``python -m pvt_fast check``: every fused op against its PyTorch composite on this machine's GPU.

The ``fused`` op table (patch_embed, reduce_kv, reduce_kv_linear, attention, dwconv_gelu) runs forward and
backward on tiny odd shapes and on every op call of pvt_v2_b2 and pvt_v2_b2_li (linear reduction, ReLU
before the depthwise conv) at 224x224 batch 8 and 1024x1024 batch 1, in fp32, fp16 and bf16; then whole
models (pvt_v2_b0, pvt_tiny, pvt_v2_b2_li) run on the ``fused`` backend against the ``sdpa`` one (fp32, and
fp16 / bf16 under autocast).
``--quick`` keeps the tiny shapes and pvt_v2_b0.

The rule (flash-attention's): a float64 run of the composite is the reference; the fused result's error
``max|y - ref| / max|ref|`` may be at most twice the composite's own error in the same dtype plus one unit of
the dtype's rounding (``torch.finfo(dtype).eps``). A backward row holds the largest error over all gradients
(the row names that gradient) to twice the composite's largest: per tensor, with a hundred parameter
gradients in a model, the ratio of two rounding errors would exceed 2 by chance alone. Each fused case runs
twice and must give bitwise-equal outputs and gradients.
A whole model's floor is the largest of five composite errors: the composite's own, and those of the
composite run on an input and parameters perturbed as much as one fp32 rounding of each moves them (four
random draws: any fp32 computation of the model commits errors of that size at its inputs, the
backward-stability yardstick; under fp16 / bf16 autocast the half-precision casts absorb most of the
perturbation, and these runs mostly repeat the composite's own error). Its gradients include sums that mostly
cancel (a query bias's gradient sums the queries' gradients over every token), whose relative error is a draw
from a wide distribution: rounding-sized noise on one kernel's output alone moved pvt_v2_b0's worst gradient
error between 0.7x and 3.9x the composite's own. Times are medians of CUDA-synchronized calls (forward rows:
the forward; backward rows: forward + backward).

Without CUDA the check cannot run (exit 2), except ``--quick`` under ``TRITON_INTERPRET=1``, which runs the
Triton kernels on the CPU: ops in fp32 and fp16 (the interpreter's bf16 products are not meaningful), the
model in fp32 (the interpreter is slow), no patch embedding (no CPU kernel to check) and no times (they would
time the interpreter). Exit status: 0 every check passed, 1 a check failed, 2 the check could not run.
"""
import contextlib
import copy
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch

from pvt_fast.profiler import median_seconds

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_FACTOR = 2.0  # the fused error may be at most this times the composite's, plus the dtype's eps
PERTURBED_DRAWS = 4  # a whole model's composite also runs on this many perturbed inputs (see above)
TIMED_CALLS = 5
STAGE_SHAPES = ((224, 8), (1024, 1))  # (image size, batch) of the pvt_v2_b2 stage cases
# name -> ((H, W), batch). Every stage of these inputs has at least two keys: with one, softmax is constant and
# the exact query gradients are zero, so no relative error could be measured.
MODELS = {"pvt_v2_b0": ((224, 224), 2), "pvt_tiny": ((224, 224), 2), "pvt_v2_b2_li": ((224, 224), 2)}
QUICK_MODELS = {"pvt_v2_b0": ((61, 33), 1)}


@dataclass
class Case:
    """One call of an op-table function: ``args`` maps its parameter names to float64 tensors or plain values."""
    op: str
    shape: str
    args: dict


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    direction: str  # "forward" or "backward"
    rel_err: float = math.nan
    tolerance: float = math.nan
    worst: str = ""  # the output or gradient with the largest error
    same_twice: bool = False
    fused_ms: float = None
    composite_ms: float = None
    error: str = ""  # why the case could not run

    @property
    def problems(self):
        """Why the row failed (empty when it passed)."""
        if self.error:
            return [self.error]
        found = [] if self.rel_err <= self.tolerance else [f"error {self.rel_err:.2e} > tolerance {self.tolerance:.2e}"]
        return found + ([] if self.same_twice else ["differs between two runs"])

    @property
    def ok(self):
        return not self.problems


@dataclass
class Report:
    device: str
    environment: dict
    quick: bool
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    interrupted: bool = False

    @property
    def failures(self):
        return [r for r in self.rows if not r.ok]

    @property
    def verdict(self):
        return "pass" if self.rows and not self.failures and not self.interrupted else "fail"


# inputs -----------------------------------------------------------------------------------------------------


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


LN_EPS = 1e-5  # the models' LayerNorm eps in the patch embeddings and the K/V reductions


def _patch_embed_case(gen, label, B, cin, cout, H, W, k, stride, layout):
    x = _randn(gen, B, cin, H, W) if layout == "nchw" else _randn(gen, B, H, W, cin)
    return Case("patch_embed", label, dict(
        x=x, weight=_randn(gen, cout, cin, k, k, scale=(cin * k * k) ** -0.5), bias=_randn(gen, cout, scale=0.1),
        norm_weight=1 + _randn(gen, cout, scale=0.1), norm_bias=_randn(gen, cout, scale=0.1), eps=LN_EPS,
        stride=stride, padding=k // 2, layout=layout))


def _reduce_case(gen, label, B, H, W, C, sr, linear):
    k = 1 if linear else sr
    return Case("reduce_kv_linear" if linear else "reduce_kv", label, dict(
        x=_randn(gen, B, H * W, C), H=H, W=W, sr_weight=_randn(gen, C, C, k, k, scale=(C * k * k) ** -0.5),
        sr_bias=_randn(gen, C, scale=0.1), norm_weight=1 + _randn(gen, C, scale=0.1),
        norm_bias=_randn(gen, C, scale=0.1), eps=LN_EPS))


def _attention_case(gen, label, B, N, M, heads, d):
    return Case("attention", label, dict(q=_randn(gen, B, N, heads * d), kv=_randn(gen, B, M, 2 * heads * d),
                                         num_heads=heads, scale=d ** -0.5, dropout_p=0.0))


def _dwconv_case(gen, label, B, H, W, C, relu):
    return Case("dwconv_gelu", label, dict(x=_randn(gen, B, H * W, C), H=H, W=W,
                                           weight=_randn(gen, C, 1, 3, 3, scale=1 / 3),
                                           bias=_randn(gen, C, scale=0.1), relu_prologue=relu))


def tiny_cases():
    """Odd, prime and non-square sizes, tails smaller than a block, batch 1."""
    gen = torch.Generator().manual_seed(0)
    return [
        _patch_embed_case(gen, "b2 3x29x35 k7s4 ->24", 2, 3, 24, 29, 35, 7, 4, "nchw"),
        _patch_embed_case(gen, "b1 9x13x24 k3s2 ->40", 1, 24, 40, 9, 13, 3, 2, "nhwc"),
        _reduce_case(gen, "b2 9x13 C40 sr4", 2, 9, 13, 40, 4, linear=False),
        _reduce_case(gen, "b1 11x7 C24 sr2", 1, 11, 7, 24, 2, linear=False),
        _reduce_case(gen, "b2 9x15 C24", 2, 9, 15, 24, 1, linear=True),
        _attention_case(gen, "b2 N37 M23 h2 d32", 2, 37, 23, 2, 32),
        _attention_case(gen, "b1 N21 M49 h5 d16", 1, 21, 49, 5, 16),
        _dwconv_case(gen, "b2 5x7 C24", 2, 5, 7, 24, relu=False),
        _dwconv_case(gen, "b1 3x9 C40 relu", 1, 3, 9, 40, relu=True),
    ]


def stage_cases(name="pvt_v2_b2", shapes=STAGE_SHAPES):
    """Every op call of ``name`` and of its v2-li variant (same stages: linear reduction, ReLU before the
    depthwise conv), for each (image size, batch)."""
    from pvt_fast.models import CONFIGS
    from pvt_fast.ops.patch_embed import output_size

    cfg = CONFIGS[name][1]
    gen = torch.Generator().manual_seed(1)
    cases = []
    for size, B in shapes:
        H = W = size
        cin = 3
        for i, C in enumerate(cfg["embed_dims"]):
            k, stride = (7, 4) if i == 0 else (3, 2)
            label = f"{size}px b{B} stage{i + 1}"
            cases.append(_patch_embed_case(gen, f"{label} {H}x{W}x{cin} k{k}s{stride} ->{C}", B, cin, C, H, W,
                                           k, stride, "nchw" if i == 0 else "nhwc"))
            H, W = output_size(H, W, k, stride, k // 2)
            heads, sr = cfg["num_heads"][i], cfg["sr_ratios"][i]
            M = (H // sr) * (W // sr)
            if sr > 1:
                cases.append(_reduce_case(gen, f"{label} {H}x{W} C{C} sr{sr}", B, H, W, C, sr, linear=False))
            cases.append(_reduce_case(gen, f"{label} {H}x{W} C{C} (li)", B, H, W, C, 1, linear=True))
            cases.append(_attention_case(gen, f"{label} N{H * W} M{M} h{heads}", B, H * W, M, heads, C // heads))
            hidden = C * cfg["mlp_ratios"][i]
            cases.append(_dwconv_case(gen, f"{label} {H}x{W} C{hidden}", B, H, W, hidden, relu=False))
            cases.append(_dwconv_case(gen, f"{label} {H}x{W} C{hidden} relu (li)", B, H, W, hidden, relu=True))
            cin = C
    return cases


# running and measuring ---------------------------------------------------------------------------------------


def _median_ms(call, device, timed):
    """Median milliseconds of ``call`` over TIMED_CALLS synchronized calls; None when not ``timed``."""
    return median_seconds(call, device, TIMED_CALLS) * 1e3 if timed else None


def _leaves(args, dtype, device):
    """``args`` with every tensor cast to ``dtype`` on ``device`` as a fresh leaf that requires grad."""
    return {k: v.detach().to(device=device, dtype=dtype).requires_grad_() if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}


def _output(result):
    return result[0] if isinstance(result, tuple) else result  # patch_embed returns (tokens, H, W)


def _with_grads(out, leaves, grad_out):
    """``out`` and the gradient of every tensor in the dict ``leaves`` for ``grad_out``, by name."""
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor)]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], grad_out)
    return {"output": out.detach(), **{f"grad {k}": g for k, g in zip(names, grads)}}


def rel_err(y, ref):
    """max |y - ref| / max |ref|, in float64 (inf when y has a non-finite value)."""
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return math.inf
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)).item()


def _judge(row, fused, composites, ref, dtype):
    """Fill ``row`` from the named tensors of the runs: the fused run's largest error (and where), and its
    tolerance from the largest error of the composite runs (``composites``: one or more) over the same
    tensors."""
    errors = {name: rel_err(fused[name], ref[name]) for name in fused}
    row.worst = max(errors, key=errors.get)
    row.rel_err = errors[row.worst]
    floor = max(rel_err(composite[name], ref[name]) for composite in composites for name in fused)
    row.tolerance = GRAD_FACTOR * floor + torch.finfo(dtype).eps


def _describe(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _compare(rows, run, dtype, device, timed, floors=("composite",)):
    """Fill the forward and backward ``rows`` from ``run(impl, backward)``, where ``impl`` is ``"reference"``
    (float64 composite), ``"fused"`` or one of ``floors`` (the composite runs that set the tolerance:
    ``"composite"``, and for models the ``"perturbed i"`` runs): with ``backward`` it returns the output and every
    gradient by name, without it just runs the forward (for timing)."""
    try:
        ref, first, second = (run(impl, True) for impl in ("reference", "fused", "fused"))
        composites = [run(impl, True) for impl in floors]
    except Exception as err:  # one broken case is a failing row, not the end of the check
        for row in rows:
            row.error = _describe(err)
        return rows
    for row, backward in zip(rows, (False, True)):
        names = [k for k in first if (k != "output") == backward]
        pick = lambda r: {k: r[k] for k in names}  # noqa: E731
        _judge(row, pick(first), [pick(c) for c in composites], pick(ref), dtype)
        row.same_twice = all(torch.equal(first[k], second[k]) for k in names)
        row.fused_ms = _median_ms(lambda: run("fused", backward), device, timed)
        row.composite_ms = _median_ms(lambda: run("composite", backward), device, timed)
    return rows


def check_case(case, dtype_name, fused_ops, composite_ops, device, timed):
    """The forward and backward rows of one op case in one dtype."""
    dtype = DTYPES[dtype_name]
    fns = {"reference": getattr(composite_ops, case.op), "composite": getattr(composite_ops, case.op),
           "fused": getattr(fused_ops, case.op)}
    args = {impl: _leaves(case.args, torch.float64 if impl == "reference" else dtype, device) for impl in fns}
    with torch.no_grad():
        shape = _output(fns["reference"](*args["reference"].values())).shape
    grad64 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    grad_out = {impl: grad64.to(torch.float64 if impl == "reference" else dtype) for impl in fns}

    def run(impl, backward):
        if not backward:
            with torch.no_grad():
                return fns[impl](*args[impl].values())
        return _with_grads(_output(fns[impl](*args[impl].values())), args[impl], grad_out[impl])

    return _compare([Row(case.op, case.shape, dtype_name, d) for d in ("forward", "backward")], run, dtype,
                    device, timed)


def _perturbed(target, seed):
    """``target`` (a float32 tensor, or a module whose parameters are) with about one nonzero element in twelve
    moved to its float32 neighbour, above or below, at random (draw ``seed``): the root mean square of the
    change, ulp / sqrt(12), is that of rounding every element to nearest once. In place for a module."""
    gen = torch.Generator().manual_seed(1000 + seed)

    def nudge(t):
        u = torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.device)
        moved = torch.nextafter(t, torch.where(u < 1 / 24, -math.inf, math.inf).to(t.dtype))
        return torch.where((u < 1 / 12) & (t != 0), moved, t)  # rounding never moves a zero

    if isinstance(target, torch.Tensor):
        return nudge(target)
    with torch.no_grad():
        for p in target.parameters():
            p.copy_(nudge(p))
    return target


def check_model(name, size, batch, dtype_name, device, timed):
    """Forward and backward rows of model ``name``: ``fused`` against ``sdpa`` (fp16 / bf16 under autocast),
    every parameter gradient compared."""
    import pvt_fast

    torch.manual_seed(0)
    sdpa = pvt_fast.create_model(name, backend="sdpa", num_classes=10).to(device)
    fused = pvt_fast.create_model(name, backend="fused", num_classes=10).to(device)
    fused.load_state_dict(sdpa.state_dict())
    models = {"reference": copy.deepcopy(sdpa).double(), "composite": sdpa, "fused": fused}
    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(batch, 3, *size, generator=gen, dtype=torch.float64).to(device)
    x = {"reference": x64, "composite": x64.float(), "fused": x64.float()}
    perturbed = [f"perturbed {i}" for i in range(PERTURBED_DRAWS)]
    for i, impl in enumerate(perturbed):
        models[impl], x[impl] = _perturbed(copy.deepcopy(sdpa), 2 * i), _perturbed(x64.float(), 2 * i + 1)
    grad_out = torch.randn(batch, 10, generator=gen, dtype=torch.float64).to(device)
    autocast_dtype = None if dtype_name == "fp32" else DTYPES[dtype_name]

    def run(impl, backward):
        amp = (contextlib.nullcontext() if impl == "reference" or autocast_dtype is None
               else torch.autocast(device.type, dtype=autocast_dtype))
        with amp, torch.set_grad_enabled(backward):
            out = models[impl](x[impl])
        if not backward:
            return out
        return _with_grads(out, dict(models[impl].named_parameters()), grad_out.to(out.dtype))

    label = "fp32" if autocast_dtype is None else f"{dtype_name} autocast"
    rows = [Row(name, f"b{batch} {size[0]}x{size[1]}", label, d) for d in ("forward", "backward")]
    return _compare(rows, run, DTYPES[dtype_name], device, timed, floors=("composite", *perturbed))


# the command -------------------------------------------------------------------------------------------------


def _environment(device):
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "cudnn_deterministic": torch.backends.cudnn.deterministic}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
    else:
        env["gpu"] = None
        env["capability"] = None
    return env


def _fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _result(row):
    return "ok" if row.ok else "FAIL: " + "; ".join(row.problems)


def format_table(rows):
    header = ("op", "shape", "dtype", "pass", "rel err", "tolerance", "worst", "same twice", "fused ms",
              "composite ms", "result")
    lines = [header]
    for r in rows:
        lines.append((r.op, r.shape, r.dtype, r.direction, _fmt(r.rel_err, ".2e"), _fmt(r.tolerance, ".2e"),
                      r.worst, "yes" if r.same_twice else "no", _fmt(r.fused_ms, ".3f"),
                      _fmt(r.composite_ms, ".3f"), _result(r)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def verdict_line(report):
    env = report.environment
    where = (f"{env['gpu']} (sm_{''.join(map(str, env['capability']))})" if env["gpu"]
             else "the CPU under TRITON_INTERPRET=1")
    versions = f"torch {env['torch']}, triton {env['triton']}"
    failures = report.failures
    if report.verdict == "pass":
        return f"verdict: PASS, {len(report.rows)} checks on {where}, {versions}"
    why = [f"{r.op} {r.shape} {r.dtype} {r.direction} ({'; '.join(r.problems)})" for r in failures[:5]]
    more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
    stopped = " (interrupted before the end)" if report.interrupted else ""
    return (f"verdict: FAIL{stopped}, {len(failures)} of {len(report.rows)} checks failed on {where}, {versions}: "
            + "; ".join(why) + more)


def _where_to_run():
    """The device the check runs on, or the reason it cannot run here."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available() and not interpreted:
        return torch.device("cuda", torch.cuda.current_device()), None
    if interpreted:
        return torch.device("cpu"), "TRITON_INTERPRET=1 runs the Triton kernels on the CPU: only --quick runs there"
    return None, ("no CUDA device: the fused kernels run on NVIDIA GPUs; nothing to check here. "
                  "On a CPU the sdpa backend runs (the default). To try the kernels on the CPU: "
                  "TRITON_INTERPRET=1 python -m pvt_fast check --quick")


def run_check(device, quick, log=print):
    """Run the check on ``device`` and return the :class:`Report`; ``log`` gets a line per finished case."""
    from pvt_fast.ops import get_backend_ops
    from pvt_fast.ops.patch_embed import extension_loaded

    on_cuda = device.type == "cuda"
    report = Report(str(device), _environment(device), quick)
    dtypes = list(DTYPES) if on_cuda else ["fp32", "fp16"]
    cases = tiny_cases() if quick else tiny_cases() + stage_cases()
    if not on_cuda:
        report.notes.append("patch_embed: no kernel on the CPU (the fused op runs its composite); not checked")
        report.notes.append("under the interpreter: no bf16, models in fp32 only, no times")
        cases = [c for c in cases if c.op != "patch_embed"]
    elif not extension_loaded():
        report.notes.append("patch_embed: the CUDA extension pvt_fast._C is not built: the fused backend runs the "
                            "PyTorch composite for it (build with nvcc present)")
    fused_ops, composite_ops = get_backend_ops("fused"), get_backend_ops("sdpa")
    models = QUICK_MODELS if quick else MODELS
    try:
        for case in cases:
            for dtype_name in dtypes:
                rows = check_case(case, dtype_name, fused_ops, composite_ops, device, timed=on_cuda)
                report.rows += rows
                log("\n".join(_progress(r) for r in rows))
        for name, (size, batch) in models.items():
            for dtype_name in dtypes if on_cuda else ["fp32"]:
                rows = check_model(name, size, batch, dtype_name, device, timed=on_cuda)
                report.rows += rows
                log("\n".join(_progress(r) for r in rows))
    except KeyboardInterrupt:
        report.interrupted = True
    if on_cuda and not extension_loaded():
        for row in report.rows:
            if row.op == "patch_embed":
                row.error = "CUDA extension not built"
    return report


def _progress(row):
    return (f"  {row.op} {row.shape} {row.dtype} {row.direction}: "
            + _result(row) + f" (rel err {_fmt(row.rel_err, '.2e')})")


def _finite_or_text(value):
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def to_json(report):
    rows = [{**{k: _finite_or_text(v) for k, v in asdict(r).items()}, "ok": r.ok, "problems": r.problems}
            for r in report.rows]
    return {"verdict": report.verdict, "device": report.device, **report.environment, "quick": report.quick,
            "interrupted": report.interrupted, "notes": report.notes, "rows": rows}


def main(args):
    """The ``check`` subcommand: ``args`` has ``quick`` and ``json`` (a path or None). Returns the exit status."""
    device, limitation = _where_to_run()
    if device is None or (device.type == "cpu" and not args.quick):
        print(f"pvt_fast check: {limitation}", file=sys.stderr)
        return 2
    print(f"pvt_fast check on {device}{' (--quick)' if args.quick else ''}: fused vs composite "
          f"(float64 reference; tolerance {GRAD_FACTOR:g} x composite error + dtype eps)", file=sys.stderr)
    report = run_check(device, args.quick, log=lambda line: print(line, file=sys.stderr))
    print(format_table(report.rows))
    for note in report.notes:
        print(f"note: {note}")
    print(verdict_line(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(report), f, indent=1, allow_nan=False)
    return 0 if report.verdict == "pass" else 1
