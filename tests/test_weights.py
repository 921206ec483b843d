"""pvt_fast.weights: official, timm and Hugging Face checkpoints (random weights, written to tmp_path),
converted both ways and checked against the outside implementations' outputs."""
import argparse
import copy
import pickle
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.pvt_v2 import checkpoint_filter_fn
from transformers import (PvtConfig, PvtForImageClassification, PvtV2Config, PvtV2ForImageClassification,
                          PvtV2Model)

import pvt_fast
from pvt_fast import weights
from pvt_fast.models import CONFIGS, PyramidVisionTransformer
from helpers import assert_close

TOL = 1e-5  # of the output's largest magnitude; timm and Hugging Face compute the same math in another order
BACKENDS = ["reference", "sdpa"]
NUM_CLASSES = 10


def perturb(model, seed):
    """Move every parameter off its init (LayerNorms are 1/0 there), so a swapped key cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def make(name, backend="reference", **kwargs):
    torch.manual_seed(0)
    return pvt_fast.create_model(name, backend=backend, **{"num_classes": NUM_CLASSES, **kwargs}).eval()


def image(*size, seed=0):
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))


def save(state_dict, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        torch.save(state_dict, path)
    return path


def small_v1(img_size=224, **kwargs):
    """A four-stage v1 with the official variants' structure and small widths."""
    torch.manual_seed(0)
    return PyramidVisionTransformer(
        img_size=img_size, patch_size=4, num_classes=NUM_CLASSES, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4],
        mlp_ratios=[2, 2, 2, 2], qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), depths=[1, 1, 1, 1],
        sr_ratios=[8, 4, 2, 1], **kwargs).eval()


# --- timm ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_models():
    torch.manual_seed(1)
    return {name: perturb(timm.create_model(name, num_classes=NUM_CLASSES), seed=2)
            for name in ("pvt_v2_b0", "pvt_v2_b2_li")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,suffix", [("pvt_v2_b0", ".pth"), ("pvt_v2_b0", ".safetensors"),
                                         ("pvt_v2_b0", ".bin"), ("pvt_v2_b2_li", ".safetensors")])
def test_timm_checkpoint_matches_timm(timm_models, tmp_path, name, suffix, backend):
    reference = timm_models[name]
    path = save(reference.state_dict(), tmp_path / f"{name}{suffix}")
    model = make(name, backend)
    report = pvt_fast.load_pretrained(model, path)
    assert report.format == "timm"
    assert set(report.loaded) == set(model.state_dict())
    assert report.eps == report.resized == report.missing == report.unexpected == report.mismatched == ()
    x = image(97, 131)
    with torch.no_grad():
        assert_close(model(x), reference(x), atol_of_max=TOL, what=f"{name} {backend} vs timm")


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.slow), "sdpa"])
def test_timm_checkpoint_matches_timm_at_1024(timm_models, tmp_path, backend):
    reference = timm_models["pvt_v2_b0"]
    model = make("pvt_v2_b0", backend)
    pvt_fast.load_pretrained(model, save(reference.state_dict(), tmp_path / "b0.safetensors"))
    x = image(1024, 1024)
    with torch.no_grad():
        assert_close(model(x), reference(x), atol_of_max=TOL, what=f"pvt_v2_b0 {backend} vs timm at 1024x1024")


@pytest.mark.parametrize("name,size,backend", [
    ("pvt_v2_b0", (97, 131), "reference"),
    pytest.param("pvt_v2_b2_li", (97, 131), "reference", marks=pytest.mark.slow),
    ("pvt_v2_b0", (1024, 1024), "sdpa"),
])
def test_convert_to_timm_runs_in_timm(timm_models, name, size, backend):
    model = perturb(make(name, backend), seed=3)
    state_dict = model.state_dict()
    converted = weights.convert_to_timm(state_dict)
    assert list(converted) == list(checkpoint_filter_fn(state_dict, None))
    assert weights.from_timm(converted).keys() == state_dict.keys()
    reference = copy.deepcopy(timm_models[name])
    reference.load_state_dict(converted, strict=True)
    x = image(*size)
    with torch.no_grad():
        assert_close(reference(x), model(x), atol_of_max=TOL, what=f"timm {name} from convert_to_timm at {size}")


