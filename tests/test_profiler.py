"""The profiler (``python -m pvt_fast profile``) and the analytic FLOP counts of :mod:`pvt_fast.flops`."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pvt_fast
from pvt_fast.__main__ import main
from pvt_fast.flops import head_flops, model_flops, stage_flops
from pvt_fast.profile_report import memory_time_figure
from pvt_fast.profile_setup import CPU_CAP_ENV
from pvt_fast.profiler import (over_budget, peak_memory_bytes, plain_attention_bytes, profile_model, stage_hooks,
                               stage_modules)

# The papers' "GFLOPs" at 224x224, which are multiply-adds (PVT v1 Table 1/2, PVT v2 Table 1/2).
PUBLISHED_GMACS = {"pvt_tiny": 1.9, "pvt_small": 3.8, "pvt_medium": 6.7, "pvt_large": 9.8, "pvt_v2_b0": 0.57,
                   "pvt_v2_b1": 2.1, "pvt_v2_b2": 4.0, "pvt_v2_b2_li": 3.9, "pvt_v2_b3": 6.9, "pvt_v2_b4": 10.1,
                   "pvt_v2_b5": 11.7}


# --- FLOPs ----------------------------------------------------------------------------------------------


def test_pvt_v2_b2_at_224_is_the_published_4_gmacs():
    flops = model_flops("pvt_v2_b2", 224)
    assert abs(flops / 8.0e9 - 1) < 0.02, f"pvt_v2_b2 at 224: {flops / 1e9:.3f} GFLOPs, published 8.0"


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_every_variant_matches_its_published_gmacs(name):
    gmacs = model_flops(name, 224) / 2e9
    assert abs(gmacs / PUBLISHED_GMACS[name] - 1) < 0.02, f"{name}: {gmacs:.3f} GMACs vs {PUBLISHED_GMACS[name]}"


@pytest.mark.parametrize("name,size,batch,pyramid", [
    ("pvt_tiny", 96, 2, False),        # v1, cls token in stage 4 and the head
    ("pvt_tiny", (64, 100), 1, True),  # v1 dense features: no cls token, non-square, floor grids
    ("pvt_v2_b0", 67, 2, False),       # v2, odd size: ceil grids
    ("pvt_v2_b0", (64, 96), 1, True),
    ("pvt_v2_b2_li", 75, 1, False),    # linear SRA: 49 keys in every stage
])
def test_analytic_flops_match_flop_counter_on_the_reference_backend(name, size, batch, pyramid):
    torch.manual_seed(0)
    model = pvt_fast.create_model(name, backend="reference").eval()
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, 3, *hw)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_pyramid(x) if pyramid else model(x)
    counted = counter.get_total_flops()
    analytic = model_flops(model, size, batch, pyramid)
    assert analytic == counted, f"{name} at {size}, pyramid={pyramid}: analytic {analytic}, FlopCounterMode {counted}"


def test_stage_geometry_and_parts():
    stages = stage_flops("pvt_v2_b2", 1024)
    assert [(s.H, s.W, s.tokens, s.keys) for s in stages] == [
        (256, 256, 65536, 1024), (128, 128, 16384, 1024), (64, 64, 4096, 1024), (32, 32, 1024, 1024)]
    first = stages[0]
    assert first.flops["attention"] == 3 * 4 * 65536 * 1024 * 64  # 3 blocks, QK^T and PV
    assert first.flops["sr"] == 3 * 2 * 1024 * 64 * 64 * 64  # 8x8 conv, stride 8
    assert stage_flops("pvt_tiny", 224)[3].tokens == 50  # 49 + the cls token
    assert stage_flops("pvt_tiny", 224, pyramid=True)[3].tokens == 49
    assert [s.keys for s in stage_flops("pvt_v2_b2_li", 512)] == [49] * 4
    assert head_flops("pvt_v2_b2", batch=3) == 2 * 3 * 512 * 1000
    assert head_flops("pvt_v2_b2", pyramid=True) == 0


def test_flops_bad_arguments():
    with pytest.raises(ValueError, match="too small"):
        stage_flops("pvt_v2_b2", 16)
    with pytest.raises(TypeError, match="image_size must be"):
        stage_flops("pvt_v2_b2", "224")
    with pytest.raises(TypeError, match="model must be"):
        model_flops(3, 224)
    with pytest.raises(ValueError, match="unknown model"):
        model_flops("pvt_v9", 224)


# --- measurement primitives -------------------------------------------------------------------------------


def test_cpu_peak_memory_counts_the_allocations_of_the_call():
    def work():
        big = torch.ones(1024, 1024)  # 4 MiB, freed before the 1 MiB result is made
        return big[:256].clone()

    _, peak = peak_memory_bytes(work, "cpu")
    assert 5 * 2**20 <= peak < 5 * 2**20 + 2**16, f"peak {peak} bytes, expected 4 MiB + 1 MiB"


def test_plain_attention_analytic_bytes_match_the_measured_peak():
    from pvt_fast.ops import get_backend_ops

    attention = get_backend_ops("reference").attention
    q, kv = torch.randn(2, 500, 32), torch.randn(2, 500, 64)
    _, peak = peak_memory_bytes(lambda: attention(q, kv, 1, 32 ** -0.5), "cpu")
    analytic = plain_attention_bytes(500, 32, 1, 2, 4)
    assert 0.9 < peak / analytic < 1.1, f"measured {peak}, analytic {analytic}"


def test_over_the_cpu_cap_says_what_the_cap_is_and_how_to_raise_it(monkeypatch):
    monkeypatch.delenv(CPU_CAP_ENV, raising=False)
    plain_512 = plain_attention_bytes(128 * 128, 32, 1, 1, 4)  # pvt_v2_b0's stage 1 at 512x512: 2050 MiB
    assert over_budget(plain_512, "cpu", cpu_cap=True) == (
        f"needs 2050 MiB, over the CPU cap of 2048 MiB (set {CPU_CAP_ENV}=<MiB> to raise it)")
    assert over_budget(plain_512, "cpu") is None, "without cpu_cap only the memory available limits"
    monkeypatch.setenv(CPU_CAP_ENV, "1024")
    assert over_budget(2**30, "cpu", cpu_cap=True) is None
    assert over_budget(2**30 + 1, "cpu", cpu_cap=True).startswith("needs 1025 MiB, over the CPU cap of 1024 MiB")
    assert over_budget(2**60, "cpu").startswith("needs 1099511627776 MiB, over 80% of the ")


def test_stage_hooks_bracket_every_stage_in_order():
    model = pvt_fast.create_model("pvt_tiny", backend="sdpa").eval()
    assert len(stage_modules(model)) == 4
    calls = []
    with stage_hooks(model, lambda i: calls.append(("in", i)), lambda i: calls.append(("out", i))), \
            torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == [(kind, i) for i in range(4) for kind in ("in", "out")]
    model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 8, "hooks must be removed on exit"


# --- the profile ----------------------------------------------------------------------------------------


# Outputs of the default backend vs the reference: on CUDA, cuDNN convolutions run in TF32 by default.
OUTPUT_RTOL = {"cpu": 1e-4, "cuda": 5e-3}


def test_profile_writes_its_files_and_consistent_numbers(tmp_path):
    lines = []
    report = profile_model("pvt_v2_b0", 96, tmp_path, sweep=[64], log=lines.append)
    for name in ("report.md", "report.json", "trace.json", "trace-reference.json", "memory_time.png"):
        assert (tmp_path / name).stat().st_size > 0, f"{name} missing or empty"
    assert (tmp_path / "memory_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [line for line in lines if line.startswith("[")]
    assert len(steps) == 2 * 3 and steps[0].startswith("[1/6] pvt_fast (") and "64x64" in steps[0], lines

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["sweep"] == [64, 96]
    assert [(s["tokens"], s["keys"]) for s in saved["stages"]] == [(576, 9), (144, 9), (36, 9), (9, 9)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pvt_fast.create_model("pvt_v2_b0", backend="reference").forward_pyramid(torch.randn(1, 3, 96, 96))
    assert sum(s["total"] for s in saved["stages"]) == counter.get_total_flops()
    backends = list(saved["backends"])
    assert backends == [pvt_fast.resolve_backend("auto"), "reference"]
    for backend in backends:
        for size in ("64", "96"):
            m = saved["results"][backend][size]
            assert m["skipped"] is None
            assert m["time_s"] > 0 and len(m["stage_time_s"]) == 4 and all(t > 0 for t in m["stage_time_s"])
            # Stages lie inside the forward; the times are medians over runs, hence the margin.
            assert sum(m["stage_time_s"]) <= m["time_s"] * 1.2
            assert 0 < max(m["stage_peak_mem_bytes"]) <= m["peak_mem_bytes"]
    if saved["device"] == "cpu":  # the CUDA allocator rounds blocks up, the analytic count does not
        plain = saved["results"]["plain"]["96"]
        assert 0.9 < plain["peak_mem_bytes"] / saved["plain_analytic_bytes"]["96"] < 1.1
    assert saved["max_relative_difference"] < OUTPUT_RTOL[torch.device(saved["device"]).type]

    memory_axis, time_axis = memory_time_figure(saved).axes
    assert memory_axis.get_xlim()[1] >= 4096, "plain attention's analytic bytes run on to 4096"
    assert list(time_axis.get_xticks()) == [64, 96] and time_axis.get_xlim()[1] < 100, "time: measured sizes only"

    trace = json.loads((tmp_path / "trace.json").read_text())
    ranges = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"}
    assert {f"pvt_fast.stage{i}" for i in range(1, 5)} <= ranges
    markdown = (tmp_path / "report.md").read_text()
    assert "| 1 | 24x24 | 576 | 9 |" in markdown and "**forward**" in markdown
    assert report["files"][0] == str(tmp_path / "report.md")


def test_cli_prints_where_the_files_are_and_nothing_else(tmp_path):
    """A fresh process (kineto reads its log level once, at a process's first profile)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-m", "pvt_fast", "profile", "--model", "pvt_v2_b0", "--size", "64",
                          "--compare", "none", "--out", str(out)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert f"wrote 4 files to {out}" in run.stdout and str(out / "report.md") in run.stdout
    backend = pvt_fast.resolve_backend("auto")
    progress = [f"[{i}/4] " for i in range(1, 5)]
    assert run.stderr.startswith(f"[1/4] pvt_fast ({backend}) at 32x32 ..."), run.stderr
    if not torch.cuda.is_available():  # no kineto GPU probe errors or USDT lines: only the progress lines
        others = [line for line in run.stderr.splitlines()
                  if not line.startswith(tuple(progress)) and not line.startswith("    ")]
        assert others == [], run.stderr
    report = json.loads((out / "report.json").read_text())
    assert list(report["backends"]) == [backend] and report["sweep"] == [32, 64]
    assert report["files"] == [str(out / name) for name in ("report.md", "report.json", "memory_time.png",
                                                             "trace.json")]


@pytest.mark.parametrize("argv,message", [
    (["--model", "pvt_v9", "--size", "224"], "model must be one of pvt_tiny"),
    (["--model", "pvt_v2_b2", "--size", "16"], "size must be at least pvt_v2_b2's min_input_size 29, got 16"),
    (["--model", "pvt_v2_b2", "--size", "64", "--dtype", "fp8"], "dtype must be one of fp32, fp16, bf16"),
    (["--model", "pvt_v2_b2", "--size", "64", "--batch", "0"], "batch must be a positive integer, got 0"),
    (["--model", "pvt_v2_b2", "--size", "64", "--backend", "triton"], "backend must be one of auto"),
    (["--model", "pvt_v2_b2", "--size", "64", "--compare", "timm"], "compare must be one of"),
    (["--model", "pvt_v2_b2", "--size", "64", "--sweep", "16,64"], "sweep sizes must be at least"),
    (["--model", "pvt_v2_b2", "--size", "64", "--repeat", "0"], "repeat must be a positive integer, got 0"),
    (["--model", "pvt_v2_b0", "--size", "64", "--device", "foo"], "device must be 'auto', 'cpu', 'cuda'"),
    (["--model", "pvt_v2_b0", "--size", "64", "--device", "meta"], "device must be 'auto', 'cpu', 'cuda'"),
    (["--model", "pvt_v2_b0", "--size", "64", "--device", "cuda:63"], "device 'cuda:63' was asked for but"),
])
def test_bad_arguments_give_clear_errors(tmp_path, capsys, argv, message):
    assert main(["profile", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_an_unwritable_out_folder_is_an_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["profile", "--model", "pvt_v2_b0", "--size", "64", "--compare", "none", "--out", str(blocker / "x")]
    assert main(argv) == 2
    assert f"out must be a folder that can be written, got '{blocker / 'x'}'" in capsys.readouterr().err


@pytest.mark.parametrize("variable,value,message", [
    ("PVT_FAST_BACKEND", "bogus", "PVT_FAST_BACKEND must be one of"),
    (CPU_CAP_ENV, "lots", f"{CPU_CAP_ENV} must be a positive number of MiB, got 'lots'"),
    (CPU_CAP_ENV, "-1", f"{CPU_CAP_ENV} must be a positive number of MiB, got '-1'"),
])
def test_a_bad_environment_variable_is_an_error(tmp_path, capsys, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    assert main(["profile", "--model", "pvt_v2_b0", "--size", "64", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,env,message", [
    (["--backend", "fused"], None, "backend 'fused' resolves to 'fused', which runs on CUDA"),
    ([], "fused", "backend 'auto' resolves to 'fused' (from PVT_FAST_BACKEND=fused)"),
    (["--backend", "sdpa", "--compare", "fused"], None, "compare 'fused' resolves to 'fused'"),
])
def test_fused_backend_on_cpu_without_the_interpreter_is_refused(tmp_path, capsys, monkeypatch, argv, env, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if env is None:
        monkeypatch.delenv("PVT_FAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("PVT_FAST_BACKEND", env)
    argv = ["profile", "--model", "pvt_v2_b0", "--size", "64", "--device", "cpu", *argv, "--out", str(tmp_path)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing may be written (or profiled on another backend)"
