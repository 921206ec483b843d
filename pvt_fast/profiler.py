"""Per-stage time, peak memory and FLOPs of a PVT model at high resolution, on CPU or CUDA.

:func:`profile_model` (the engine of ``python -m pvt_fast profile``) runs ``forward_pyramid`` under
``torch.no_grad`` for pvt_fast's backend and a comparison backend, at the requested size and at a sweep of
smaller ones, and writes to an output folder:

- ``report.md`` / ``report.json``: per-stage table (tokens N, keys M, FLOPs, time, peak memory) and the sweep;
- ``trace.json``: a chrome trace of one forward pass (open it in https://ui.perfetto.dev), each stage a
  ``pvt_fast.stage<i>`` range;
- ``memory_time.png``: peak memory and time against resolution for pvt_fast, the comparison backend and
  plain global attention (one stage-1 layer with the N x N score matrix; analytic where it cannot run).

Definitions. Time: median of the timed runs after warm-up (the device synchronized around each). Peak
memory: the most bytes allocated at once during the forward (or a stage) above what was allocated when the
forward began, so weights and the input are not counted. CUDA reads it from the caching allocator; the CPU
allocator keeps no totals, so on CPU it is read from the allocation events of a ``torch.profiler`` run
(``profile_memory=True``).
FLOPs come from :mod:`pvt_fast.flops` (2 x multiply-adds).
"""
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pvt_fast.flops import stage_flops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SWEEP_SIZES = (224, 512, 1024, 2048, 4096, 8192)
CPU_CAP_BYTES = 2 * 2**30  # the most one measured case may allocate on CPU (plain attention is capped)
STAGE_RANGE = "pvt_fast.stage{}"


class ProfileArgumentError(ValueError):
    """A bad argument to :func:`profile_model` (the CLI prints it without a traceback)."""


# --- memory and time primitives -----------------------------------------------------------------------


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def available_bytes(device):
    """Memory a new allocation can still get: free CUDA memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cpu_memory_timeline(trace_path):
    """From a chrome trace written with ``profile_memory=True``: the CPU bytes allocated since the profile
    began after each allocation event, as sorted ``(timestamp_us, bytes)``, and the ``(start, end)`` of
    every user range by name."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    deltas, ranges = [], {}
    for e in events:
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0:
            deltas.append((e["ts"], e["args"]["Bytes"]))
        elif e.get("ph") == "X" and e.get("cat") == "user_annotation":
            ranges[e["name"]] = (e["ts"], e["ts"] + e["dur"])
    deltas.sort()
    timeline, live = [], 0
    for ts, n in deltas:
        live += n
        timeline.append((ts, live))
    return timeline, ranges


def _peak_in(timeline, start, end):
    """Most bytes live in ``[start, end]``, counting what was live when the range began."""
    peak = 0
    for ts, live in timeline:
        if ts < start:
            peak = live
        elif ts <= end:
            peak = max(peak, live)
        else:
            break
    return max(peak, 0)


def peak_memory_bytes(fn, device):
    """Run ``fn()`` once and return ``(result, peak_bytes)``.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (what was live before the
    call, such as weights and inputs, is included). CPU: the peak of the allocations made during the call,
    from torch.profiler memory events (not the process RSS).
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        return out, torch.cuda.max_memory_allocated(device)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        prof.export_chrome_trace(trace)
        timeline, _ = _cpu_memory_timeline(trace)
    return out, max([0] + [live for _, live in timeline])


# --- stage boundaries -----------------------------------------------------------------------------------


def stage_modules(model):
    """``(first, last)`` submodule of every stage: its patch embedding and its norm (v2) or last block (v1)."""
    bounds = []
    for i in range(1, model.num_stages + 1):
        last = getattr(model, f"norm{i}") if hasattr(model, f"norm{i}") else getattr(model, f"block{i}")[-1]
        bounds.append((getattr(model, f"patch_embed{i}"), last))
    return bounds


@contextmanager
def stage_hooks(model, on_enter, on_exit):
    """Call ``on_enter(i)`` before stage ``i`` (0-based) runs and ``on_exit(i)`` after it, via forward hooks."""
    handles = []
    for i, (first, last) in enumerate(stage_modules(model)):
        handles.append(first.register_forward_pre_hook(lambda m, args, i=i: on_enter(i)))
        handles.append(last.register_forward_hook(lambda m, args, out, i=i: on_exit(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- measurements ---------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One thing measured at one size. ``skipped`` says why it did not run (then the numbers are None)."""
    label: str
    size: int
    time_s: float | None = None
    peak_mem_bytes: int | None = None
    stage_time_s: list = field(default_factory=list)
    stage_peak_mem_bytes: list = field(default_factory=list)
    skipped: str | None = None


