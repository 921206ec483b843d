"""``python -m pvt_fast check``: on the CPU only ``--quick`` under TRITON_INTERPRET=1 (how CI runs it), and it
must fail when a kernel computes a wrong or a non-reproducible result."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pvt_fast import check
from pvt_fast.__main__ import main

TRITON_OPS = {"reduce_kv", "reduce_kv_linear", "attention", "dwconv_gelu"}


def run(tmp_path, *argv):
    path = tmp_path / "check.json"
    status = main(["check", *argv, "--json", str(path)])
    return status, json.loads(path.read_text())


def test_quick_check_passes(kernel_device, tmp_path, capsys):
    status, report = run(tmp_path, "--quick")
    printed = capsys.readouterr().out
    bad = [r for r in report["rows"] if not r["ok"]]
    assert status == 0 and report["verdict"] == "pass" and not bad, printed
    assert "verdict: PASS" in printed
    expected_ops = TRITON_OPS | set(check.QUICK_MODELS) | ({"patch_embed"} if kernel_device == "cuda" else set())
    assert {r["op"] for r in report["rows"]} == expected_ops
    for op in expected_ops:
        rows = [r for r in report["rows"] if r["op"] == op]
        assert {r["direction"] for r in rows} == {"forward", "backward"}, op
        assert all(r["same_twice"] and r["rel_err"] <= r["tolerance"] for r in rows), rows


def signature(op, args):
    return op, tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)


def test_stage_cases_are_the_op_calls_of_pvt_v2_b2_and_its_li_variant(monkeypatch):
    """Every op call (shapes and non-tensor arguments) of pvt_v2_b2 and pvt_v2_b2_li at 224x224, batch 8, is a
    stage case and nothing else is (models run on the meta device, calls recorded from the sdpa table)."""
    import pvt_fast
    from pvt_fast.ops import eager

    calls = set()
    for op in ("patch_embed", "reduce_kv", "reduce_kv_linear", "attention", "dwconv_gelu"):
        def record(*args, _op=op, _fn=getattr(eager, f"{op}_sdpa")):
            calls.add(signature(_op, args))
            return _fn(*args)
        monkeypatch.setattr(eager, f"{op}_sdpa", record)
    with torch.device("meta"):
        for name in ("pvt_v2_b2", "pvt_v2_b2_li"):
            pvt_fast.create_model(name, backend="sdpa")(torch.empty(8, 3, 224, 224))
    cases = {signature(c.op, c.args.values()) for c in check.stage_cases(shapes=((224, 8),))}
    assert cases == calls, f"only in the model: {calls - cases}; only in the cases: {cases - calls}"


def only_dwconv(monkeypatch):
    """The quick check reduced to its dwconv_gelu cases (the faults below are injected there)."""
    cases = [c for c in check.tiny_cases() if c.op == "dwconv_gelu"]
    monkeypatch.setattr(check, "tiny_cases", lambda: cases)
    monkeypatch.setattr(check, "QUICK_MODELS", {})


def failed(report):
    return {(r["shape"], r["dtype"], r["direction"]) for r in report["rows"] if not r["ok"]}


def test_a_wrong_kernel_result_fails_the_check(kernel_device, tmp_path, monkeypatch, capsys):
    from pvt_fast.kernels import mlp_dwconv

    correct = mlp_dwconv.dwconv_gelu_fwd

    def off_by_one_percent_at_one_element(x, *args):
        out = correct(x, *args)
        out[0, -1, 0] += 0.01 * out.abs().max()
        return out

    only_dwconv(monkeypatch)
    monkeypatch.setattr(mlp_dwconv, "dwconv_gelu_fwd", off_by_one_percent_at_one_element)
    status, report = run(tmp_path, "--quick")
    forward = {(r["shape"], r["dtype"], r["direction"]) for r in report["rows"] if r["direction"] == "forward"}
    assert status == 1 and report["verdict"] == "fail"
    assert failed(report) == forward, "exactly the forward rows (the backward kernel is not touched) must fail"
    assert "verdict: FAIL" in capsys.readouterr().out


def test_a_result_that_differs_between_runs_fails_the_check(kernel_device, tmp_path, monkeypatch):
    from pvt_fast.kernels import mlp_dwconv

    correct = mlp_dwconv.dwconv_gelu_fwd
    calls = []

    def one_ulp_off_every_other_call(x, *args):
        out = correct(x, *args)
        calls.append(None)
        if len(calls) % 2:
            out[0, 0, 0] = torch.nextafter(out[0, 0, 0], torch.tensor(float("inf"), dtype=out.dtype))
        return out

    only_dwconv(monkeypatch)
    monkeypatch.setattr(mlp_dwconv, "dwconv_gelu_fwd", one_ulp_off_every_other_call)
    status, report = run(tmp_path, "--quick")
    assert status == 1
    bad = [r for r in report["rows"] if not r["ok"]]
    assert bad and all(not r["same_twice"] and r["rel_err"] <= r["tolerance"] for r in bad), bad


def test_without_cuda_the_check_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["check", "--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_the_full_check_does_not_run_under_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["check"]) == 2
    assert "only --quick runs there" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pvt-fast", "python -m pvt_fast"])
def test_help_names_the_command_as_typed(command):
    if command == "pvt-fast":
        script = shutil.which("pvt-fast", path=os.path.dirname(sys.executable))
        if script is None:
            pytest.skip("the pvt-fast console script is not installed in this environment")
        argv = [script, "--help"]
    else:
        argv = [sys.executable, "-m", "pvt_fast", "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"usage: {command} "), out


@pytest.mark.parametrize("sub", [[], ["check"], ["profile"]], ids=["main", "check", "profile"])
def test_help_texts_are_plain_text(sub, capsys):
    with pytest.raises(SystemExit):
        main([*sub, "--help"])
    out = capsys.readouterr().out
    assert "usage:" in out and "``" not in out, out


def test_perturbed_moves_about_one_value_in_twelve_by_one_ulp():
    """The model rows' extra floors: inputs and parameters moved as much as one rounding of each would."""
    t = torch.randn(120_000)
    p = check._perturbed(t, 0)
    moved = p != t
    up, down = torch.nextafter(t, torch.tensor(float("inf"))), torch.nextafter(t, torch.tensor(-float("inf")))
    assert torch.all((p == t) | (p == up) | (p == down))
    assert abs(moved.float().mean().item() - 1 / 12) < 0.005
    assert abs((p > t).float().mean().item() - 1 / 24) < 0.004
    assert torch.equal(check._perturbed(t, 0), p) and not torch.equal(check._perturbed(t, 1), p)
    assert torch.equal(check._perturbed(torch.zeros(1000), 0), torch.zeros(1000))  # rounding never moves a 0
    layer = torch.nn.Linear(300, 200)
    weight = layer.weight.detach().clone()
    assert check._perturbed(layer, 0) is layer and 0 < (layer.weight != weight).sum() < weight.numel() // 6


def test_a_small_gradient_error_fails_the_model_check(kernel_device, tmp_path, monkeypatch):
    """The model rows' floor (five composite errors) still catches a 1e-4 relative error in one gradient:
    every depthwise conv weight gradient of the fused model scaled by 1 + 1e-4."""
    from pvt_fast.kernels import mlp_dwconv

    correct = mlp_dwconv.dwconv_gelu_bwd

    def weight_grad_off_by_1e_4(*args, **kwargs):
        grad_x, grad_weight, grad_bias = correct(*args, **kwargs)
        return grad_x, grad_weight * (1 + 1e-4), grad_bias

    monkeypatch.setattr(check, "tiny_cases", lambda: [])  # the model rows only
    monkeypatch.setattr(mlp_dwconv, "dwconv_gelu_bwd", weight_grad_off_by_1e_4)
    status, report = run(tmp_path, "--quick")
    rows = {r["direction"]: r for r in report["rows"]}
    assert status == 1 and rows["forward"]["ok"] and not rows["backward"]["ok"], report["rows"]
    assert "dwconv.weight" in rows["backward"]["worst"]
