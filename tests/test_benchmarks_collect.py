"""The benchmark suite's contract with the tools that read its records: group names, impl names, extra_info
keys, machine_info, and out-of-memory cases skipped (with the MiB and the cap) before they run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_IMPLS = {"official-eager", "timm", "timm-compiled", "pvt_fast", "pvt_fast-compiled"}
GROUPS = {  # group -> (its test function, its impls)
    "sra-attention": ("test_sra_attention", {"plain", "sdpa-global", "reference", "sdpa", "fused"}),
    "patch-embed": ("test_patch_embed", {"torch", "fused"}),
    "mlp-dwconv": ("test_mlp_dwconv", {"torch", "fused"}),
    "model-forward": ("test_model_forward", MODEL_IMPLS),
    "model-train-step": ("test_model_train_step", MODEL_IMPLS),
    "accelerate": ("test_accelerate", {"timm", "timm-accelerated", "hf-segformer", "hf-segformer-accelerated"}),
    "onnxruntime": ("test_onnxruntime", {"pytorch", "onnxruntime"}),
}


def _pytest(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PVT_FAST_CPU_CAP_MIB": "2048"}  # the default cap
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_every_group_has_its_impls():
    run = _pytest("--collect-only", "-q")
    assert run.returncode == 0, run.stdout + run.stderr
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    for group, (test, impls) in GROUPS.items():
        found = {i for i in impls if any(f"::{test}[{i}-" in line for line in ids)}
        assert found == impls, f"{group}: collected {sorted(found)}, expected {sorted(impls)}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU sizes")
def test_records_carry_what_the_tooling_reads(tmp_path):
    record = tmp_path / "bench.json"
    run = _pytest("-m", "not compiled", "-rs", "--benchmark-max-time=0.01", "--benchmark-min-rounds=1",
                  f"--benchmark-json={record}",
                  "-k", "sra_attention and (sdpa-224 or plain-512) or patch_embed and torch-1-224 "
                        "or mlp_dwconv and torch-224 or model_forward and pvt_fast-224")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ("plain at 512x512, batch 1 needs 2084 MiB, over the CPU cap of 2048 MiB (set PVT_FAST_CPU_CAP_MIB=<MiB> "
            "to raise it)") in run.stdout, run.stdout[-2000:]
    data = json.loads(record.read_text())
    assert data["machine_info"]["gpu"] is None and data["machine_info"]["torch"] == torch.__version__
    assert {"cuda", "triton"} <= set(data["machine_info"])
    seen = set()
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        seen.add((bench["group"], info["impl"]))
        assert {"impl", "resolution", "batch", "dtype", "peak_mem_bytes"} <= set(info), info
        assert info["resolution"] == 224 and info["dtype"] == "float32" and info["peak_mem_bytes"] > 0
        assert info.get("tflops", 0) > 0 or info.get("gbps", 0) > 0, info
    assert seen == {("sra-attention", "sdpa"), ("patch-embed", "torch"), ("mlp-dwconv", "torch"),
                    ("model-forward", "pvt_fast")}, seen
