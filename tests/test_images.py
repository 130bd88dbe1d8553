"""Image reading: formats, bit depths, channels, bad files, atomic writes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile

from defectscan.errors import DefectscanError
from defectscan.io.files import atomic_path
from defectscan.io import images
from defectscan.io.images import StreamedImageSource, open_image, read_image, write_image
from defectscan.io.png import PngRowWriter


def rgb(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_roundtrip_keeps_rgb_order(tmp_path):
    img = rgb()
    write_image(tmp_path / "a.png", img)
    assert (read_image(tmp_path / "a.png") == img).all()


def test_sixteen_bit_twelve_bit_data_is_scaled_by_its_bit_depth(tmp_path):
    data = np.linspace(0, 4095, 40 * 60).reshape(40, 60).astype(np.uint16)  # 12-bit camera in a 16-bit PNG
    cv2.imwrite(str(tmp_path / "g16.png"), data)
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert out.max() == 255 and out.min() == 0
    assert (out[..., 0] == out[..., 1]).all()


def test_grayscale_and_alpha_are_converted(tmp_path):
    gray = rgb()[..., 0]
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    assert (read_image(tmp_path / "g.png") == np.repeat(gray[..., None], 3, 2)).all()
    rgba = np.dstack([rgb(), np.full((40, 60), 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), rgba[..., [2, 1, 0, 3]])
    assert (read_image(tmp_path / "a.png") == rgba[..., :3]).all()


def test_uncompressed_tiff_is_memory_mapped_and_read_by_region(tmp_path):
    img = rgb(300, 200)
    tifffile.imwrite(tmp_path / "big.tif", img)
    src = open_image(tmp_path / "big.tif")
    assert isinstance(src.data, np.memmap)
    assert (src.read(10, 50, 20, 90) == img[10:50, 20:90]).all()
    tifffile.imwrite(tmp_path / "z.tif", img, compression="zlib")
    assert (read_image(tmp_path / "z.tif") == img).all()


def test_sixteen_bit_tiff_is_converted_per_region(tmp_path):
    data = (np.arange(64 * 64).reshape(64, 64) % 1024).astype(np.uint16)  # 10-bit data
    tifffile.imwrite(tmp_path / "t16.tif", data)
    src = open_image(tmp_path / "t16.tif")
    region = src.read(0, 2, 0, 64)
    assert region.dtype == np.uint8 and region.shape == (2, 64, 3)
    assert region[0, 63, 0] == round(63 * 255 / 1023)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_files_are_one_line_errors(tmp_path, suffix, capfd):
    p = tmp_path / f"img{suffix}"
    cv2.imwrite(str(p), rgb(200, 200))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DefectscanError) as err:
        open_image(p).to_rgb8()
    assert "\n" not in str(err.value)
    assert capfd.readouterr().err == ""  # libpng/libjpeg/libtiff chatter is silenced


def test_missing_unsupported_and_garbage_files(tmp_path):
    with pytest.raises(DefectscanError, match="no such file"):
        open_image(tmp_path / "nope.png")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DefectscanError, match="unsupported image format"):
        open_image(tmp_path / "x.gif")
    (tmp_path / "fake.png").write_bytes(b"not an image at all")
    with pytest.raises(DefectscanError, match="cannot decode"):
        open_image(tmp_path / "fake.png")
    with pytest.raises(DefectscanError, match="is a directory"):
        open_image(tmp_path)


@pytest.fixture
def stream_everything(monkeypatch):
    """Decode PNG/JPEG files row by row from the first pixel (the real threshold is 2^24 px)."""
    if images._vips() is None:
        pytest.skip("libvips (pyvips) cannot be loaded here")
    monkeypatch.setattr(images, "STREAM_MIN_PIXELS", 1)


def _smooth(h, w, seed=0):
    return cv2.GaussianBlur(rgb(h, w, seed), (9, 9), 3)  # compressible, so JPEG blocks look like real images


@pytest.mark.parametrize("kind", ["rgb", "jpeg", "gray", "gray16", "rgba", "gray_alpha", "palette"])
def test_streamed_decode_equals_opencv_whole_decode(tmp_path, stream_everything, monkeypatch, kind):
    from PIL import Image

    img = _smooth(97, 130)
    p = tmp_path / ("a.jpg" if kind == "jpeg" else "a.png")
    if kind in ("rgb", "jpeg"):
        cv2.imwrite(str(p), img[..., ::-1])
    elif kind == "gray":
        cv2.imwrite(str(p), img[..., 0])
    elif kind == "gray16":
        cv2.imwrite(str(p), img[..., 0].astype(np.uint16) * 13)  # 12-bit data: the value scale needs the maximum
    elif kind == "rgba":
        cv2.imwrite(str(p), np.dstack([img[..., ::-1], img[..., 0]]))
    else:
        Image.fromarray(img).convert("LA" if kind == "gray_alpha" else "P").save(p)
    src = open_image(p)
    assert isinstance(src, StreamedImageSource)
    monkeypatch.setattr(images, "STREAM_MIN_PIXELS", 1 << 40)
    whole = open_image(p)
    assert not isinstance(whole, StreamedImageSource)
    expected = whole.to_rgb8()
    assert np.array_equal(src.read(0, 97, 0, 130), expected)
    # tile-like access: overlapping bands downwards, columns in any order, reflected rows at both borders
    for y0 in (0, 30, 31, 60, 90):
        assert np.array_equal(src.read(y0, min(97, y0 + 40), 50, 80), expected[y0 : y0 + 40, 50:80])
    rows, cols = np.array([2, 1, 0, 1, 2]), np.array([5, 4, 3])
    assert np.array_equal(src.read_rows(rows, cols), expected[rows][:, cols])


def test_streamed_source_holds_only_the_band_asked_for_and_restarts_for_an_earlier_row(tmp_path, stream_everything):
    img = _smooth(300, 64)
    cv2.imwrite(str(tmp_path / "a.png"), img[..., ::-1])
    src = open_image(tmp_path / "a.png")
    assert src.passes == 1
    for y0 in range(0, 300, 20):  # like tile rows: each band overlaps the previous one
        assert np.array_equal(src.read(y0, min(300, y0 + 40), 0, 64), img[y0 : y0 + 40])
        assert src._held.shape[0] <= 40
    assert src.passes == 1
    assert np.array_equal(src.read(0, 10, 0, 64), img[:10])  # the overlay's second pass over the image
    assert src.passes == 2
    assert np.array_equal(src.read(250, 300, 0, 64), img[250:])  # skipping ahead decodes on, no restart
    assert src.passes == 2 and src._held.shape[0] == 50


def test_streamed_png_truncated_or_corrupt_is_a_one_line_error(tmp_path, stream_everything, capfd):
    p = tmp_path / "cut.png"
    cv2.imwrite(str(p), rgb(200, 200))
    p.write_bytes(p.read_bytes()[:-2000])
    with pytest.raises(DefectscanError, match="cannot decode") as err:
        open_image(p)  # refused before any tile is read, not minutes into tiling
    assert "\n" not in str(err.value)
    data = bytearray(cv2.imencode(".png", rgb(200, 200))[1].tobytes())
    data[3000:3100] = b"\x00" * 100  # damaged inside the image data, file ends properly
    p.write_bytes(bytes(data))
    with pytest.raises(DefectscanError, match="cannot decode") as err:
        open_image(p).to_rgb8()
    assert "\n" not in str(err.value)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("channels", [1, 3])
def test_png_row_writer_matches_the_image_in_any_strips(tmp_path, channels):
    rng = np.random.default_rng(channels)
    img = rng.integers(0, 256, (71, 45, 3) if channels == 3 else (71, 45), dtype=np.uint8)
    img[10:40] = 7  # long runs, as in probability maps
    with PngRowWriter(tmp_path / "a.png", 71, 45, channels) as png:
        for y0, y1 in ((0, 1), (1, 30), (30, 71)):
            png.write(img[y0:y1])
    assert (read_image(tmp_path / "a.png") == (img if channels == 3 else np.repeat(img[..., None], 3, 2))).all()
    with pytest.raises(ValueError, match="10 of 71 rows"):
        with PngRowWriter(tmp_path / "b.png", 71, 45, channels) as png:
            png.write(img[:10])
    with pytest.raises(ValueError, match="do not fit"):
        PngRowWriter(tmp_path / "c.png", 71, 44, channels).write(img[:3])


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_two_writers_of_one_output_directory_never_fail_or_mix(tmp_path):
    """`infer` from two processes into one --out: each swap tolerates the other's renames; the last one wins whole."""
    import threading

    from defectscan.io.files import atomic_dir

    final, errors = tmp_path / "out" / "wafer", []

    def writer(tag: str) -> None:
        try:
            for i in range(40):
                with atomic_dir(final) as tmp:
                    for name in ("mask.png", "defects.json"):
                        (tmp / name).write_text(f"{tag}{i}")
        except Exception as exc:  # pragma: no cover - the failure this test is about
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    contents = {(final / n).read_text() for n in ("mask.png", "defects.json")}
    assert len(contents) == 1  # both files from the same write
    assert sorted(p.name for p in final.parent.iterdir()) == ["wafer"]  # no partial or old folders left
