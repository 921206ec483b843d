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

The arguments are checked, and the model built, in :mod:`pvt_fast.profile_setup`; the files are written by
:mod:`pvt_fast.profile_report`. This module measures.
"""
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, supported_activities

from pvt_fast.flops import stage_flops
from pvt_fast.profile_setup import CPU_CAP_ENV, SWEEP_SIZES, build_model, check_profile_args, cpu_cap_bytes

STAGE_RANGE = "pvt_fast.stage{}"
USABLE_FRACTION = 0.8  # of the memory available, for one measured case
# kineto's log levels run from VERBOSE (0) to ERROR (4) and USDT (5): at 6 it prints nothing.
KINETO_SILENT = "6"


# --- memory and time primitives -----------------------------------------------------------------------


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call, device, repeat):
    """Median wall seconds of ``call()`` over ``repeat`` calls, each between two device synchronizations."""
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def _mib(nbytes, round_up):
    mib = nbytes / 2**20
    return f"{math.ceil(mib) if round_up else math.floor(mib)} MiB"


def over_budget(need, device, cpu_cap=False):
    """Why ``need`` bytes cannot be measured on ``device``, or None when they can: more than 80% of the memory
    available or, with ``cpu_cap`` on the CPU, more than ``PVT_FAST_CPU_CAP_MIB`` (see
    :func:`pvt_fast.profile_setup.cpu_cap_bytes`). The need is rounded up and the limit down, so the reason
    never reads as equal figures."""
    device = torch.device(device)
    have = available_bytes(device)
    limit = USABLE_FRACTION * have
    why = f"{USABLE_FRACTION:.0%} of the {_mib(have, False)} available on {device.type}"
    if cpu_cap and device.type == "cpu" and cpu_cap_bytes() < limit:
        limit = cpu_cap_bytes()
        why = f"the CPU cap of {_mib(limit, False)} (set {CPU_CAP_ENV}=<MiB> to raise it)"
    if need <= limit:
        return None
    return f"needs {_mib(need, True)}, over {why}"


def _torch_profiler(device, **kwargs):
    """``torch.profiler.profile`` over the activities ``device`` has and this torch supports.

    On a machine without CUDA, a CUDA build of torch still has kineto probe for a GPU, which logs
    ``gpuGetDeviceCount failed`` and USDT start/stop lines for every profile: there kineto is silenced
    (``KINETO_LOG_LEVEL``, read once, at the process's first profile), unless the environment sets it."""
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_SILENT)
    wanted = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    return profile(activities=[a for a in wanted if a in supported_activities()], **kwargs)


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
        with _torch_profiler(device, profile_memory=True) as prof:
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
    with _torch_profiler(device, profile_memory=True, record_shapes=True) as prof:
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


def attention_matrix_bytes(batch, heads, tokens, keys, itemsize):
    """Bytes of the attention matrices an eager attention (the reference backend's, or plain global attention)
    keeps alive at once: scores and probabilities, ``tokens`` x ``keys`` per head."""
    return 2 * batch * heads * tokens * keys * itemsize


def forward_bytes_estimate(model, size, batch, itemsize):
    """A rough upper estimate of the activation bytes of ``forward_pyramid``: the widest MLP activations of a
    stage plus, for the reference backend, its two materialized N x M attention matrices."""
    worst = 0
    for s, blk in zip(stage_flops(model, size, batch, pyramid=True),
                      (getattr(model, f"block{i + 1}")[0] for i in range(model.num_stages))):
        mlp = 3 * batch * s.tokens * blk.mlp.fc1.out_features * itemsize
        scores = (attention_matrix_bytes(batch, blk.attn.num_heads, s.tokens, s.keys, itemsize)
                  if model.backend == "reference" else 0)
        worst = max(worst, mlp + scores)
    return worst


def measure_model(model, x, label, repeat, warmup, trace_path):
    """Warm up, profile one pass (trace + memory), then time ``repeat`` passes of ``model.forward_pyramid``."""
    size = x.shape[-1]
    too_big = over_budget(forward_bytes_estimate(model, size, x.shape[0], x.element_size()), x.device)
    if too_big:
        return Measurement(label, size, skipped=too_big), None
    with torch.no_grad():
        for _ in range(warmup):
            model.forward_pyramid(x)
        out, peak, stage_peaks = _profiled_run(model, x, trace_path)
        total, stage_times = _timed_runs(model, x, repeat)
    return Measurement(label, size, total, peak, stage_times, stage_peaks), out


def plain_attention_bytes(tokens, dim, heads, batch, itemsize):
    """Peak bytes of plain global attention softmax(Q K^T * scale) V over ``tokens`` tokens, beyond its
    inputs: two N x N matrices per head live at once (scores and probabilities) plus the output."""
    return attention_matrix_bytes(batch, heads, tokens, tokens, itemsize) + batch * tokens * dim * itemsize


def measure_plain_attention(model, size, batch, dtype, device, repeat, warmup):
    """Plain global attention over all of stage 1's tokens (one layer, N x N scores materialized), as a
    ViT with 4x4 patches would run it; skipped when its score matrices would not fit."""
    from pvt_fast.ops import get_backend_ops

    first = stage_flops(model, size, batch, pyramid=True)[0]
    dim, heads = model.embed_dims[0], model.block1[0].attn.num_heads
    itemsize = dtype.itemsize
    label = "plain attention"
    too_big = over_budget(plain_attention_bytes(first.tokens, dim, heads, batch, itemsize), device, cpu_cap=True)
    if too_big:
        return Measurement(label, size, skipped=too_big)
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
        seconds = median_seconds(run, device, repeat)
    return Measurement(label, size, seconds, peak - base)