# --- Hugging Face ------------------------------------------------------------------------------------------


def test_hf_default_pvt_config_is_pvt_tiny():
    config, (_, tiny) = PvtConfig(), CONFIGS["pvt_tiny"]
    assert list(config.hidden_sizes) == tiny["embed_dims"] and list(config.depths) == tiny["depths"]
    assert list(config.num_attention_heads) == tiny["num_heads"] and list(config.mlp_ratios) == tiny["mlp_ratios"]
    assert list(config.sequence_reduction_ratios) == tiny["sr_ratios"] and config.qkv_bias == tiny["qkv_bias"]
    assert list(config.patch_sizes) == list(config.strides) == [4, 2, 2, 2] and config.image_size == 224


def hf_saved(hf_class, config, tmp_path, seed):
    torch.manual_seed(seed)
    reference = perturb(hf_class(config), seed=seed + 1)
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    return reference


def test_hf_pvt_tiny_matches_hf(tmp_path):
    reference = hf_saved(PvtForImageClassification, PvtConfig(num_labels=NUM_CLASSES), tmp_path, seed=4)
    x = image(224, 224)
    with torch.no_grad():
        expected = reference(x).logits
    for backend in BACKENDS:
        model = make("pvt_tiny", backend)
        report = pvt_fast.load_pretrained(model, tmp_path / "model.safetensors")
        assert report.format == "hf_pvt" and set(report.loaded) == set(model.state_dict())
        changed = {name: (old, new) for name, old, new in report.eps}
        assert changed == {**{f"patch_embed{i}.norm": (1e-5, 1e-6) for i in range(1, 5)},
                           **{f"block{i}.{j}.attn.norm": (1e-5, 1e-6) for i in range(1, 4) for j in range(2)}}
        assert model.patch_embed1.norm.eps == model.block2[1].attn.norm.eps == 1e-6
        with torch.no_grad():
            assert_close(model(x), expected, atol_of_max=TOL, what=f"pvt_tiny {backend} vs Hugging Face")
    for name, old, _ in report.eps:
        model.get_submodule(name).eps = old
    with torch.no_grad():
        drift = ((model(x) - expected).norm() / expected.norm()).item()
    assert drift > TOL, f"the official eps should move the output beyond {TOL}, moved it {drift:.1e}"


def test_hf_pvt_eps_from_config_json(tmp_path):
    config = PvtConfig(image_size=96, hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4],
                       mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1], layer_norm_eps=1e-5, num_labels=NUM_CLASSES)
    reference = hf_saved(PvtForImageClassification, config, tmp_path, seed=5)
    model = small_v1(img_size=96)
    report = pvt_fast.load_pretrained(model, tmp_path)
    assert report.format == "hf_pvt"
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert {name for name, _, _ in report.eps} == {"block1.0.norm1", "block1.0.norm2", "block2.0.norm1",
                                                   "block2.0.norm2", "block3.0.norm1", "block3.0.norm2",
                                                   "block4.0.norm1", "block4.0.norm2", "norm"}
    x = image(96, 96)
    with torch.no_grad():
        assert_close(model(x), reference(x).logits, atol_of_max=TOL, what="small v1 vs Hugging Face (eps 1e-5)")


