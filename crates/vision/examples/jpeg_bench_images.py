"""Write the JPEGs `jpeg_bench` times, plus Pillow's decode of each as raw RGB.

    python3 crates/vision/examples/jpeg_bench_images.py OUT_DIR

For every `NAME.jpg` it writes `NAME.rgb` (`Image.open(..).convert('RGB')` bytes,
what the crate's decoder must reproduce exactly). Content: the COCO cats photo
from `../shared/data` when present (scaled to 1920x1080 with added grain so the
large files are not unrealistically smooth), else a synthetic textured image.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
CATS = REPO.parent / "shared" / "data" / "images" / "000000039769.png"


def photo(w, h, seed):
    rng = np.random.default_rng(seed)
    if CATS.exists():
        with Image.open(CATS) as im:
            base = np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC)).astype(np.int32)
    else:
        x = np.linspace(0, 255, w)[None, :, None]
        y = np.linspace(0, 255, h)[:, None, None]
        base = (x + y + np.zeros((h, w, 3))) / 2
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for w, h in [(640, 480), (1920, 1080)]:
        img = photo(w, h, w)
        for sub, sub_name in [(2, "420"), (0, "444")]:
            for q in [75, 95]:
                cases.append((f"{w}x{h}_{sub_name}_q{q}", img, {"quality": q, "subsampling": sub}))
    cases.append(("640x480_420_q90_progressive", photo(640, 480, 1), {"quality": 90, "progressive": True}))
    for name, img, kwargs in cases:
        path = out / f"{name}.jpg"
        img.save(path, **kwargs)
        with Image.open(path) as im:
            (out / f"{name}.rgb").write_bytes(im.convert("RGB").tobytes())
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
