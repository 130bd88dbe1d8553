"""Tiling engine: layout coverage, exactness against an independent whole-image reference, stitch modes, heads,
any predict callable, bounded memory, errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from defectscan.errors import DefectscanError
from defectscan.inference import TorchTiles
from defectscan.models.registry import IMAGENET_MEAN, IMAGENET_STD
from defectscan.tiling import plan_tiles, tiled_inference, tiled_rows
from defectscan.tiling.readers import _reflect


class SmallFCN(nn.Module):
    """Fully convolutional net with two stride-2 stages (align 4), receptive field well under 32 px."""

    def __init__(self, classes: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.Upsample(scale_factor=4, mode="nearest"),
            nn.Conv2d(8, classes, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiles(model: nn.Module, head: str = "sigmoid", **kwargs) -> TorchTiles:
    kwargs.setdefault("amp", "off")  # exactness checks compare with float32 references (auto is bf16 on some CPUs)
    return TorchTiles(model, head=head, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu", **kwargs)


def whole_image_reference(model: nn.Module, image: np.ndarray, layout, head: str = "sigmoid") -> np.ndarray:
    """One forward pass over the image padded by numpy's own reflection (independent of the engine's reader) to
    the span all tiles cover, cropped back to the image."""
    th, tw = layout.tile_shape
    span_h = (layout.rows.count - 1) * layout.rows.step + th
    span_w = (layout.cols.count - 1) * layout.cols.step + tw
    h, w = image.shape[:2]
    pads = []
    for pad, span, n in ((layout.rows.pad, span_h, h), (layout.cols.pad, span_w, w)):
        pads.append((pad, span - n - pad))
    if h == 1 or w == 1:  # numpy cannot reflect a single row/column: it is its own mirror
        region = np.pad(image, (*pads, (0, 0)), mode="edge")
    else:
        region = np.pad(image, (*pads, (0, 0)), mode="reflect")
    x = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(x)
    p = torch.sigmoid(logits) if head == "sigmoid" else torch.softmax(logits, 1)
    return p[0, :, layout.rows.pad : layout.rows.pad + h, layout.cols.pad : layout.cols.pad + w].numpy()


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth structure plus noise, so the net's output varies across the image
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(yy / 17.0)[..., None] * np.cos(xx / 23.0)[..., None]
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(1, 700), w=st.integers(1, 700), align=st.sampled_from([1, 2, 8, 32]),
    tile_units=st.integers(1, 12), overlap_frac=st.floats(0, 0.9),
)
def test_center_mode_covers_every_pixel_exactly_once(h, w, align, tile_units, overlap_frac):
    tile = tile_units * max(align, 16)
    tile -= tile % align
    overlap = int(overlap_frac * (tile - align))
    layout = plan_tiles(h, w, tile, overlap, align)
    count = np.zeros((h, w), np.int32)
    for iy, ix in layout.tiles():
        (y0, y1), (x0, x1) = layout.rows.owned(iy), layout.cols.owned(ix)
        count[y0:y1, x0:x1] += 1
        # the owned region keeps at least `pad` pixels of context inside its tile on every side
        for axis, k, (a, b) in ((layout.rows, iy, (y0, y1)), (layout.cols, ix, (x0, x1))):
            assert axis.origin(k) <= a - axis.pad
            assert b + axis.pad <= axis.origin(k) + axis.tile
            assert axis.tile % align == 0 and axis.step % align == 0
    assert (count == 1).all()


def test_reflect_matches_numpy_reflect_padding():
    for n in (1, 2, 3, 7):
        arr = np.arange(n)
        idx = np.arange(-3 * n - 5, 4 * n + 5)
        expected = np.pad(arr, 50, mode="reflect")[idx + 50] if n > 1 else np.zeros_like(idx)
        assert (_reflect(idx, n) == expected).all()


@pytest.mark.parametrize("shape", [(301, 457), (96, 130), (20, 9), (1, 1)])
def test_center_stitching_equals_whole_image_inference(shape):
    model = SmallFCN().eval()
    image = random_image(*shape)
    layout = plan_tiles(*shape, 64, 32, 4)
    ref = whole_image_reference(model, image, layout)
    out = tiled_inference(tiles(model), image, tile=64, overlap=32, align=4, out_dtype=np.float32, batch_size=3)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < 1e-5


@pytest.mark.parametrize("stitch", ["center", "gaussian"])
def test_rows_come_in_order_one_tile_row_at_a_time(stitch):
    """`tiled_rows` yields each output row once, top to bottom, in blocks no taller than a tile, and they are the
    rows of the whole map: a caller can write them out and never hold the image's probabilities."""
    model = SmallFCN().eval()
    image = random_image(301, 157)
    whole = tiled_inference(tiles(model), image, tile=64, overlap=32, align=4, stitch=stitch)
    top = 0
    for y0, block in tiled_rows(tiles(model), image, tile=64, overlap=32, align=4, stitch=stitch):
        assert y0 == top and block.shape[0] == whole.shape[0] and block.shape[2] == 157 and block.shape[1] <= 64
        assert (block == whole[:, y0 : y0 + block.shape[1]]).all()
        top += block.shape[1]
    assert top == 301