# --- the whole profile ----------------------------------------------------------------------------------


def profile_model(name, size, out_dir, batch=1, dtype="fp32", backend="auto", compare="reference",
                  device="auto", sweep=None, repeat=None, log=None):
    """Profile ``name`` at ``size`` x ``size`` (see the module docstring); returns the report as a dict.

    ``sweep``: the resolutions of the memory/time plot (default: 224, 512, 1024, ... below ``size``, and
    ``size``). ``repeat``: timed runs per point (default 10 on CUDA; on CPU 2 at ``size`` and 1 at the other
    sweep points, so that the README's CPU demo stays short). ``log``: a callable taking a progress line
    (default: print to stderr).

    Every argument is checked before anything runs (:func:`pvt_fast.profile_setup.check_profile_args`): a bad
    one (an unknown device, a backend that cannot run on the device, such as ``fused`` on the CPU without
    ``TRITON_INTERPRET=1``, an ``out_dir`` that cannot be written) raises
    :class:`~pvt_fast.profile_setup.ProfileArgumentError`; nothing falls back to another backend.
    """
    from pvt_fast.profile_report import progress_line, relative_error, write_report

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    setup = check_profile_args(name, size, out_dir, batch, dtype, backend, compare, device, sweep, repeat)
    backends = [setup.backend] + ([setup.compare] if setup.compare not in (None, setup.backend) else [])
    labels = {b: f"pvt_fast ({b})" if b == setup.backend else b for b in backends}
    # One model per backend with the same weights, built for ``size`` (v1 resizes its position embeddings
    # at the other sweep sizes).
    models = {b: build_model(name, b, size, setup.torch_dtype, setup.device) for b in backends}
    main = models[setup.backend]
    for model in models.values():
        model.load_state_dict(main.state_dict())
    traces = {b: setup.out_dir / ("trace.json" if b == setup.backend else f"trace-{b}.json") for b in backends}
    for trace in traces.values():
        trace.unlink(missing_ok=True)
    steps = len(setup.sweep) * (len(backends) + 1)
    step, started = 0, time.perf_counter()
    results = {key: {} for key in backends + ["plain"]}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in setup.sweep:
            x = torch.randn(batch, 3, s, s, device=setup.device, dtype=setup.torch_dtype)
            for b in backends + ["plain"]:
                step += 1
                log(f"[{step}/{steps}] {labels.get(b, 'plain attention (stage 1)')} at {s}x{s} ...")
                if b == "plain":
                    m = measure_plain_attention(main, s, batch, setup.torch_dtype, setup.device, setup.runs_at(s),
                                                setup.warmup)
                else:
                    trace = traces[b] if s == size else Path(tmp) / "trace.json"
                    m, out = measure_model(models[b], x, labels[b], setup.runs_at(s), setup.warmup, trace)
                    if s == size and out is not None:
                        outputs[b] = out
                    del out
                results[b][s] = m
                log(f"    {progress_line(m)}   ({time.perf_counter() - started:.0f} s elapsed)")

    report = _report(setup, main, labels, results)
    if len(outputs) == 2:
        report["max_relative_difference"] = relative_error(outputs[backends[0]], outputs[backends[1]])
    write_report(report, setup.out_dir, [t for t in traces.values() if t.exists()])
    return report


def _report(setup, main, labels, results):
    """The profile's settings, per-stage geometry and FLOPs, every measurement, and plain attention's analytic
    bytes from the sweep up to 4096 (or twice the size) for the memory plot, as a JSON-able dict."""
    size, batch, device = setup.size, setup.batch, setup.device
    itemsize = setup.torch_dtype.itemsize
    plain_sizes = sorted(set(setup.sweep) | {s for s in SWEEP_SIZES if size < s <= max(4096, 2 * size)})
    return {
        "model": setup.name, "size": size, "batch": batch, "dtype": setup.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "forward": "forward_pyramid, torch.no_grad", "repeat": setup.runs_at(size),
        "param_bytes": sum(p.numel() * p.element_size() for p in main.parameters()),
        "backends": labels,
        "stages": [dict(asdict(s), total=s.total) for s in stage_flops(main, size, batch, pyramid=True)],
        "results": {k: {str(s): asdict(m) for s, m in v.items()} for k, v in results.items()},
        "sweep": setup.sweep,
        "plain_analytic_bytes": {
            str(s): plain_attention_bytes(stage_flops(main, s, batch, pyramid=True)[0].tokens, main.embed_dims[0],
                                          main.block1[0].attn.num_heads, batch, itemsize) for s in plain_sizes},
        "available_bytes": (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")),
    }


__all__ = ["Measurement", "attention_matrix_bytes", "available_bytes", "forward_bytes_estimate", "measure_model",
           "measure_plain_attention", "over_budget", "peak_memory_bytes", "plain_attention_bytes", "profile_model",
           "stage_hooks", "stage_modules", "synchronize"]
