"""pvt_fast.accelerate on the real host libraries (timm, transformers, segmentation_models_pytorch; tiny random
models): the same numbers as the untouched model (a deep copy made before the call), in eval and train mode,
with the same parameter gradients; what is recognized; what stays untouched; bad arguments."""
import copy
import dataclasses
import logging

import pytest
import torch
import torch.nn as nn

import pvt_fast
from helpers import assert_close_rel, assert_tensors_close, rel_err
from hosts import HOSTS, build, hf_pvt_v2, output

FORWARD_TOL, GRAD_TOL = 1e-5, 1e-4
# One model per structure for the costlier checks (the others hold the same blocks in other wrappers).
DISTINCT = ["timm", "timm-li", "hf-pvt-v2", "hf-pvt-v2-li", "hf-pvt-v1", "hf-segformer", "smp-segformer",
            "smp-mit-encoder"]
# Every size in eval mode, the last (odd where the host allows) in train mode too.
CASES = [(name, size, False) for name, (_, sizes) in HOSTS.items() for size in sizes]
CASES += [(name, sizes[-1], True) for name, (_, sizes) in HOSTS.items()]


def accelerated_pair(name, backend="sdpa"):
    """(accelerated model, untouched deep copy made before the call)."""
    model = build(name)
    plain = copy.deepcopy(model)
    assert pvt_fast.accelerate(model, backend=backend) is model
    return model, plain


@pytest.mark.parametrize("name,size,train", CASES,
                         ids=[f"{n}-{h}x{w}-{'train' if t else 'eval'}" for n, (h, w), t in CASES])
def test_forward_matches_untouched(name, size, train):
    model, plain = accelerated_pair(name)
    model.train(train)
    plain.train(train)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_close_rel(output(model(x)), output(plain(x)), FORWARD_TOL)


@pytest.mark.parametrize("name", DISTINCT)
def test_forward_runs_through_the_op_table(name):
    """Every accelerated module computes through its op table (no silent fall back to the host's forward)."""
    model = pvt_fast.accelerate(build(name).eval(), backend="sdpa")
    bound = {n: m for n, m in model.named_modules() if hasattr(m, "_pvt_fast")}
    called = set()
    for module_name, module in bound.items():
        ops = module._pvt_fast.ops

        def record(fn, module_name=module_name):
            def wrapped(*args, **kwargs):
                called.add(module_name)
                return fn(*args, **kwargs)
            return wrapped

        table = {f: record(getattr(ops, f)) for f in ("patch_embed", "reduce_kv", "reduce_kv_linear", "attention",
                                                      "dwconv_gelu")}
        module._pvt_fast = dataclasses.replace(module._pvt_fast, ops=dataclasses.replace(ops, **table))
    heads = {n for n, m in bound.items() if m._pvt_fast.kind == "decode head (folded)"}  # plain torch, no table
    with torch.no_grad():
        model(torch.randn(1, 3, *HOSTS[name][1][0]))
    assert bound and called == set(bound) - heads


@pytest.mark.parametrize("name", ["timm", "hf-segformer", "smp-mit-encoder"])
def test_cpu_inference_mlp_on_batch_slices(name, monkeypatch):
    """In CPU inference the accelerated MLPs run on batch slices (pvt_fast.models.layers.cpu_inference_slice):
    the untouched model's outputs at a non-square size, every slice taken; an MLP whose fc1, fc2 or dropout
    has a hook runs the batch whole (the hook sees it once), as does one whose dropout is training, and
    training mode never slices."""
    from pvt_fast.hosts import blocks
    from pvt_fast.models import layers

    model, plain = accelerated_pair(name)
    model.eval()
    plain.eval()
    seen = []
    mlp = blocks._mlp
    monkeypatch.setattr(blocks, "_mlp", lambda self, binding, drop, x, H, W: (seen.append(x.shape[0]),
                                                                             mlp(self, binding, drop, x, H, W))[1])
    monkeypatch.setattr(layers, "CPU_SLICE_BYTES", 1)  # one sample per slice
    size = next(hw for hw in HOSTS[name][1] if hw[0] != hw[1])
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        want = output(plain(x))
        got = output(model(x))
    assert seen and set(seen) == {1}
    assert_close_rel(got, want, FORWARD_TOL)

    mlps = [m for m in model.modules() if getattr(m, "_pvt_fast", None) and m._pvt_fast.kind == blocks.MLP]
    for part, hooked in zip(("fc1", "fc2", "drop"), mlps):
        batches = []
        blocks.get(hooked, getattr(hooked._pvt_fast.parts, part)).register_forward_hook(
            lambda module, args, out: batches.append(args[0].shape[0]))
        seen.clear()
        with torch.no_grad():
            assert_close_rel(output(model(x)), want, FORWARD_TOL)
        assert set(batches) == {3}, f"a hook on {part} saw batches {batches}"
    blocks.get(mlps[3], mlps[3]._pvt_fast.parts.drop).train()  # a dropout put back in training: its masks
    seen.clear()
    with torch.no_grad():
        model(x)
    assert seen.count(3) == 4  # the three hooked MLPs and this one ran whole

    model.train()
    seen.clear()
    with torch.no_grad():
        model(x)
    assert set(seen) == {3}