def test_gaussian_stitching_difference_is_measured_and_small():
    model = SmallFCN().eval()
    image = random_image(301, 457)
    layout = plan_tiles(301, 457, 64, 32, 4)
    ref = whole_image_reference(model, image, layout)
    out = tiled_inference(tiles(model), image, tile=64, overlap=32, align=4, stitch="gaussian", out_dtype=np.float32)
    diff = np.abs(out - ref)
    print(f"gaussian vs whole image: max {diff.max():.2e}, mean {diff.mean():.2e}")
    # with the receptive field inside the margin both modes are near-exact; gaussian blends float round-off only
    assert diff.max() < 1e-4
    # too little margin: both modes deviate; measure and bound them
    layout = plan_tiles(301, 457, 32, 4, 4)
    ref = whole_image_reference(model, image, layout)
    for mode in ("center", "gaussian"):
        out = tiled_inference(tiles(model), image, tile=32, overlap=4, align=4, stitch=mode, out_dtype=np.float32)
        d = np.abs(out - ref)
        print(f"{mode}, margin 2 px: max {d.max():.2e}, mean {d.mean():.2e}")
        assert 1e-6 < d.mean() < 0.05


def test_uint8_output_is_rounded_probability():
    model = SmallFCN().eval()
    image = random_image(200, 150)
    f = tiled_inference(tiles(model), image, tile=64, overlap=32, align=4, out_dtype=np.float32)
    u = tiled_inference(tiles(model), image, tile=64, overlap=32, align=4)
    assert u.dtype == np.uint8
    assert np.abs(u.astype(np.float32) / 255 - f).max() <= 0.5 / 255 + 1e-6
    g = tiled_inference(tiles(model), image, tile=64, overlap=32, align=4, stitch="gaussian")
    assert np.abs(g.astype(np.int16) - u.astype(np.int16)).max() <= 1


def test_softmax_head_and_multiclass_output():
    model = SmallFCN(classes=4).eval()
    image = random_image(150, 170)
    layout = plan_tiles(150, 170, 64, 32, 4)
    out = tiled_inference(tiles(model, "softmax"), image, tile=64, overlap=32, align=4, out_dtype=np.float32)
    assert out.shape == (4, 150, 170)
    assert np.allclose(out.sum(0), 1.0, atol=1e-5)
    assert np.abs(out - whole_image_reference(model, image, layout, head="softmax")).max() < 1e-5