@pytest.mark.parametrize("linear", [False, True])
def test_hf_pvt_v2_b0_matches_hf(tmp_path, linear):
    config = PvtV2Config(num_labels=NUM_CLASSES, linear_attention=linear)
    reference = hf_saved(PvtV2ForImageClassification, config, tmp_path, seed=6)
    images = [image(97, 131), image(224, 224)]
    with torch.no_grad():
        expected = [reference(x).logits for x in images]
    for backend in BACKENDS:
        model = make("pvt_v2_b0", backend, linear=linear)
        report = pvt_fast.load_pretrained(model, tmp_path / "model.safetensors")
        assert report.format == "hf_pvt_v2" and set(report.loaded) == set(model.state_dict())
        assert {name for name, _, _ in report.eps} == (
            {f"patch_embed{i}.norm" for i in range(1, 5)}
            | {f"block{i}.{j}.attn.norm" for i in range(1, 5 if linear else 4) for j in range(2)})
        with torch.no_grad():
            for x, y in zip(images, expected):
                assert_close(model(x), y, atol_of_max=TOL,
                             what=f"pvt_v2_b0 {backend} vs Hugging Face at {tuple(x.shape[2:])}")


def test_hf_bare_pvt_v2_model(tmp_path):
    reference = hf_saved(PvtV2Model, PvtV2Config(), tmp_path, seed=7)
    model = make("pvt_v2_b0", num_classes=0)
    assert pvt_fast.load_pretrained(model, tmp_path / "model.safetensors").format == "hf_pvt_v2"
    x = image(64, 96)
    with torch.no_grad():
        expected = reference(x).last_hidden_state.mean(dim=(2, 3))
        assert_close(model.forward_features(x), expected, atol_of_max=TOL, what="bare PvtV2Model features")


@pytest.mark.parametrize("then", ["official", "timm"])
def test_official_or_timm_load_after_hf_restores_the_construction_eps(then):
    model = make("pvt_v2_b0")
    built = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    hf_report = pvt_fast.load_pretrained(model, PvtV2ForImageClassification(
        PvtV2Config(num_labels=NUM_CLASSES)).state_dict())
    assert model.patch_embed1.norm.eps == 1e-6 and hf_report.eps
    source = perturb(make("pvt_v2_b0"), seed=14)
    checkpoint = source.state_dict() if then == "official" else weights.convert_to_timm(source.state_dict())
    report = pvt_fast.load_pretrained(model, checkpoint)
    assert report.format == then
    assert {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)} == built
    assert report.eps == tuple((name, new, old) for name, old, new in hf_report.eps)
    x = image(97, 131)
    with torch.no_grad():
        assert_close(model(x), source(x), atol_of_max=1e-6, what=f"{then} after Hugging Face vs the {then} model")
    assert pvt_fast.load_pretrained(model, checkpoint).eps == (), "a second load has nothing to put back"


def test_hf_eps_argument():
    reference = perturb(PvtV2ForImageClassification(PvtV2Config(num_labels=NUM_CLASSES)), seed=8)
    model = make("pvt_v2_b0")
    pvt_fast.load_pretrained(model, reference.state_dict(), hf_eps=1e-3)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.LayerNorm))
    with pytest.raises(ValueError, match="hf_eps applies to Hugging Face checkpoints only"):
        pvt_fast.load_pretrained(model, model.state_dict(), hf_eps=1e-6)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_convert_to_hf_runs_in_hf(version):
    if version == "v1":
        model = perturb(small_v1(img_size=96), seed=9)
        reference = PvtForImageClassification(PvtConfig(
            image_size=96, hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2],
            depths=[1, 1, 1, 1], layer_norm_eps=1e-6, num_labels=NUM_CLASSES)).eval()
        x = image(96, 96)
    else:
        model = perturb(make("pvt_v2_b0"), seed=9)
        reference = PvtV2ForImageClassification(PvtV2Config(num_labels=NUM_CLASSES)).eval()
        x = image(97, 131)
    converted = weights.convert_to_hf(model.state_dict())
    reference.load_state_dict(converted, strict=True)
    assert weights.from_hf(converted).keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.from_hf(converted).items())
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6
    with torch.no_grad():
        logits = reference(x).logits
        assert_close(logits, model(x), atol_of_max=TOL, what=f"Hugging Face {version} from convert_to_hf")


