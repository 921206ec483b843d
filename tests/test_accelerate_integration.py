"""pvt_fast.accelerate with what users do around a model: copies, saving, hooks, host options (Hugging Face
output_attentions, attention masks), the hosts' gradient checkpointing, DDP, torch.compile, calling it again
or with another backend, and pvt_fast's own models (re-bound, e.g. fused -> sdpa for export and back)."""
import copy
import io
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pvt_fast
from helpers import assert_close_rel, assert_tensors_close
from hosts import build, output
from pvt_fast.__main__ import main
from pvt_fast.ops import get_backend_ops

TOL = 1e-5


def pair(name, backend="sdpa"):
    model = build(name).eval()
    plain = copy.deepcopy(model)
    pvt_fast.accelerate(model, backend=backend)
    return model, plain


def assert_same_outputs(model, plain, x, what="output"):
    with torch.no_grad():
        assert_close_rel(output(model(x)), output(plain(x)), TOL, what)


def bindings(model):
    return {n: m._pvt_fast for n, m in model.named_modules() if hasattr(m, "_pvt_fast")}


def test_deepcopy_binds_the_copy():
    model, plain = pair("hf-segformer")
    x = torch.randn(1, 3, 64, 96)
    twin = copy.deepcopy(model)
    assert_same_outputs(twin, plain, x)
    with torch.no_grad():
        twin.segformer.stages[0].patch_embeddings.proj.weight.mul_(2)
        twin.decode_head.linear_fuse.weight.mul_(2)
    assert_same_outputs(model, plain, x, "original after the copy changed")
    changed = copy.deepcopy(plain)
    with torch.no_grad():
        changed.segformer.stages[0].patch_embeddings.proj.weight.mul_(2)
        changed.decode_head.linear_fuse.weight.mul_(2)
    assert_same_outputs(twin, changed, x, "copy after its weights changed")


def test_save_and_load():
    model, plain = pair("timm")
    x = torch.randn(1, 3, 64, 96)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = build("timm", seed=1).eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert_same_outputs(fresh, plain, x, "plain model loaded from the accelerated one's state_dict")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert set(bindings(loaded)) == set(bindings(model))
    assert_same_outputs(loaded, plain, x, "whole model saved and loaded")


def test_hooks_on_accelerated_modules_fire():
    model, plain = pair("timm")
    attn = model.stages[1].blocks[0].attn
    seen = []
    attn.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    attn.register_forward_hook(lambda m, args, out: out * 2)
    plain.stages[1].blocks[0].attn.register_forward_hook(lambda m, args, out: out * 2)
    assert_same_outputs(model, plain, torch.randn(1, 3, 64, 64))
    assert seen == ["pre"]


def test_hooks_on_host_linears_fire():
    """Linears without hooks run through the op table (oneDNN on CPU inference); one with a hook is called as
    the host calls it, so the hook sees and changes its output."""
    model, plain = pair("timm")
    seen = []
    for m, record in ((model, True), (plain, False)):
        block = m.stages[0].blocks[0]
        block.attn.q.register_forward_hook(lambda mod, args, out, r=record: (seen.append("q") if r else None) or out * 2)
        block.mlp.fc1.register_forward_hook(lambda mod, args, out, r=record: (seen.append("fc1") if r else None) or out + 1)
    assert_same_outputs(model, plain, torch.randn(1, 3, 64, 64))
    assert seen == ["q", "fc1"]


def test_hook_on_a_fused_submodule_runs_the_host_forward():
    model, plain = pair("timm")
    seen = []
    model.stages[0].blocks[0].attn.sr.register_forward_hook(lambda m, args, out: seen.append(out.shape) or out + 1)
    plain.stages[0].blocks[0].attn.sr.register_forward_hook(lambda m, args, out: out + 1)
    assert_same_outputs(model, plain, torch.randn(1, 3, 64, 64))
    assert len(seen) == 1


