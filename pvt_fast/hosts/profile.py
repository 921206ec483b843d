"""``python -m pvt_fast profile --model timm:pvt_v2_b2 | hf-segformer-b2 | smp-segformer-b2 ...``: a host model
accelerated with :func:`pvt_fast.accelerate` against the same model untouched (same weights).

Both run ``model(x)`` under ``torch.no_grad``, interleaved (plain, accelerated, plain, ...), after one warm-up
call each that also gives the relative error ``||acc - plain|| / ||plain||`` of the output; each run is also
split by the model's top-level submodules (forward hooks; for SegFormer: encoder and decode head). On CPU
the process's CPU time is recorded beside the wall time: on a machine shared with other jobs it is the
steadier figure (with one thread, ``OMP_NUM_THREADS=1``, it is the work itself). Writes ``report.md`` and
``report.json`` to the output folder.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pvt_fast.hosts.zoo import host_pair
from pvt_fast.profile_setup import DTYPES, ProfileArgumentError, concrete_backend, resolve_device
from pvt_fast.profiler import synchronize


def _tensor(out):
    """The output that matters: logits of a Hugging Face output, the tensor itself, or all maps of a list."""
    out = getattr(out, "logits", out)
    if isinstance(out, (list, tuple)):
        return torch.cat([t.flatten() for t in out])
    return out


def _timed(model, x, device):
    """Wall seconds of one ``model(x)``, its process CPU seconds, and the wall seconds of each top-level
    submodule in it."""
    parts, marks, handles = {}, {}, []

    def enter(name):
        marks[name] = time.perf_counter()

    def leave(name):
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - marks[name]

    for name, child in model.named_children():
        handles.append(child.register_forward_pre_hook(lambda m, a, name=name: enter(name)))
        handles.append(child.register_forward_hook(lambda m, a, o, name=name: leave(name)))
    try:
        synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        model(x)
        synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu, parts
    finally:
        for h in handles:
            h.remove()


def profile_host(name, size, out_dir, batch=1, dtype="fp32", backend="auto", compare="plain", device="auto",
                 repeat=None, seed=0, log=None):
    """Time ``name`` (see :mod:`pvt_fast.hosts.zoo`) accelerated for ``backend`` against the untouched model
    (``compare="plain"``; ``None``: the accelerated model alone) at ``size`` x ``size``; ``repeat`` interleaved
    runs (default 5 on CPU, 20 on CUDA). Returns the report as a dict."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if dtype not in DTYPES:
        raise ProfileArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if compare not in ("plain", None):
        raise ProfileArgumentError(f"compare must be 'plain' or 'none' for host model {name!r}, got {compare!r}")
    for arg, value in (("size", size), ("batch", batch), ("repeat", repeat)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ProfileArgumentError(f"{arg} must be a positive integer, got {value!r}")
    device = resolve_device(device)
    backend = concrete_backend("backend", backend, device)
    try:
        accelerated, plain = host_pair(name, backend, seed)
    except ValueError as err:
        raise ProfileArgumentError(str(err)) from err
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {"accelerated": accelerated} | ({"plain": plain} if compare else {})
    for model in models.values():
        model.to(device=device, dtype=DTYPES[dtype])
    repeat = repeat or (20 if device.type == "cuda" else 5)
    x = torch.randn(batch, 3, size, size, device=device, dtype=DTYPES[dtype])
    runs = {label: [] for label in models}
    with torch.no_grad():
        outputs = {label: _tensor(model(x)).float() for label, model in models.items()}
        for r in range(repeat):
            for label, model in models.items():
                runs[label].append(_timed(model, x, device))
                log(f"[{r + 1}/{repeat}] {label}: {runs[label][-1][0]:.3f} s ({runs[label][-1][1]:.3f} s CPU)")
    report = _report(name, size, batch, dtype, device, backend, accelerated, runs, outputs)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(_markdown(report))
    report["files"] = [str(out_dir / "report.md"), str(out_dir / "report.json")]
    return report


def _report(name, size, batch, dtype, device, backend, accelerated, runs, outputs):
    report = {"model": name, "size": size, "batch": batch, "dtype": dtype, "device": str(device),
              "backend": backend, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "repeat": len(runs["accelerated"]), "summary": str(accelerated.pvt_fast_summary), "results": {}}
    for label, timings in runs.items():
        walls, cpus = [t for t, _, _ in timings], [c for _, c, _ in timings]
        parts = {p: statistics.median(d[p] for _, _, d in timings) for p in timings[0][2]}
        report["results"][label] = {"median_s": statistics.median(walls), "best_s": min(walls),
                                    "cpu_median_s": statistics.median(cpus), "parts_median_s": parts}
    if "plain" in runs:
        acc, plain = report["results"]["accelerated"], report["results"]["plain"]
        want = outputs["plain"].double()
        report["relative_error"] = ((outputs["accelerated"].double() - want).norm() / want.norm()).item()
        for key in ("median_s", "best_s", "cpu_median_s"):
            report[f"speedup_{key.removesuffix('_s')}"] = plain[key] / acc[key]
    return report


def _markdown(r):
    lines = [f"# {r['model']} accelerated ({r['backend']}) at {r['size']}x{r['size']}, batch {r['batch']}, "
             f"{r['dtype']} on {r['device']}", "",
             f"`model(x)` under no_grad; torch {r['torch']}, {r['threads']} threads; {r['repeat']} interleaved runs.",
             "", "```", r["summary"], "```", ""]
    if "relative_error" in r:
        lines += [f"- relative error of the output vs the untouched model: {r['relative_error']:.2e}",
                  f"- speed-up: x{r['speedup_median']:.2f} (median), x{r['speedup_best']:.2f} (best), "
                  f"x{r['speedup_cpu_median']:.2f} (median CPU time)", ""]
    labels = list(r["results"])
    parts = list(r["results"]["accelerated"]["parts_median_s"])
    lines += ["| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines.append("| **median s** | " + " | ".join(f"{r['results'][l]['median_s']:.3f}" for l in labels) + " |")
    lines.append("| best s | " + " | ".join(f"{r['results'][l]['best_s']:.3f}" for l in labels) + " |")
    lines.append("| median CPU s | " + " | ".join(f"{r['results'][l]['cpu_median_s']:.3f}" for l in labels) + " |")
    for p in parts:
        lines.append(f"| {p} (median s) | " + " | ".join(f"{r['results'][l]['parts_median_s'][p]:.3f}" for l in labels)
                     + " |")
    return "\n".join(lines) + "\n"


__all__ = ["profile_host"]
