"""The README's Python blocks run as written, each on its own in a fresh namespace and an empty folder, as a
reader would paste it. A comment right above a block limits where it runs: ``<!-- needs CUDA -->`` only where
CUDA is, ``<!-- CPU-only machine: why -->`` only where it is not."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^(?:<!-- (?P<marker>[^:>]*)[^>]*-->\n)?```python\n(?P<code>.*?)^```$", re.S | re.M)
MARKERS = {"needs CUDA": torch.cuda.is_available, "CPU-only machine": lambda: not torch.cuda.is_available()}


def python_blocks():
    text = README.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        marker = match["marker"] and match["marker"].strip()
        marks = []
        if marker is not None:
            assert marker in MARKERS, f"README.md:{line}: unknown marker {marker!r}, expected one of {list(MARKERS)}"
            if not MARKERS[marker]():
                marks = [pytest.mark.skip(reason=f"README.md:{line} {marker}")]
        blocks.append(pytest.param(line, match["code"], id=f"line{line}", marks=marks))
    return blocks


def test_every_python_block_is_found():
    assert len(python_blocks()) == README.read_text().count("```python") >= 3


@pytest.mark.parametrize("line,code", python_blocks())
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