def test_hf_output_attentions_gives_the_hosts_attentions():
    model, plain = pair("hf-pvt-v2")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out, ref = model(x, output_attentions=True), plain(x, output_attentions=True)
    got, want = flatten(out.attentions), flatten(ref.attentions)
    assert len(got) == len(want) == 4
    for a, r in zip(got, want):
        assert_close_rel(a, r, TOL, "attention probabilities")
    assert_close_rel(out.logits, ref.logits, TOL)


def flatten(nested):
    return [t for item in nested for t in (flatten(item) if isinstance(item, tuple) else [item])]


@pytest.mark.parametrize("via", ["argument", "config"])
def test_segformer_output_attentions_gives_the_hosts_attentions(via):
    model = build("hf-segformer").eval()
    model.config._attn_implementation = "eager"  # the implementation that returns attention probabilities
    plain = copy.deepcopy(model)
    pvt_fast.accelerate(model, backend="sdpa")
    x = torch.randn(1, 3, 64, 96)
    kwargs = {"output_attentions": True} if via == "argument" else {}
    if via == "config":
        model.config.output_attentions = plain.config.output_attentions = True
    with torch.no_grad():
        out, ref = model(x, **kwargs), plain(x, **kwargs)
    assert len(out.attentions) == len(ref.attentions) == 4
    for a, r in zip(out.attentions, ref.attentions):
        assert_close_rel(a, r, TOL, "attention probabilities")


def test_segformer_attention_mask_runs_the_host_forward():
    model, plain = pair("hf-segformer")
    attn, ref = model.segformer.stages[3].blocks[0].attention, plain.segformer.stages[3].blocks[0].attention
    x = torch.randn(1, 6, 64)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., -1] = float("-inf")
    with torch.no_grad():
        assert_close_rel(attn(x, 2, 3, attention_mask=mask)[0], ref(x, 2, 3, attention_mask=mask)[0], TOL)
        assert_close_rel(attn(x, 2, 3)[0], ref(x, 2, 3)[0], TOL)


@pytest.mark.parametrize("name", ["timm", "hf-segformer"])
def test_host_gradient_checkpointing(name):
    model, plain = pair(name)
    if name == "timm":
        model.set_grad_checkpointing(True)
    else:
        model.activation_checkpointing_enable()  # gradient_checkpointing_enable, deprecated in 5.x
    x = torch.randn(2, 3, 64, 96)
    for m in (model.train(), plain.train()):
        output(m(x)).square().mean().backward()
    assert_tensors_close({n: p.grad for n, p in model.named_parameters()},
                         {n: p.grad for n, p in plain.named_parameters()}, 1e-4, "gradient of")


def test_again_and_with_another_backend():
    model, plain = pair("hf-segformer")
    x = torch.randn(1, 3, 64, 96)
    counts = dict(model.pvt_fast_summary.counts)
    pvt_fast.accelerate(model, backend="sdpa")
    assert dict(model.pvt_fast_summary.counts) == counts
    pvt_fast.accelerate(model, backend="reference")
    reference = get_backend_ops("reference")
    assert all(b.ops == reference for b in bindings(model).values())
    assert model.pvt_fast_summary.backend == "reference"
    assert_same_outputs(model, plain, x)


def test_fused_on_a_host_model(kernel_device):
    """The fused (Triton) op table on separate key/value Linears and timm's layout (interpreter on CPU)."""
    for name in ("hf-segformer", "timm"):
        model, plain = pair(name, backend="fused")
        model.to(kernel_device)
        plain.to(kernel_device)
        assert_same_outputs(model, plain, torch.randn(1, 3, 35, 33, device=kernel_device), name)


def _own(backend, seed=0):
    torch.manual_seed(seed)
    return pvt_fast.create_model("pvt_v2_b0", backend=backend, depths=[1, 1, 1, 1], num_classes=5).eval()


