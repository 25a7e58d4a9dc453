"""Image decoding and bilinear resizing against Pillow, the reference HF image processors use.

The Rust side is the `pil_resize` example of the aperture-vision crate
(`cargo build --workspace --examples`), found at $APERTURE_PIL_RESIZE (default:
target/debug/examples/pil_resize). It decodes IN to RGB, resizes it with
`pil_bilinear` to W x H (W = H = 0: no resize) and writes a PNG, which is lossless,
so what we compare is exactly what the Rust code produced.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("APERTURE_PIL_RESIZE", REPO / "target" / "debug" / "examples" / "pil_resize"))
CATS = REPO.parent / "shared" / "data" / "images" / "000000039769.png"


def rust_rgb(tmp_path, src: Path, w=0, h=0) -> np.ndarray:
    if not BIN.exists():
        pytest.fail(f"{BIN} missing: run `cargo build --workspace --examples` first")
    out = tmp_path / "rust_out.png"
    subprocess.run([str(BIN), str(src), str(out), str(w), str(h)], check=True, capture_output=True)
    with Image.open(out) as im:
        assert im.mode == "RGB"
        return np.asarray(im).astype(np.int16)


def gradient(w, h):
    x = np.linspace(0, 255, w)[None, :]
    y = np.linspace(0, 255, h)[:, None]
    rgb = np.stack(
        [np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), (x + y) / 2 + np.zeros((h, w))], axis=2
    )
    return Image.fromarray(rgb.astype(np.uint8))


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def textured(w, h, seed):
    """Smooth content plus noise and sharp edges: closer to a photo than either alone."""
    rng = np.random.default_rng(seed)
    base = np.asarray(gradient(w, h)).astype(np.int32)
    base[h // 3 : h // 2, :, 0] = 255
    base[:, w // 4 : w // 4 + 3, 1] = 0
    return Image.fromarray(np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8))


RESIZE_CASES = [
    ("37x53 up", lambda: textured(37, 53, 1), (640, 640)),
    ("640x480", lambda: textured(640, 480, 2), (640, 640)),
    ("1000x333", lambda: textured(1000, 333, 3), (640, 640)),
    ("513x777", lambda: textured(513, 777, 4), (640, 640)),
    ("20x30 up", lambda: gradient(20, 30), (640, 640)),
    ("1280x960 down", lambda: textured(1280, 960, 5), (640, 640)),
    ("noise 801x599", lambda: noise(801, 599, 6), (640, 640)),
    ("noise 513x777", lambda: noise(513, 777, 7), (640, 640)),
    ("3000x17 extreme", lambda: textured(3000, 17, 8), (640, 640)),
    ("odd target", lambda: noise(333, 222, 9), (97, 401)),
]


@pytest.mark.parametrize("name,make,size", RESIZE_CASES, ids=[c[0] for c in RESIZE_CASES])
def test_resize_matches_pillow(tmp_path, name, make, size):
    src = make()
    path = tmp_path / "in.png"
    src.save(path)
    want = np.asarray(src.resize(size, Image.BILINEAR)).astype(np.int16)
    got = rust_rgb(tmp_path, path, *size)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    exact = float((diff == 0).mean())
    print(f"{name}: max abs diff {diff.max()}, exact {exact:.6%}")
    assert diff.max() <= 1, f"{name}: max abs diff {diff.max()}"
    assert exact == 1.0, f"{name}: only {exact:.6%} of values bit-exact"


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_real_photo_decode_and_resize_match_pillow(tmp_path, fmt):
    """The D-FINE preprocessing path on a real photo: decode, resize to 640x640."""
    if not CATS.exists():
        pytest.skip(f"{CATS} not available")
    path = CATS
    if fmt == "jpeg":
        path = tmp_path / "cats.jpg"
        with Image.open(CATS) as im:
            im.convert("RGB").save(path, quality=92)
    with Image.open(path) as im:
        src = im.convert("RGB")
    want = np.asarray(src.resize((640, 640), Image.BILINEAR)).astype(np.int16)
    got = rust_rgb(tmp_path, path, 640, 640)
    assert np.array_equal(got, want)


def decode_cases():
    rgb = textured(131, 97, 10)
    rgba = np.dstack([np.asarray(rgb), np.random.default_rng(11).integers(0, 256, (97, 131), dtype=np.uint8)])
    rgba[:10, :10, 3] = 0  # fully transparent corner keeps its colour under convert('RGB')
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=32)
    pal.info["transparency"] = 3
    return [
        # name, image, save kwargs, file suffix, tolerance (levels of 255)
        ("gray png", rgb.convert("L"), {}, ".png", 0),
        ("gray+alpha png", Image.fromarray(rgba[:, :, [0, 3]], "LA"), {}, ".png", 0),
        ("rgba png", Image.fromarray(rgba, "RGBA"), {}, ".png", 0),
        ("palette png", pal, {"transparency": 3}, ".png", 0),
        ("gray jpeg", rgb.convert("L"), {"quality": 90}, ".jpg", 0),
        ("cmyk jpeg", rgb.convert("CMYK"), {"quality": 90}, ".jpg", 0),
        ("noise cmyk jpeg", noise(64, 48, 12).convert("CMYK"), {"quality": 95}, ".jpg", 0),
        ("lossless webp", rgb, {"lossless": True}, ".webp", 0),
        ("lossy webp", rgb, {"quality": 80}, ".webp", 1),
        # Colour JPEGs: the crate's decoder reproduces libjpeg-turbo (islow IDCT, fancy
        # upsampling, YCbCr tables), so these are bit-exact.
        ("jpeg 4:2:0", rgb, {"quality": 90}, ".jpg", 0),
        ("jpeg 4:2:2", rgb, {"quality": 90, "subsampling": 1}, ".jpg", 0),
        ("jpeg 4:4:4", rgb, {"quality": 90, "subsampling": 0}, ".jpg", 0),
        ("jpeg q100", noise(77, 45, 14), {"quality": 100}, ".jpg", 0),
        ("jpeg optimized", rgb, {"quality": 75, "optimize": True}, ".jpg", 0),
        ("jpeg progressive", rgb, {"quality": 85, "progressive": True}, ".jpg", 0),
        ("jpeg progressive 4:4:4", rgb, {"quality": 85, "progressive": True, "subsampling": 0}, ".jpg", 0),
        ("jpeg restarts", rgb, {"quality": 85, "restart_marker_blocks": 3}, ".jpg", 0),
        ("jpeg progressive restarts", rgb, {"quality": 85, "progressive": True, "restart_marker_rows": 1}, ".jpg", 0),
        ("jpeg 16-bit qtables", rgb, {"qtables": [[300] * 64, [400] * 64]}, ".jpg", 0),
        ("jpeg 1x1", textured(1, 1, 15), {"quality": 90}, ".jpg", 0),
        ("jpeg 3x3", textured(3, 3, 16), {"quality": 90}, ".jpg", 0),
        ("jpeg 17x9", textured(17, 9, 17), {"quality": 90}, ".jpg", 0),
        ("jpeg 641x479", textured(641, 479, 18), {"quality": 90}, ".jpg", 0),
    ]


@pytest.mark.parametrize("name,img,kwargs,suffix,tol", decode_cases(), ids=[c[0] for c in decode_cases()])
def test_decode_matches_pillow_convert_rgb(tmp_path, name, img, kwargs, suffix, tol):
    path = tmp_path / f"in{suffix}"
    img.save(path, **kwargs)
    with Image.open(path) as im:
        want = np.asarray(im.convert("RGB")).astype(np.int16)
    got = rust_rgb(tmp_path, path)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    print(f"{name}: max abs diff {diff.max()}, exact {(diff == 0).mean():.4%}")
    assert diff.max() <= tol, f"{name}: max abs diff {diff.max()} > {tol}"


def test_16bit_png_high_byte(tmp_path):
    """16-bit RGB: PIL keeps the high byte, and so do we. 16-bit gray: PIL clips to 255
    (a quirk we do not copy); we keep the high byte as for RGB."""
    png = pytest.importorskip("png")
    rgb16 = tmp_path / "rgb16.png"
    rows = [[0, 1, 255, 256, 1000, 2000], [40000, 50000, 65535, 65280, 32767, 32768]]
    png.Writer(2, 2, greyscale=False, bitdepth=16).write(rgb16.open("wb"), rows)
    with Image.open(rgb16) as im:
        want = np.asarray(im.convert("RGB")).astype(np.int16)
    assert np.array_equal(rust_rgb(tmp_path, rgb16), want)
    assert np.array_equal(want.reshape(-1), np.array(rows).reshape(-1) >> 8)

    gray16 = tmp_path / "gray16.png"
    values = [[0, 255, 256, 1000], [40000, 65535, 65280, 511]]
    png.Writer(4, 2, greyscale=True, bitdepth=16).write(gray16.open("wb"), values)
    got = rust_rgb(tmp_path, gray16)
    for c in range(3):
        assert np.array_equal(got[:, :, c], np.array(values) >> 8)


def test_truncated_jpeg_is_refused_like_pillow(tmp_path):
    path = tmp_path / "t.jpg"
    textured(64, 64, 13).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):
        with Image.open(path) as im:
            im.load()
    r = subprocess.run([str(BIN), str(path), str(tmp_path / "o.png"), "0", "0"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "truncated" in r.stderr and "t.jpg" in r.stderr