@pytest.mark.parametrize("name", DISTINCT)
def test_gradients_match_untouched(name):
    model, plain = accelerated_pair(name)
    size = HOSTS[name][1][-1]
    x = torch.randn(2, 3, *size)
    weight = None
    for m in (model.train(), plain.train()):
        out = output(m(x))
        weight = torch.randn_like(out) if weight is None else weight
        (out * weight).sum().backward()
    assert_tensors_close({n: p.grad for n, p in model.named_parameters()},
                         {n: p.grad for n, p in plain.named_parameters()}, GRAD_TOL, "gradient of")


# What each tiny model holds, counted from its config (depths, sr ratios, linear attention).
EXPECTED = {
    "timm": dict(pe=4, sr=4, sr1=1, mlp=5),
    "timm-li": dict(pe=4, pool=4, mlp=4),
    "hf-pvt-v2": dict(pe=4, sr=3, sr1=1, mlp=4),
    "hf-pvt-v2-li": dict(pe=4, pool=4, mlp=4),
    "hf-pvt-v1": dict(pe=4, sr=3, sr1=1),
    "hf-segformer": dict(pe=4, sr=3, sr1=1, mlp=4, head=1),
    "smp-segformer": dict(pe=4, sr=6, sr1=2, mlp=8, head=1),
    "smp-unet": dict(pe=4, sr=6, sr1=2, mlp=8),
}
KINDS = dict(pe="patch embed", sr="attention (sr conv)", sr1="attention (sr 1)", pool="attention (linear, pool 7)",
             mlp="mlp (dwconv)", head="decode head (folded)")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_summary_counts_every_block(name, caplog, capsys):
    model = build(name)
    with caplog.at_level(logging.INFO, logger="pvt_fast"):
        pvt_fast.accelerate(model, backend="sdpa", verbose=True)
    summary = model.pvt_fast_summary
    assert dict(summary.counts) == {KINDS[k]: n for k, n in EXPECTED[name].items()}
    assert summary.backend == "sdpa" and not summary.skipped
    assert str(summary) in capsys.readouterr().out
    assert str(summary) in caplog.text


def test_untouched_parameters_names_state_and_buffers():
    model = build("hf-segformer")
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {n: b for n, b in model.named_buffers()}
    modules = {n: m for n, m in model.named_modules()}
    pvt_fast.accelerate(model, backend="sdpa")
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert {n: b for n, b in model.named_buffers()} == buffers
    assert {n: m for n, m in model.named_modules()} == modules
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_training_with_an_optimizer_built_before():
    """Two SGD steps in train mode (BatchNorm batch statistics in the decode head) track the untouched model:
    the folded decode head and the blocks read the live parameters."""
    model = build("hf-segformer")
    plain = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, plain)]
    pvt_fast.accelerate(model, backend="sdpa")
    x = torch.randn(2, 3, 64, 96)
    for _ in range(2):
        for m, opt in zip((model, plain), optimizers):
            opt.zero_grad()
            output(m.train()(x)).square().mean().backward()
            opt.step()
    updates = [{n: p.detach() - before[n] for n, p in m.named_parameters()} for m in (model, plain)]
    assert_tensors_close(*updates, GRAD_TOL, "update of")
    assert rel_err(model.decode_head.batch_norm.running_var, plain.decode_head.batch_norm.running_var) < 1e-5
    with torch.no_grad():
        assert_close_rel(output(model.eval()(x)), output(plain.eval()(x)), FORWARD_TOL)


def test_non_gelu_mlp_is_left_to_the_host():
    torch.manual_seed(0)
    model = hf_pvt_v2(hidden_act="relu").eval()
    plain = copy.deepcopy(model)
    pvt_fast.accelerate(model, backend="sdpa")
    summary = model.pvt_fast_summary
    assert "mlp (dwconv)" not in summary.counts and summary.counts["attention (sr conv)"] == 3
    assert len(summary.skipped) == 4 and all("GELU" in reason for _, reason in summary.skipped)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close_rel(output(model(x)), output(plain(x)), FORWARD_TOL)


def test_activation_given_as_a_function():
    """Hugging Face keeps a callable ``config.hidden_act`` as is (transformers 4.x): a plain GELU function."""
    model = build("hf-pvt-v2").eval()
    for m in model.modules():
        if hasattr(m, "intermediate_act_fn"):
            del m.intermediate_act_fn  # a module until now; a plain attribute from here on
            m.intermediate_act_fn = torch.nn.functional.gelu
    plain = copy.deepcopy(model)
    pvt_fast.accelerate(model, backend="sdpa")
    assert model.pvt_fast_summary.counts["mlp (dwconv)"] == 4
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert_close_rel(output(model(x)), output(plain(x)), FORWARD_TOL)


def test_nothing_recognizable_raises_naming_the_class():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match="Sequential"):
        pvt_fast.accelerate(model)
    assert not hasattr(model, "pvt_fast_summary") and "forward" not in model[0].__dict__


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        pvt_fast.accelerate("pvt_v2_b2")
    with pytest.raises(ValueError, match="backend must be one of"):
        pvt_fast.accelerate(build("timm"), backend="fast")
    with pytest.raises(TypeError, match="verbose must be a bool"):
        pvt_fast.accelerate(build("timm"), verbose=1)
