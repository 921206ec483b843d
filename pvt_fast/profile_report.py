"""The files of ``python -m pvt_fast profile``, written from the report that :func:`pvt_fast.profiler.profile_model`
measured: ``report.json`` (the report as is), ``report.md`` (per-stage table and resolution sweep) and
``memory_time.png`` (peak memory and time against resolution)."""
import json
from pathlib import Path


def relative_error(outputs, reference):
    """``max |output - reference| / max |reference|`` over lists of tensors (the stage maps of two backends)."""
    num = max(float((x.float() - y.float()).abs().max()) for x, y in zip(outputs, reference))
    den = max(float(y.float().abs().max()) for y in reference)
    return num / den if den else num


def progress_line(m):
    """One measurement as the profile's progress log shows it."""
    if m.skipped:
        return f"skipped: {m.skipped}"
    return f"{m.time_s * 1e3:.1f} ms, peak {m.peak_mem_bytes / 2**20:.1f} MiB"


def write_report(report, out_dir, traces):
    """Write report.md, report.json and memory_time.png to ``out_dir``; the written paths (``traces``, already
    written, last) are also stored in ``report["files"]``."""
    out_dir = Path(out_dir)
    files = [out_dir / "report.md", out_dir / "report.json", out_dir / "memory_time.png", *traces]
    report["files"] = [str(f) for f in files]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(markdown(report))
    plot_memory_time(report, out_dir / "memory_time.png")
    return report["files"]


def _fmt(v, scale, digits=1):
    return "—" if v is None else f"{v * scale:.{digits}f}"


def markdown(r):
    """report.md: the setting, the per-stage table of every backend at the profile's size, the sweep."""
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


def memory_time_figure(report):
    """Peak memory and time against resolution (log-log) for every backend and plain attention. The memory panel
    carries plain attention's analytic bytes past the sweep; the time panel spans the measured sizes only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
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
    for ax, ticks in ((ax_mem, [s for s, _ in analytic]), (ax_time, report["sweep"])):
        ax.set_xticks(ticks, [str(t) for t in ticks], rotation=45)
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['device_name']}")
    fig.tight_layout()
    return fig


def plot_memory_time(report, path):
    """Save :func:`memory_time_figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = memory_time_figure(report)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["markdown", "memory_time_figure", "plot_memory_time", "progress_line", "relative_error",
           "write_report"]