# --- official ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["raw", "model", "state_dict", "module.", "state_dict_ema", "model_ema",
                                  "model and model_ema"])
def test_official_checkpoint(tmp_path, wrap):
    source = perturb(make("pvt_v2_b0"), seed=10).state_dict()
    other = {k: torch.zeros_like(v) for k, v in source.items()}
    checkpoint = {"raw": source, "model": {"model": source, "epoch": 3},
                  "state_dict": {"state_dict": source}, "module.": {f"module.{k}": v for k, v in source.items()},
                  "state_dict_ema": {"state_dict_ema": source, "epoch": 3, "metric": 71.5},
                  "model_ema": {"model_ema": source, "epoch": 3},
                  "model and model_ema": {"model_ema": other, "model": source}}[wrap]
    model = make("pvt_v2_b0")
    report = pvt_fast.load_pretrained(model, save(checkpoint, tmp_path / "official.pth"), strict=True)
    assert report.format == "official" and report.loaded == tuple(source)
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key]), key


# --- v1 position embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [320, (224, 320)])
def test_v1_pos_embed_resized_on_load(tmp_path, img_size):
    source = perturb(small_v1(img_size=224), seed=11)
    path = save(source.state_dict(), tmp_path / "v1_224.pth")
    model = small_v1(img_size=img_size)
    report = pvt_fast.load_pretrained(model, path)
    grids = [(model.get_submodule(f"patch_embed{i}").H, model.get_submodule(f"patch_embed{i}").W) for i in range(1, 5)]
    assert report.resized == tuple((f"pos_embed{i + 1}", (s, s), grids[i]) for i, s in enumerate([56, 28, 14, 7]))
    for i, (side, grid) in enumerate(zip([56, 28, 14, 7], grids)):
        pos = getattr(source, f"pos_embed{i + 1}").detach()
        cls, pos = (pos[:, :1], pos[:, 1:]) if i == 3 else (pos[:, :0], pos)
        expected = F.interpolate(pos.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=grid, mode="bilinear",
                                 align_corners=False).flatten(2).transpose(1, 2)
        assert torch.equal(getattr(model, f"pos_embed{i + 1}").detach(), torch.cat((cls, expected), dim=1))
    x = image(*((img_size, img_size) if isinstance(img_size, int) else img_size))
    with torch.no_grad():
        assert_close(model(x), source(x), atol_of_max=1e-6, what="resized on load vs resized at run time")


# --- wrong files -------------------------------------------------------------------------------------------


def wrong_checkpoint():
    state_dict = dict(perturb(make("pvt_v2_b0"), seed=12).state_dict())
    del state_dict["block2.1.attn.q.bias"]
    state_dict["block9.0.attn.q.weight"] = torch.zeros(3, 5)
    state_dict["head.weight"] = torch.zeros(7, 256)
    return state_dict


