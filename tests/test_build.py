"""setup.py's PVT_FAST_BUILD_CUDA: 0 skips the extension, 1 requires it, unset builds it when it can."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def setup_py(build_cuda, cuda_home):
    env = {k: v for k, v in os.environ.items() if k not in ("PVT_FAST_BUILD_CUDA", "CUDA_HOME", "CUDA_PATH")}
    if build_cuda is not None:
        env["PVT_FAST_BUILD_CUDA"] = build_cuda
    env["CUDA_HOME"] = cuda_home
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True)


def test_required_extension_without_nvcc_fails_loudly(tmp_path):
    proc = setup_py("1", str(tmp_path))
    assert proc.returncode != 0
    assert "PVT_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built" in proc.stderr
    assert "nvcc not found" in proc.stderr


def test_unset_skips_the_extension_without_nvcc(tmp_path):
    proc = setup_py(None, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "skipping the CUDA extension" in proc.stdout and "nvcc not found" in proc.stdout


def test_zero_skips_and_bad_values_are_refused(tmp_path):
    assert setup_py("0", str(tmp_path)).returncode == 0
    proc = setup_py("yes", str(tmp_path))
    assert proc.returncode != 0 and "PVT_FAST_BUILD_CUDA must be 0, 1 or unset, got 'yes'" in proc.stderr


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="no CUDA toolkit here")
def test_unset_plans_the_extension_with_nvcc():
    proc = setup_py(None, "/usr/local/cuda")
    assert proc.returncode == 0, proc.stderr
    assert "skipping" not in proc.stdout