def _timed_runs(model, x, repeat):
    """Median forward time and median per-stage times over ``repeat`` runs."""
    device = x.device
    cuda = device.type == "cuda"
    n = model.num_stages
    totals, stages = [], [[] for _ in range(n)]
    for _ in range(repeat):
        marks = {}

        def mark(key):
            if cuda:
                marks[key] = torch.cuda.Event(enable_timing=True)
                marks[key].record()
            else:
                marks[key] = time.perf_counter()

        synchronize(device)
        with stage_hooks(model, lambda i: mark(("in", i)), lambda i: mark(("out", i))):
            mark("start")
            model.forward_pyramid(x)
            mark("end")
        synchronize(device)
        if cuda:
            span = lambda a, b: marks[a].elapsed_time(marks[b]) / 1e3  # noqa: E731
        else:
            span = lambda a, b: marks[b] - marks[a]  # noqa: E731
        totals.append(span("start", "end"))
        for i in range(n):
            stages[i].append(span(("in", i), ("out", i)))
    return statistics.median(totals), [statistics.median(s) for s in stages]


def _profiled_run(model, x, trace_path):
    """One forward pass under torch.profiler, each stage a named range; writes the chrome trace and returns
    ``(output, peak bytes, per-stage peak bytes)`` above what was allocated when the forward began."""
    device = x.device
    cuda = device.type == "cuda"
    n = model.num_stages
    ranges, stage_peaks = [None] * n, [0] * n
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def enter(i):
        ranges[i] = record_function(STAGE_RANGE.format(i + 1))
        ranges[i].__enter__()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def leave(i):
        if cuda:
            stage_peaks[i] = torch.cuda.max_memory_allocated(device) - base
        ranges[i].__exit__(None, None, None)

    synchronize(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        with stage_hooks(model, enter, leave), record_function("pvt_fast.forward"):
            out = model.forward_pyramid(x)
        synchronize(device)
    total_peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    prof.export_chrome_trace(str(trace_path))
    if cuda:
        total_peak = max([total_peak] + stage_peaks)
    else:
        timeline, named = _cpu_memory_timeline(trace_path)
        stage_peaks = [_peak_in(timeline, *named[STAGE_RANGE.format(i + 1)]) for i in range(n)]
        total_peak = _peak_in(timeline, *named["pvt_fast.forward"])
    return out, total_peak, stage_peaks


def forward_bytes_estimate(model, size, batch, itemsize):
    """A rough upper estimate of the activation bytes of ``forward_pyramid``: the widest MLP activations of a
    stage plus, for the reference backend, its two materialized N x M attention matrices."""
    worst = 0
    for s, blk in zip(stage_flops(model, size, batch, pyramid=True),
                      (getattr(model, f"block{i + 1}")[0] for i in range(model.num_stages))):
        mlp = 3 * batch * s.tokens * blk.mlp.fc1.out_features * itemsize
        scores = 2 * batch * blk.attn.num_heads * s.tokens * s.keys * itemsize if model.backend == "reference" else 0
        worst = max(worst, mlp + scores)
    return worst


def measure_model(model, x, label, repeat, warmup, trace_path):
    """Warm up, profile one pass (trace + memory), then time ``repeat`` passes of ``model.forward_pyramid``."""
    size = x.shape[-1]
    need = forward_bytes_estimate(model, size, x.shape[0], x.element_size())
    have = available_bytes(x.device)
    if need > 0.8 * have:
        return Measurement(label, size, skipped=f"needs about {need / 2**30:.2f} GiB, "
                                                 f"{have / 2**30:.2f} GiB available"), None
    with torch.no_grad():
        for _ in range(warmup):
            model.forward_pyramid(x)
        out, peak, stage_peaks = _profiled_run(model, x, trace_path)
        total, stage_times = _timed_runs(model, x, repeat)
    return Measurement(label, size, total, peak, stage_times, stage_peaks), out


def plain_attention_bytes(tokens, dim, heads, batch, itemsize):
    """Peak bytes of plain global attention softmax(Q K^T * scale) V over ``tokens`` tokens, beyond its
    inputs: two N x N matrices per head live at once (scores and probabilities) plus the output."""
    return 2 * batch * heads * tokens * tokens * itemsize + batch * tokens * dim * itemsize


def measure_plain_attention(model, size, batch, dtype, device, repeat, warmup):
    """Plain global attention over all of stage 1's tokens (one layer, N x N scores materialized), as a
    ViT with 4x4 patches would run it; skipped when its score matrices would not fit."""
    from pvt_fast.ops import get_backend_ops

    first = stage_flops(model, size, batch, pyramid=True)[0]
    dim, heads = model.embed_dims[0], model.block1[0].attn.num_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = plain_attention_bytes(first.tokens, dim, heads, batch, itemsize)
    cap = 0.8 * available_bytes(device)
    if device.type == "cpu":
        cap = min(cap, CPU_CAP_BYTES)
    label = "plain attention"
    if need > cap:
        return Measurement(label, size, skipped=f"needs {need / 2**30:.2f} GiB, cap {cap / 2**30:.2f} GiB")
    attention = get_backend_ops("reference").attention
    q = torch.randn(batch, first.tokens, dim, device=device, dtype=dtype)
    kv = torch.randn(batch, first.tokens, 2 * dim, device=device, dtype=dtype)
    scale = (dim // heads) ** -0.5
    run = lambda: attention(q, kv, heads, scale)  # noqa: E731
    with torch.no_grad():
        for _ in range(warmup):
            run()
        synchronize(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        _, peak = peak_memory_bytes(run, device)
        times = []
        for _ in range(repeat):
            synchronize(device)
            t = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - t)
    return Measurement(label, size, statistics.median(times), peak - base)


# --- the whole profile ----------------------------------------------------------------------------------


def _sweep_sizes(size, min_size):
    sizes = [s for s in SWEEP_SIZES if min_size <= s < size]
    if not sizes:
        sizes = [max(min_size, size // 2)] if size // 2 >= min_size else []
    return sorted(set(sizes + [size]))


def _resolve_device(device):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ProfileArgumentError(expected) from err
    if device.type not in ("cpu", "cuda"):
        raise ProfileArgumentError(expected)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProfileArgumentError(f"device {str(device)!r} was asked for but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ProfileArgumentError(f"device {str(device)!r} was asked for but only {torch.cuda.device_count()} "
                                   "CUDA device(s) are visible")
    return device


def _resolve_backend(argument, backend, device):
    """``backend`` (the value of ``argument``) as a concrete name; ``fused`` must be able to run on ``device``."""
    from pvt_fast import resolve_backend
    from pvt_fast._backend import ENV_VAR

    try:
        concrete = resolve_backend(backend)
    except ValueError as err:
        raise ProfileArgumentError(str(err)) from err
    if concrete == "fused" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = f" (from {ENV_VAR}={os.environ[ENV_VAR]})" if backend == "auto" and os.environ.get(ENV_VAR) else ""
        raise ProfileArgumentError(
            f"{argument} {backend!r} resolves to 'fused'{why}, which runs on CUDA, or on CPU only with "
            f"TRITON_INTERPRET=1 set; on device 'cpu' use --{argument} sdpa")
    return concrete


def _out_folder(out_dir):
    """``out_dir`` created if need be, once a file can be written in it."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise ProfileArgumentError(f"out must be a folder that can be written, got {str(out_dir)!r} "
                                   f"({err.strerror or err})") from err
    return out_dir


def _build(name, backend, size, dtype, device):
    """The model ``name`` on the concrete ``backend``, built for ``size x size``."""
    from pvt_fast import create_model

    return create_model(name, backend=backend, img_size=size).to(device=device, dtype=dtype).eval()


def _check_args(name, size, batch, dtype, backend, compare, repeat):
    """Raise :class:`ProfileArgumentError` for the first bad argument; return the model's smallest input."""
    from pvt_fast import BACKENDS
    from pvt_fast.models import CONFIGS, create_model

    if name not in CONFIGS:
        raise ProfileArgumentError(f"model must be one of {', '.join(CONFIGS)}, got {name!r}")
    if dtype not in DTYPES:
        raise ProfileArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ProfileArgumentError(f"batch must be a positive integer, got {batch!r}")
    if repeat is not None and (not isinstance(repeat, int) or repeat < 1):
        raise ProfileArgumentError(f"repeat must be a positive integer, got {repeat!r}")
    if backend not in ("auto",) + BACKENDS:
        raise ProfileArgumentError(f"backend must be one of auto, {', '.join(BACKENDS)}, got {backend!r}")
    if compare is not None and compare not in BACKENDS:
        raise ProfileArgumentError(f"compare must be one of {', '.join(BACKENDS)} or None, got {compare!r}")
    with torch.device("meta"):
        min_size = create_model(name, backend="reference").min_input_size
    if not isinstance(size, int) or size < min_size:
        raise ProfileArgumentError(f"size must be at least {name}'s min_input_size {min_size}, got {size!r}")
    return min_size


def profile_model(name, size, out_dir, batch=1, dtype="fp32", backend="auto", compare="reference",
                  device="auto", sweep=None, repeat=None, log=None):
    """Profile ``name`` at ``size`` x ``size`` (see the module docstring); returns the report as a dict.

    ``sweep``: the resolutions of the memory/time plot (default: 224, 512, 1024, ... below ``size``, and
    ``size``). ``repeat``: timed runs per point (default 10 on CUDA; on CPU 2 at ``size`` and 1 at the other
    sweep points, so that the README's CPU demo stays short). ``log``: a callable taking a progress line
    (default: print to stderr).

    Every argument is checked before anything runs: a bad one (an unknown device, a backend that cannot run
    on the device, such as ``fused`` on the CPU without ``TRITON_INTERPRET=1``, an ``out_dir`` that cannot be
    written) raises :class:`ProfileArgumentError`; nothing falls back to another backend.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    min_size = _check_args(name, size, batch, dtype, backend, compare, repeat)
    device = _resolve_device(device)
    backend = _resolve_backend("backend", backend, device)
    if compare is not None:
        compare = _resolve_backend("compare", compare, device)
    sweep = sorted(set(sweep or _sweep_sizes(size, min_size)) | {size})
    small = [s for s in sweep if s < min_size]
    if small:
        raise ProfileArgumentError(f"sweep sizes must be at least {name}'s min_input_size {min_size}, "
                                   f"got {small}")
    out_dir = _out_folder(out_dir)
    cuda = device.type == "cuda"
    warmup = 2 if cuda else 0  # on CPU the profiled pass is the warm-up; CUDA must JIT and autotune first
    torch_dtype = DTYPES[dtype]

    backends = [backend] + ([compare] if compare and compare != backend else [])
    labels = {backend: f"pvt_fast ({backend})"}
    labels.update({b: b for b in backends[1:]})
    runs_at = lambda s: repeat or (10 if cuda else 2 if s == size else 1)  # noqa: E731
    # One model per backend with the same weights, built for ``size`` (v1 resizes its position embeddings
    # at the other sweep sizes).
    models = {b: _build(name, b, size, torch_dtype, device) for b in backends}
    main = models[backend]
    for model in models.values():
        model.load_state_dict(main.state_dict())
    traces = {b: out_dir / ("trace.json" if b == backend else f"trace-{b}.json") for b in backends}
    for trace in traces.values():
        trace.unlink(missing_ok=True)
    steps = len(sweep) * (len(backends) + 1)
    step, started = 0, time.perf_counter()
    results = {key: {} for key in backends + ["plain"]}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in sweep:
            x = torch.randn(batch, 3, s, s, device=device, dtype=torch_dtype)
            for b in backends + ["plain"]:
                step += 1
                log(f"[{step}/{steps}] {labels.get(b, 'plain attention (stage 1)')} at {s}x{s} ...")
                if b == "plain":
                    m = measure_plain_attention(main, s, batch, torch_dtype, device, runs_at(s), warmup)
                else:
                    trace = traces[b] if s == size else Path(tmp) / "trace.json"
                    m, out = measure_model(models[b], x, labels[b], runs_at(s), warmup, trace)
                    if s == size and out is not None:
                        outputs[b] = out
                    del out
                results[b][s] = m
                log(f"    {_summary(m)}   ({time.perf_counter() - started:.0f} s elapsed)")

    report = _report(name, size, batch, dtype, device, main, backends, labels, sweep, runs_at(size), results,
                     outputs)
    files = [out_dir / "report.md", out_dir / "report.json", out_dir / "memory_time.png"]
    files += [t for t in traces.values() if t.exists()]
    report["files"] = [str(f) for f in files]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(_markdown(report))
    plot_memory_time(report, out_dir / "memory_time.png")
    return report


def _summary(m):
    if m.skipped:
        return f"skipped: {m.skipped}"
    return f"{m.time_s * 1e3:.1f} ms, peak {m.peak_mem_bytes / 2**20:.1f} MiB"


def _relative_error(a, b):
    num = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
    den = max(float(y.float().abs().max()) for y in b)
    return num / den if den else num


def _report(name, size, batch, dtype, device, main, backends, labels, sweep, repeat, results, outputs):
    first = main.block1[0].attn
    stages = stage_flops(main, size, batch, pyramid=True)
    report = {
        "model": name, "size": size, "batch": batch, "dtype": dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "forward": "forward_pyramid, torch.no_grad", "repeat": repeat,
        "param_bytes": sum(p.numel() * p.element_size() for p in main.parameters()),
        "backends": {b: labels[b] for b in backends},
        "stages": [dict(asdict(s), total=s.total) for s in stages],
        "results": {k: {str(s): asdict(m) for s, m in v.items()} for k, v in results.items()},
        "sweep": sweep,
    }
    if len(outputs) == 2:
        report["max_relative_difference"] = _relative_error(outputs[backends[0]], outputs[backends[1]])
    itemsize = DTYPES[dtype].itemsize
    plain_sizes = sorted(set(sweep) | {s for s in SWEEP_SIZES if size < s <= max(4096, 2 * size)})
    report["plain_analytic_bytes"] = {
        str(s): plain_attention_bytes(stage_flops(main, s, batch, pyramid=True)[0].tokens, main.embed_dims[0],
                                      first.num_heads, batch, itemsize) for s in plain_sizes}
    report["available_bytes"] = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                                 else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return report


def _fmt(v, scale, digits=1):
    return "—" if v is None else f"{v * scale:.{digits}f}"


def _markdown(r):
    backends = list(r["backends"])
    size = str(r["size"])
    res = {b: r["results"][b][size] for b in backends}
    lines = [
        f"# {r['model']} at {r['size']}x{r['size']}, batch {r['batch']}, {r['dtype']} on {r['device_name']}",
        "",
        f"`{r['forward']}`; torch {r['torch']}; time = median of {r['repeat']} runs; peak = most bytes allocated "
        "at once during the stage (or forward) above what was allocated when the forward began (weights: "
        f"{r['param_bytes'] / 2**20:.1f} MiB, not counted); GFLOP = 2 x GMACs, counted analytically.",
        "",
    ]
    for b in backends:
        if res[b]["skipped"]:
            lines.append(f"- {r['backends'][b]} at {size}: skipped, {res[b]['skipped']}")
    if "max_relative_difference" in r:
        lines.append(f"- outputs of {r['backends'][backends[0]]} vs {backends[1]}: max |diff| / max |ref| = "
                     f"{r['max_relative_difference']:.2e}")
    lines += ["", "## Stages", ""]
    head = "| stage | grid | tokens N | keys M | GFLOP |"
    rule = "|---|---|---|---|---|"
    for b in backends:
        head += f" {r['backends'][b]} ms | TFLOP/s | peak MiB |"
        rule += "---|---|---|"
    if len(backends) == 2:
        head += f" {backends[1]} / {backends[0]} time |"
        rule += "---|"
    lines += [head, rule]

    def row(cells, flops, times, peaks):
        line = "| " + " | ".join(cells) + f" | {flops / 1e9:.2f} |"
        for t, p in zip(times, peaks):
            tf = None if t is None else flops / t / 1e12
            line += f" {_fmt(t, 1e3, 2)} | {_fmt(tf, 1, 3)} | {_fmt(p, 2**-20)} |"
        if len(times) == 2:
            line += f" {times[1] / times[0]:.2f}x |" if None not in times else " — |"
        return line

    def pick(b, key, i=None):
        v = res[b][key]
        return v if i is None or v is None or not v else v[i]

    for i, s in enumerate(r["stages"]):
        lines.append(row([str(s["stage"]), f"{s['H']}x{s['W']}", str(s["tokens"]), str(s["keys"])], s["total"],
                         [pick(b, "stage_time_s", i) for b in backends],
                         [pick(b, "stage_peak_mem_bytes", i) for b in backends]))
    total = sum(s["total"] for s in r["stages"])
    lines.append(row(["**forward**", "", "", ""], total, [pick(b, "time_s") for b in backends],
                     [pick(b, "peak_mem_bytes") for b in backends]))
    lines += ["", "The forward's time includes the NCHW copies of the four output maps between stages.", "",
              "## Resolution sweep", "",
              "| resolution | " + " | ".join(f"{r['backends'][b]} ms | {r['backends'][b]} MiB" for b in backends)
              + " | plain attention ms | plain MiB measured | plain MiB analytic |",
              "|---|" + "---|---|" * len(backends) + "---|---|---|"]
    for s in r["sweep"]:
        cells = [str(s)]
        for b in backends + ["plain"]:
            m = r["results"][b][str(s)]
            cells += [_fmt(m["time_s"], 1e3, 2), _fmt(m["peak_mem_bytes"], 2**-20)]
        cells.append(_fmt(r["plain_analytic_bytes"][str(s)], 2**-20))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Plain attention: one stage-1 layer of global attention over all N tokens with the N x N "
              "scores materialized (what a ViT with 4x4 patches costs); skipped where it would not fit.", "",
              "Files: `trace.json` (chrome trace, open in https://ui.perfetto.dev; stages are "
              "`pvt_fast.stage<i>` ranges), `report.json`, `memory_time.png`.", ""]
    return "\n".join(lines)


def plot_memory_time(report, path):
    """Peak memory and time against resolution (log-log) for every backend and plain attention."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    series = [(b, label) for b, label in report["backends"].items()] + [("plain", "plain attention (1 layer)")]
    for (key, label), marker in zip(series, "osx^"):
        points = [(int(s), m) for s, m in report["results"][key].items() if not m["skipped"]]
        if not points:
            continue
        xs = [s for s, _ in points]
        ax_mem.plot(xs, [m["peak_mem_bytes"] / 2**30 for _, m in points], marker=marker, label=label)
        ax_time.plot(xs, [m["time_s"] * 1e3 for _, m in points], marker=marker, label=label)
    analytic = sorted((int(s), b) for s, b in report["plain_analytic_bytes"].items())
    ax_mem.plot([s for s, _ in analytic], [b / 2**30 for _, b in analytic], "k--", lw=1,
                label="plain attention, analytic")
    ax_mem.axhline(report["available_bytes"] / 2**30, color="grey", lw=0.8, ls=":",
                   label="host memory" if report["device"] == "cpu" else f"{report['device_name']} memory")
    ax_mem.set(xscale="log", yscale="log", xlabel="resolution (pixels per side)", ylabel="peak memory (GiB)",
               title="peak memory above weights and input")
    ax_time.set(xscale="log", yscale="log", xlabel="resolution (pixels per side)", ylabel="time (ms)",
                title=f"forward time, batch {report['batch']}, {report['dtype']}")
    ticks = sorted(int(s) for s in report["plain_analytic_bytes"])
    for ax in (ax_mem, ax_time):
        ax.set_xticks(ticks, [str(t) for t in ticks], rotation=45)
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["DTYPES", "Measurement", "ProfileArgumentError", "available_bytes", "forward_bytes_estimate",
           "measure_model", "measure_plain_attention", "peak_memory_bytes", "plain_attention_bytes",
           "plot_memory_time", "profile_model", "stage_hooks", "stage_modules", "synchronize"]