def test_own_model_is_rebound():
    """A model built with fused (allowed on CPU: nothing runs yet) switched to sdpa, as before export, and
    back: every layer's op table is the requested one and the numbers are the sdpa model's."""
    model = _own("fused")
    fused = get_backend_ops("fused")
    assert pvt_fast.accelerate(model, backend="sdpa") is model
    sdpa = get_backend_ops("sdpa")
    tables = [m._ops for m in model.modules() if hasattr(m, "_ops")]
    assert len(tables) == 1 + 4 * 3 and all(t == sdpa for t in tables) and model.backend == "sdpa"
    assert model.block1[0].attn._reduce is sdpa.reduce_kv
    assert dict(model.pvt_fast_summary.counts) == {"attention (sr conv)": 3, "attention (sr 1)": 1,
                                                   "mlp (dwconv)": 4, "patch embed": 4}
    assert dict(model.pvt_fast_summary.sources) == {"pvt_fast": 12}
    reference = _own("sdpa", seed=1)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    pvt_fast.accelerate(model, backend="fused")
    assert all(m._ops.attention is fused.attention for m in model.modules() if hasattr(m, "_ops"))
    assert model.block1[0].attn._reduce is fused.reduce_kv and model.backend == "fused"


def test_own_layers_inside_another_model_are_rebound():
    model = torch.nn.Sequential(_own("reference"))
    pvt_fast.accelerate(model, backend="sdpa")
    assert model[0].backend == "sdpa" and model.pvt_fast_summary.total == 12


def _ddp_worker(rank, init_file, state, batch, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = build("timm")
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(pvt_fast.accelerate(model, backend="sdpa"))
        x = batch[rank:rank + 1]
        output(ddp(x)).square().mean().backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, out)
        dist.barrier()  # both ranks done before either tears gloo down (a rank left alone aborted)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_one_process(tmp_path):
    model = build("timm")
    batch = torch.randn(2, 3, 64, 96)
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), model.state_dict(), batch, str(tmp_path / "g.pt")),
             nprocs=2, join=True)
    grads = torch.load(tmp_path / "g.pt")
    # Each rank's loss is the mean over its image; DDP averages: the one-process loss is their mean.
    (output(model(batch[:1])).square().mean() / 2 + output(model(batch[1:])).square().mean() / 2).backward()
    assert_tensors_close(grads, {n: p.grad for n, p in model.named_parameters()}, 1e-4, "gradient of")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm", "hf-segformer"])
def test_compiles_whole(name):
    """torch.compile(fullgraph=True) of the accelerated model (Hugging Face installs its output hooks on the
    first call, which dynamo cannot trace: one eager call first, as the plain model needs)."""
    torch._dynamo.reset()
    model, plain = pair(name)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        model(x)
        compiled = torch.compile(model, fullgraph=True)
        assert_close_rel(output(compiled(x)), output(plain(x)), TOL)


def test_profile_a_host_model(tmp_path):
    """``python -m pvt_fast profile --model timm:NAME``: the accelerated model against itself untouched."""
    assert main(["profile", "--model", "timm:pvt_v2_b0", "--size", "64", "--repeat", "1", "--backend", "sdpa",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["relative_error"] < TOL and set(report["results"]) == {"accelerated", "plain"}
    assert report["backend"] == "sdpa" and "mlp (dwconv)" in report["summary"]
    assert "speed-up" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--model", "timm:pvt_v2_b0", "--compare", "sdpa"], "compare must be 'plain' or 'none' for host model"),
    (["--model", "timm:pvt_v2_b0", "--sweep", "64,96"], "--sweep is not available for host model"),
    (["--model", "hf-segformer-b9"], "model must be one of timm:<pvt_v2 name>, hf-segformer-b0"),
    (["--model", "timm:pvt_v9"], "timm has no model 'pvt_v9'"),
    (["--model", "timm:resnet18"], "found no PVT-family block in ResNet"),
])
def test_profile_a_host_model_rejects(argv, message, tmp_path, capsys):
    assert main(["profile", *argv, "--size", "64", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
