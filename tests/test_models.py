"""Model factory and checkpoints: every decoder builds, checkpoints round-trip, wrong ones are refused."""

from __future__ import annotations

import json

import pytest
import torch

from defectscan.errors import DefectscanError
from defectscan.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
from defectscan.models.checkpoint import checkpoint_paths
from defectscan.models.weights import load_state_file


@pytest.mark.parametrize("arch", ["unet", "fpn", "upernet", "deeplabv3plus"])
def test_every_decoder_builds_with_a_cnn_encoder(arch):
    spec = ModelSpec(arch=arch, encoder="resnet18", classes=("bg", "a", "b"), head="softmax")
    model = build_model(spec).eval()
    with torch.no_grad():
        y = model(torch.zeros(1, 3, 64, 96))
    assert y.shape == (1, 3, 64, 96)


def test_spec_validation_errors():
    with pytest.raises(DefectscanError, match="unknown architecture"):
        ModelSpec(arch="segnet")
    with pytest.raises(DefectscanError, match="unknown encoder"):
        ModelSpec(encoder="vgg99")
    with pytest.raises(DefectscanError, match="background class"):
        ModelSpec(classes=("defect",), head="softmax")
    assert ModelSpec(encoder="tu-convnext_tiny").encoder == "convnext_tiny"
    assert ModelSpec(arch_kwargs={"encoder_depth": 4}).stride == 16


def test_checkpoint_roundtrip_is_exact_and_sidecar_is_complete(tmp_path):
    spec = ModelSpec(encoder="resnet18", tile=256, threshold=0.4)
    model = build_model(spec).eval()
    save_checkpoint(model, spec, tmp_path / "ckpt", extra={"note": "test"})
    weights, sidecar = checkpoint_paths(tmp_path / "ckpt")
    meta = json.loads(sidecar.read_text())
    assert meta["model"]["encoder"] == "resnet18" and meta["model"]["tile"] == 256
    assert {"torch", "segmentation_models_pytorch", "timm", "defectscan"} <= set(meta["versions"])
    loaded, spec2, _ = load_checkpoint(weights)
    assert spec2 == spec and not loaded.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    spec = ModelSpec(encoder="resnet18")
    save_checkpoint(build_model(spec), spec, tmp_path / "r18")
    # a sidecar that claims another encoder over these weights
    other = ModelSpec(encoder="resnet34")
    meta = json.loads((tmp_path / "r18.json").read_text())
    meta["model"] = other.to_dict()
    meta.pop("weights_sha256")
    (tmp_path / "r18.json").write_text(json.dumps(meta))
    with pytest.raises(DefectscanError, match="does not fit the model"):
        load_checkpoint(tmp_path / "r18")
    save_checkpoint(build_model(spec), spec, tmp_path / "ok")
    with pytest.raises(DefectscanError, match="was asked for"):
        load_checkpoint(tmp_path / "ok", expect=ModelSpec(arch="fpn", encoder="resnet18"))


def test_damaged_or_foreign_checkpoints_are_clear_errors(tmp_path):
    spec = ModelSpec(encoder="resnet18")
    save_checkpoint(build_model(spec), spec, tmp_path / "c")
    raw = bytearray((tmp_path / "c.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "c.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DefectscanError, match="checksum"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(DefectscanError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "lonely.safetensors").write_bytes(b"x")  # weights without their sidecar
    with pytest.raises(DefectscanError, match="sidecar not found"):
        load_checkpoint(tmp_path / "lonely.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"x")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DefectscanError, match="not valid JSON"):
        load_checkpoint(tmp_path / "bad")


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    spec = ModelSpec(encoder="resnet18")
    model = build_model(spec)
    weights = save_checkpoint(model, spec, tmp_path / "h", half=True)
    assert load_state_file(weights)["encoder.conv1.weight"].dtype == torch.float16
    loaded, _, _ = load_checkpoint(weights)
    assert loaded.encoder.conv1.weight.dtype == torch.float32
    assert torch.allclose(loaded.encoder.conv1.weight, model.encoder.conv1.weight, atol=1e-2)


def test_local_encoder_weights_file(tmp_path):
    spec = ModelSpec(encoder="resnet18")
    donor = build_model(spec)
    # a torchvision-style classification checkpoint (.pth with fc head), read without unpickling code
    state = {k: v for k, v in donor.encoder.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "r18.pth")
    model = build_model(spec, encoder_weights=tmp_path / "r18.pth")
    assert torch.equal(model.encoder.conv1.weight, donor.encoder.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(DefectscanError, match="does not fit"):
        build_model(spec, encoder_weights=tmp_path / "wrong.pth")
    with pytest.raises(DefectscanError, match="not found"):
        build_model(spec, encoder_weights=tmp_path / "absent.pth")


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(DefectscanError, match="cannot read weights"):
        load_state_file(tmp_path / "evil.pth")
