"""Packaging: the kernels ship as pvt_fast.kernels, old torch is refused at import, factories stay out of
timm's registry."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import timm

import pvt_fast


def test_wheel_ships_kernels_as_a_subpackage(tmp_path):
    """The top-level kernels/ folder installs as pvt_fast.kernels, never as a top-level ``kernels``."""
    env = dict(os.environ, PVT_FAST_BUILD_CUDA="0")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path), str(repo)], check=True, env=env, capture_output=True)
    (wheel,) = tmp_path.glob("pvt_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("sra_attention", "reduce_kv", "mlp_dwconv", "report", "_aot"):
        assert f"pvt_fast/kernels/{module}.py" in names
    assert not [n for n in names if n.startswith("kernels/")]


def test_old_torch_is_refused_at_import():
    code = "import torch; torch.__version__ = '2.10.0+cpu'; import pvt_fast"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pvt_fast needs torch >= 2.11, found 2.10.0+cpu" in proc.stderr


def test_factories_not_registered_with_timm():
    assert timm.create_model("pvt_v2_b0").__class__.__module__.startswith("timm.")
    assert set(pvt_fast.models.CONFIGS) == {
        "pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "pvt_huge_v2", "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2",
        "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"}
    assert all(callable(getattr(pvt_fast, name)) for name in pvt_fast.models.CONFIGS)