def test_wrong_checkpoint_lists_every_problem(tmp_path):
    model = make("pvt_v2_b0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        pvt_fast.load_pretrained(model, save(wrong_checkpoint(), tmp_path / "wrong.pth"))
    message = str(info.value)
    assert "block2.1.attn.q.bias (64,)" in message
    assert "block9.0.attn.q.weight (3, 5)" in message
    assert "head.weight: checkpoint (7, 256), model (10, 256)" in message
    assert "head.bias" not in message and "strict=False" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a failed load changed the model"


def test_entries_that_are_not_tensors_are_listed_by_type():
    with pytest.raises(RuntimeError) as info:
        pvt_fast.load_pretrained(make("pvt_v2_b0"), {"epoch": 1, "optimizer": {"state": {}}, "head.bias": 0.5})
    message = str(info.value)
    assert "epoch (int, not a tensor)" in message and "optimizer (dict, not a tensor)" in message, message
    assert "head.bias: checkpoint float, model (10,)" in message, message
    report = pvt_fast.load_pretrained(make("pvt_v2_b0"), {"epoch": 1, "head.bias": 0.5}, strict=False)
    assert report.unexpected == ("epoch",) and report.mismatched == (("head.bias", "float", (10,)),)
    assert report.loaded == ()


@pytest.mark.parametrize("name,content", [
    ("notes.pth", b"hello\n"), ("notes.bin", b"not a checkpoint\n"), ("empty.pth", b""),
    ("noise.pth", bytes(range(7, 256, 3))), ("notes.safetensors", b"hello\n"), ("empty.safetensors", b"")])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a PyTorch .* or safetensors checkpoint") as info:
        pvt_fast.load_pretrained(make("pvt_v2_b0"), path)
    assert str(path) in str(info.value) and info.value.__cause__ is not None


def test_wrong_checkpoint_non_strict_loads_what_fits():
    model = make("pvt_v2_b0")
    checkpoint = wrong_checkpoint()
    report = pvt_fast.load_pretrained(model, checkpoint, strict=False)
    assert report.missing == ("block2.1.attn.q.bias",)
    assert report.unexpected == ("block9.0.attn.q.weight",)
    assert report.mismatched == (("head.weight", (7, 256), (10, 256)),)
    assert torch.equal(model.block1[0].attn.q.weight, checkpoint["block1.0.attn.q.weight"])
    assert "head.weight" not in report.loaded and "head.bias" in report.loaded
    n = len(model.state_dict()) - 2
    assert repr(report) == (f"LoadReport(format='official', loaded={n}, resized=0, eps=0, missing=1, "
                            "unexpected=1, mismatched=1)")
    details = report.details().splitlines()
    assert f"  loaded ({n}):" in details and all(f"    {key}" in details for key in report.loaded)
    assert details[-6:] == ["  missing from the checkpoint (1):", "    block2.1.attn.q.bias",
                            "  unexpected in the checkpoint (1):", "    block9.0.attn.q.weight",
                            "  shape mismatch (1):", "    head.weight: checkpoint (7, 256), model (10, 256)"]


def test_non_square_pos_embed_is_a_mismatch():
    model = small_v1(img_size=224)
    checkpoint = dict(model.state_dict(), pos_embed1=torch.zeros(1, 56 * 40, 16))
    with pytest.raises(RuntimeError, match=r"pos_embed1: checkpoint \(1, 2240, 16\), model \(1, 3136, 16\)"
                                           r"[\s\S]*square grid"):
        pvt_fast.load_pretrained(model, checkpoint)


def test_detect_format():
    v1, v2 = small_v1(96).state_dict(), make("pvt_v2_b0").state_dict()
    assert weights.detect_format(v2) == weights.detect_format(v1) == "official"
    assert weights.detect_format(weights.convert_to_timm(v2)) == "timm"
    assert weights.detect_format(weights.convert_to_hf(v1)) == "hf_pvt"
    assert weights.detect_format(weights.convert_to_hf(v2)) == "hf_pvt_v2"
    with pytest.raises(ValueError, match="Hugging Face PVT keys"):
        weights.from_hf(v2)


def test_create_model_pretrained_path(tmp_path):
    source = perturb(make("pvt_v2_b0"), seed=13).state_dict()
    path = save(source, tmp_path / "b0.pth")
    model = pvt_fast.create_model("pvt_v2_b0", pretrained=str(path), num_classes=NUM_CLASSES)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())


def test_unsafe_pickle_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "training.pth"
    torch.save({"model": make("pvt_v2_b0").state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(pickle.UnpicklingError, match="load it yourself and pass the state_dict"):
        pvt_fast.load_pretrained(make("pvt_v2_b0"), path)


def test_convert_to_timm_refuses_v1():
    with pytest.raises(ValueError, match="timm implements only PVT v2"):
        weights.convert_to_timm(small_v1(96).state_dict())