def test_tta_averages_flipped_predictions():
    model = SmallFCN().eval()
    u8 = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = (u8.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        manual = sum(torch.flip(torch.sigmoid(model(torch.flip(x, d))), d) if d else torch.sigmoid(model(x))
                     for d in ((), (3,), (2,), (2, 3))) / 4
    got = tiles(model, tta=True)(u8)
    assert torch.allclose(got, manual, atol=1e-5)


def test_preallocated_output_such_as_memmap(tmp_path):
    model = SmallFCN().eval()
    image = random_image(120, 90)
    out = np.lib.format.open_memmap(tmp_path / "probs.npy", mode="w+", dtype=np.uint8, shape=(1, 120, 90))
    res = tiled_inference(tiles(model), image, tile=64, overlap=32, align=4, out=out)
    assert res is out
    ref = tiled_inference(tiles(model), image, tile=64, overlap=32, align=4)
    assert (np.asarray(out) == ref).all()
    with pytest.raises(DefectscanError, match="output array has shape"):
        tiled_inference(tiles(model), image, tile=64, overlap=32, align=4, out=np.zeros((2, 120, 90), np.uint8))


def test_progress_reports_every_tile():
    calls = []
    tiled_inference(tiles(SmallFCN().eval()), random_image(200, 200), tile=64, overlap=32, align=4, batch_size=3,
                    progress=lambda d, n: calls.append((d, n)))
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tile=500), "multiple of 32"),
        (dict(tile=512, overlap=512), "overlap"),
        (dict(tile=64, overlap=40), "tile - overlap must be at least 32"),
        (dict(stitch="median"), "unknown stitch mode"),
        (dict(batch_size=0), "batch size"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(DefectscanError, match=message):
        tiled_inference(tiles(SmallFCN().eval()), random_image(64, 64), **kwargs)


@pytest.mark.parametrize("kwargs, message", [(dict(amp="fp8"), "unknown amp mode"), (dict(device="cuda:7"), "not available")])
def test_bad_backend_options_are_clear_errors(kwargs, message):
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    with pytest.raises(DefectscanError, match=message):
        TorchTiles(SmallFCN().eval(), mean=IMAGENET_MEAN, std=IMAGENET_STD, **{"device": "cpu", **kwargs})


def test_amp_auto_on_cpus_is_bf16_only_for_bf16_trained_models_on_native_bf16(monkeypatch):
    """bf16 autocast moved a float32-trained model's BSData defect IoU by -0.019 (README): float32 on CPUs unless
    the model was trained in bf16 and the CPU has native bf16; whatever the CPU, `off` and `bf16` are obeyed."""
    from defectscan import runtime
    from defectscan.runtime import resolve_amp

    cpu = torch.device("cpu")
    for native in ("AVX512-BF16", "none"):
        monkeypatch.setattr(runtime, "cpu_bf16", lambda native=native: native)
        assert resolve_amp("auto", cpu) is None and resolve_amp("auto", cpu, trained_in="float32") is None
        assert resolve_amp("off", cpu, trained_in="mixed bfloat16") is None
        assert resolve_amp("bf16", cpu) == torch.bfloat16
        bf16_model = resolve_amp("auto", cpu, trained_in="mixed bfloat16")
        assert bf16_model == (torch.bfloat16 if native != "none" else None)
        made = TorchTiles(SmallFCN().eval(), mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu", trained_in="mixed bfloat16")
        assert made.amp_dtype == bf16_model
        # asked-for bf16 is obeyed, with a warning where it is emulated (9-18x slower than float32, README)
        note = runtime.emulated_bf16_note(cpu, torch.bfloat16)
        assert ("no native bf16" in note) == (native == "none")
        assert runtime.emulated_bf16_note(cpu, None) == "" and runtime.emulated_bf16_note(torch.device("cuda"), torch.bfloat16) == ""
    assert TorchTiles(SmallFCN().eval(), mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu").amp_dtype is None


def test_float32_on_cuda_turns_off_tf32_and_mixed_precision_leaves_it(monkeypatch):
    """cuDNN runs float32 convolutions in TF32 by default: a float32 run on a GPU turns that off, so its sidecar's
    'float32' is true and its study cells compare with a CPU's. Flags only: this runs without a GPU."""
    from defectscan.runtime import exact_float32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    monkeypatch.setattr(cudnn, "allow_tf32", True)  # restored after the test, as torch's default is
    monkeypatch.setattr(matmul, "allow_tf32", True)
    exact_float32(torch.device("cpu"), None)
    exact_float32(torch.device("cuda"), torch.bfloat16)
    assert cudnn.allow_tf32 and matmul.allow_tf32
    exact_float32(torch.device("cuda"), None)
    assert not cudnn.allow_tf32 and not matmul.allow_tf32


def test_wrong_output_size_model_is_an_error():
    model = nn.Conv2d(3, 1, 3, stride=2, padding=1)
    with pytest.raises(DefectscanError, match="full resolution"):
        tiled_inference(tiles(model), random_image(64, 64), tile=64, overlap=32)


def _gray_probability(batch: torch.Tensor) -> np.ndarray:
    """A model-free predict callable returning numpy (as an ONNX session would): mean intensity as probability."""
    return (batch.numpy().mean(axis=-1, dtype=np.float32) / 255)[:, None]


def test_any_callable_returning_numpy_is_a_predictor():
    image = random_image(150, 170)
    out = tiled_inference(_gray_probability, image, tile=64, overlap=32, align=4, out_dtype=np.float32)
    assert np.abs(out[0] - image.mean(-1) / 255).max() < 1e-5  # a per-pixel function is stitched exactly


def test_engine_never_moves_or_changes_the_callers_model():
    model = SmallFCN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tiled_inference(tiles(model), random_image(100, 100), tile=64, overlap=32, align=4)
    assert model.training, "mode changed"
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("stitch", ["center", "gaussian"])
def test_peak_memory_of_a_large_image_is_output_plus_a_constant(stitch):
    """8192 x 8192 RGB (192 MB in) -> one uint8 map (64 MB out): traced allocations during tiling stay within the
    output plus a constant that does not grow with the image height: three float32 strips of tile x width
    (gaussian: the accumulator, its normaliser and the normalised block; 16 MB each here) and 16 MB for tiles and
    the predictor's outputs. A float copy of the image alone would be 768 MB. The input exists before tracing."""
    side = 8192
    image = np.full((side, side, 3), 100, np.uint8)
    image[::97] = 200
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = tiled_inference(_gray_probability, image, tile=512, overlap=64, stitch=stitch, batch_size=4, align=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (1, side, side) and out.dtype == np.uint8
    assert int(out[0, 97, 5]) == round(200 / 255 * 255) and int(out[0, 98, 5]) == 100
    constant = 3 * 512 * side * 4 + 16 * 2**20
    print(f"{stitch}: peak {peak / 2**20:.0f} MB = output {out.nbytes / 2**20:.0f} MB + {(peak - out.nbytes) / 2**20:.0f} MB")
    assert peak <= out.nbytes + constant, f"peak {peak / 2**20:.0f} MB for a {out.nbytes / 2**20:.0f} MB output"
