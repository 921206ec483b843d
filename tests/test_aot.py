"""Ahead-of-time compile of every Triton kernel configuration for sm_80 and sm_90 (no GPU needed).

Run in its own process without TRITON_INTERPRET: ``python -m pytest -m aot tests/test_aot.py``.
Every spec of every ``pvt_fast.kernels`` module is compiled once (in parallel, Triton's cache makes
reruns fast); the tests then read the shared results: no compile errors, no register spills, tensor-core
instructions for every fp16/bf16/tf32 tl.dot, shared memory within the target's limit.
"""
import os
import time

import pytest

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="AOT compiles need a process without TRITON_INTERPRET=1"),
]


@pytest.fixture(scope="module")
def results():
    from pvt_fast.kernels import report

    start = time.perf_counter()
    results = report.compile_all()
    seconds = time.perf_counter() - start
    print(f"\nAOT: {len(results)} compiles in {seconds:.0f} s on {os.cpu_count()} processes")
    return results


def offenders(results, problem):
    bad = [f"{r.module}: {r.name} sm_{r.capability}: {'; '.join(r.problems)}" for r in results
           if any(p.startswith(problem) for p in r.problems)]
    return "\n".join(bad)


def test_every_kernel_module_is_compiled(results):
    modules = {r.module for r in results}
    assert "sra_attention" in modules, f"compiled modules: {sorted(modules)}"
    for module in modules:
        assert {r.capability for r in results if r.module == module} == {80, 90}


def test_no_compile_errors(results):
    bad = offenders(results, "compile failed")
    assert not bad, bad


def test_no_register_spills(results):
    bad = offenders(results, "spills")
    assert not bad, bad


def test_dots_use_tensor_cores(results):
    assert any(r.tensor_core_dots for r in results), "no spec has a tensor-core tl.dot: the IR parse is broken"
    bad = offenders(results, "no tensor cores")
    assert not bad, bad


def test_shared_memory_fits(results):
    bad = offenders(results, "shared memory over")
    assert not bad, bad
