"""`aperture detect` on the tiny D-FINE fixture: the whole pipeline (decode, PIL-exact
resize, rescale, model, post-processing, label names) against an independent Python
peer (Pillow resize + numpy transcription of transformers' post_process_object_detection
on the raw outputs of `aperture run`), folders with odd images, and clear errors."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("APERTURE_BIN", str(ROOT / "target" / "debug" / "aperture"))
TINY = ROOT / "tests" / "fixtures" / "dfine" / "tiny"


def aperture(*args, check=True):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"aperture {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


def hf_post_process(logits, boxes, threshold, size):
    """numpy transcription of RTDetrImageProcessor.post_process_object_detection."""
    h, w = size
    cx, cy, bw, bh = np.moveaxis(boxes.astype(np.float64), -1, 0)
    xyxy = np.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], -1) * [w, h, w, h]
    q, c = logits.shape
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64).ravel()))
    order = np.argsort(-scores, kind="stable")[:q]
    keep = order[scores[order] > threshold]
    return scores[keep], keep % c, xyxy[keep // c]


def test_detect_matches_run_and_a_python_peer(tmp_path):
    rng = np.random.default_rng(7)
    src = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 256, size=(77, 123, 3), dtype=np.uint8)).save(src)
    pre = json.loads((TINY / "preprocessor_config.json").read_text())
    th, tw = pre["size"]["height"], pre["size"]["width"]
    resized = np.asarray(Image.open(src).convert("RGB").resize((tw, th), Image.BILINEAR))
    pixels = (resized.astype(np.float64) * pre["rescale_factor"]).astype(np.float32).transpose(2, 0, 1)[None]
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"pixel_values": np.ascontiguousarray(pixels)}, inp)
    aperture("run", "--model", TINY, "--input", inp, "--output", out, "--device", "cpu")
    raw = load_file(out)
    assert raw["logits"].shape == (1, 20, 5) and raw["pred_boxes"].shape == (1, 20, 4)
    scores, labels, boxes = hf_post_process(raw["logits"][0], raw["pred_boxes"][0], 0.3, (77, 123))

    det = tmp_path / "det.json"
    aperture("detect", src, "--model", TINY, "--threshold", "0.3", "--json", det)
    doc = json.loads(det.read_text())
    found = doc["images"][0]["detections"]
    assert len(found) == len(scores) > 0
    names = json.loads((TINY / "config.json").read_text())["id2label"]
    for d, s, lab, b in zip(found, scores, labels, boxes):
        assert d["label"] == lab and d["name"] == names[str(lab)]
        assert abs(d["score"] - s) < 1e-5
        assert np.abs(np.array(d["box"]) - b).max() < 1e-2


def test_folder_with_tiny_and_alpha_images_is_drawn(tmp_path):
    src, drawn = tmp_path / "imgs", tmp_path / "drawn"
    src.mkdir()
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(src / "one_pixel.png")
    rgba = np.random.default_rng(1).integers(0, 256, size=(40, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(src / "alpha.png")
    det = tmp_path / "det.json"
    aperture("detect", src, "--model", TINY, "--threshold", "0.0", "--json", det, "--draw", drawn)
    doc = json.loads(det.read_text())
    assert sorted(Path(i["file"]).name for i in doc["images"]) == ["alpha.png", "one_pixel.png"]
    assert all(len(i["detections"]) == 20 for i in doc["images"])
    assert sorted(f.name for f in drawn.iterdir()) == ["alpha.png", "one_pixel.png"]
    assert Image.open(drawn / "alpha.png").size == (30, 40)
    assert Image.open(drawn / "one_pixel.png").size == (1, 1)


def test_bad_inputs_give_clear_errors(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "detr", "architectures": ["DetrForObjectDetection"]}))
    p = aperture("detect", img, "--model", other, check=False)
    assert p.returncode != 0 and "not D-FINE" in p.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ["config.json", "preprocessor_config.json"]:
        (broken / f).write_text((TINY / f).read_text())
    w = load_file(TINY / "model.safetensors")
    del w["model.enc_score_head.weight"]
    save_file(w, broken / "model.safetensors")
    p = aperture("detect", img, "--model", broken, check=False)
    assert p.returncode != 0 and "missing      model.enc_score_head.weight (expected shape [5, 32])" in p.stderr

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    p = aperture("detect", text, img, "--model", TINY, check=False)
    assert p.returncode != 0 and "notes.png" in p.stderr and "1 of 2 images failed" in p.stderr
