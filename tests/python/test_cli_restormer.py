"""The `aperture` binary on Restormer fixtures: raw-tensor parity, enhancement of real
image files (odd sizes, 16-bit PNG, folders) and clear errors on bad input."""
import os
import subprocess
from pathlib import Path

import numpy as np
import png  # pypng: writes and reads 16-bit PNG
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("APERTURE_BIN", str(ROOT / "target" / "debug" / "aperture"))
FIX = ROOT / "tests" / "fixtures" / "restormer"
MODEL = FIX / "withbias" / "model.safetensors"


def aperture(*args, check=True):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"aperture {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


def rel_l2(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("case", ["withbias", "biasfree", "conv_bias"])
def test_run_matches_pytorch_output(tmp_path, case):
    out = tmp_path / "out.safetensors"
    aperture("run", "--model", FIX / case, "--input", FIX / case / "io.safetensors", "--input-name", "x",
             "--output", out, "--device", "cpu")
    ref = load_file(FIX / case / "io.safetensors")
    got = load_file(out)
    assert set(got) == {"y"}
    assert got["y"].shape == ref["y"].shape
    assert rel_l2(got["y"], ref["y"]) <= 1e-5


def test_run_takes_single_tensor_whatever_its_name(tmp_path):
    x = load_file(FIX / "withbias" / "io.safetensors")["x"][:1]
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"image": x}, inp)
    aperture("run", "--model", MODEL, "--input", inp, "--output", out)
    assert load_file(out)["y"].shape == (1, 3, 64, 64)


def test_run_rejects_sizes_not_multiple_of_8(tmp_path):
    inp = tmp_path / "in.safetensors"
    save_file({"x": np.random.rand(1, 3, 60, 64).astype(np.float32)}, inp)
    p = aperture("run", "--model", MODEL, "--input", inp, "--output", tmp_path / "o.safetensors", check=False)
    assert p.returncode != 0
    assert "multiples of 8" in p.stderr


def _write_image(path, h, w, bits=8, seed=0):
    rng = np.random.default_rng(seed)
    if bits == 16:
        arr = rng.integers(0, 65536, size=(h, w, 3), dtype=np.uint16)
        png.from_array(arr.reshape(h, w * 3), "RGB;16").save(str(path))
    else:
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)


def test_enhance_odd_size_keeps_size_and_matches_run(tmp_path):
    src, dst = tmp_path / "odd.png", tmp_path / "odd_out.png"
    _write_image(src, 37, 53)
    aperture("enhance", src, "-o", dst, "--model", MODEL, "--device", "cpu")
    out = np.asarray(Image.open(dst))
    assert out.shape == (37, 53, 3)
    # The same computation through `run` on the reflection-padded tensor, cropped back.
    x = np.asarray(Image.open(src)).astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    padded = np.pad(x, ((0, 0), (0, 0), (0, 3), (0, 3)), mode="reflect")
    inp, o = tmp_path / "in.safetensors", tmp_path / "o.safetensors"
    save_file({"x": np.ascontiguousarray(padded)}, inp)
    aperture("run", "--model", MODEL, "--input", inp, "--output", o)
    y = load_file(o)["y"][0, :, :37, :53].transpose(1, 2, 0)
    expected = np.clip(np.round(y * 255.0), 0, 255)
    assert np.abs(out.astype(np.int32) - expected.astype(np.int32)).max() <= 1


def test_enhance_16_bit_png_stays_16_bit(tmp_path):
    src, dst = tmp_path / "deep.png", tmp_path / "deep_out.png"
    _write_image(src, 24, 32, bits=16)
    aperture("enhance", src, "-o", dst, "--model", MODEL)
    w, h, rows, info = png.Reader(filename=str(dst)).read()
    assert (w, h) == (32, 24) and info["bitdepth"] == 16


def test_enhance_folder_reports_bad_files_and_keeps_going(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _write_image(src / "good.png", 16, 16)
    Image.fromarray(np.zeros((20, 12, 3), np.uint8)).save(src / "also_good.jpg")
    (src / "text.jpg").write_text("not an image")
    good = (src / "good.png").read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    p = aperture("enhance", src, "-o", dst, "--model", MODEL, check=False)
    assert p.returncode == 1
    assert "text.jpg" in p.stderr and "truncated.png" in p.stderr
    assert sorted(f.name for f in dst.iterdir()) == ["also_good.png", "good.png"]


def test_wrong_shape_and_missing_weights_are_listed(tmp_path):
    w = load_file(MODEL)
    w["latent.0.attn.temperature"] = np.ones((3, 1, 1), np.float32)
    del w["output.weight"]
    d = tmp_path / "broken"
    d.mkdir()
    save_file(w, d / "model.safetensors")
    (d / "config.json").write_text((FIX / "withbias" / "config.json").read_text())
    p = aperture("info", d, check=False)
    assert p.returncode == 0  # info needs only the config
    p = aperture("run", "--model", d, "--input", FIX / "withbias" / "io.safetensors", "--input-name", "x",
                 "--output", tmp_path / "o.safetensors", check=False)
    assert p.returncode != 0
    assert "missing      output.weight" in p.stderr
    assert "latent.0.attn.temperature: expected [8, 1, 1], found [3, 1, 1]" in p.stderr


@pytest.mark.parametrize("content", [b"", b"hello world", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_bad_weight_files_give_clear_errors(tmp_path, content):
    f = tmp_path / "model.safetensors"
    f.write_bytes(content)
    p = aperture("run", "--model", f, "--input", FIX / "withbias" / "io.safetensors", "--output", tmp_path / "o",
                 check=False)
    assert p.returncode == 1
    assert "error:" in p.stderr and "panicked" not in p.stderr


def test_config_of_another_architecture_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(MODEL.read_bytes())
    (d / "config.json").write_text('{"architectures": ["ResNetForImageClassification"], "model_type": "resnet"}')
    p = aperture("run", "--model", d, "--input", FIX / "withbias" / "io.safetensors", "--output", tmp_path / "o",
                 check=False)
    assert p.returncode == 1 and "unsupported architecture" in p.stderr


def test_info_prints_roofline_numbers():
    p = aperture("info", "--size", "512")
    assert "26,126,644" in p.stdout
    assert "619.5 GMAC" in p.stdout


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    p = aperture("run", "--model", MODEL, "--input", FIX / "withbias" / "io.safetensors", "--input-name", "x",
                 "--output", tmp_path / "o.safetensors", "--device", "cuda", check=False)
    if p.returncode == 0:  # a machine with a usable GPU: the output must still match
        ref = load_file(FIX / "withbias" / "io.safetensors")["y"]
        assert rel_l2(load_file(tmp_path / "o.safetensors")["y"], ref) < 1e-2
    else:
        assert "--device cuda" in p.stderr and "panicked" not in p.stderr
