"""Which backend ``auto`` picks: ``fused`` only on a CUDA architecture listed in FUSED_VERIFIED (backed by a
recorded GPU run), ``sdpa`` everywhere else; explicit choices and PVT_FAST_BACKEND always win."""
import json
from pathlib import Path

import pytest
import torch

import pvt_fast
from pvt_fast import _backend

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA device whose compute capability the test sets (nothing runs on it)."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    return capability


def test_auto_is_sdpa_on_a_gpu_whose_architecture_is_not_verified(gpu, monkeypatch):
    monkeypatch.setattr(_backend, "FUSED_VERIFIED", {(8, 0): "a100-check.json"})
    assert pvt_fast.resolve_backend("auto") == "sdpa"
    assert pvt_fast.pvt_v2_b0().backend == "sdpa"


def test_auto_is_fused_on_a_verified_architecture(gpu, monkeypatch):
    monkeypatch.setattr(_backend, "FUSED_VERIFIED", {(8, 0): "a100-check.json"})
    gpu["value"] = (8, 0)
    assert pvt_fast.resolve_backend("auto") == "fused"


def test_a_verified_architecture_without_cuda_is_sdpa(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "FUSED_VERIFIED", {(9, 0): "h100-check.json"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pvt_fast.resolve_backend("auto") == "sdpa"


def test_fused_is_opt_in_by_argument_or_environment(gpu, monkeypatch):
    assert pvt_fast.resolve_backend("fused") == "fused"
    monkeypatch.setenv(_backend.ENV_VAR, "fused")
    assert pvt_fast.resolve_backend("auto") == "fused"
    assert pvt_fast.resolve_backend("sdpa") == "sdpa"


def test_every_verified_architecture_has_a_passing_recorded_check():
    """An entry of FUSED_VERIFIED names a full `python -m pvt_fast check --json` record that passed on it."""
    for capability, record in _backend.FUSED_VERIFIED.items():
        path = RESULTS / record
        assert path.is_file(), f"FUSED_VERIFIED[{capability}] names {record}, which is not in {RESULTS}"
        report = json.loads(path.read_text())
        assert report["verdict"] == "pass" and not report["quick"], \
            f"{record}: {report['verdict']}, quick={report['quick']}"
        assert tuple(report["capability"]) == capability, f"{record} ran on sm_{report['capability']}"
