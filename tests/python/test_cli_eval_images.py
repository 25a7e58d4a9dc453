"""`aperture eval --images --model` end to end with a D-FINE-X-shaped model (seeded
random weights rebuilt from tests/fixtures/dfine/x/manifest.json).

The ground truth is the model's own top detections taken from `aperture detect`. The
detections `eval` makes must be exactly those of `detect` (file names -> image ids,
labels -> COCO category ids, xyxy -> xywh), pycocotools must score them exactly as
`eval` does, and the score must be near 1 (random weights give some degenerate boxes,
e.g. of negative width, which COCO's area ranges leave out)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("APERTURE_BIN", str(ROOT / "target" / "debug" / "aperture"))
X = ROOT / "tests" / "fixtures" / "dfine" / "x"
CATS = ROOT.parent / "shared" / "data" / "images" / "000000039769.png"
TOP = 20


def aperture(*args):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{args}:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def x_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("dfine_x")
    subprocess.run([sys.executable, str(ROOT / "tools" / "dfine_golden.py"), str(d / "model.safetensors"),
                    "--materialize", str(X / "manifest.json")], check=True, capture_output=True, timeout=300)
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(X / f, d / f)
    return d


def test_eval_images_scores_the_models_own_detections_perfectly(tmp_path, x_model):
    assert CATS.is_file(), f"missing shared data image {CATS}"
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(CATS, images / "cats.png")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (333, 500, 3), dtype=np.uint8)).save(images / "noise.jpg")

    aperture("detect", images, "--model", x_model, "--threshold", "0", "--json", tmp_path / "det.json")
    det = json.loads((tmp_path / "det.json").read_text())
    ids = {"cats.png": 11, "noise.jpg": 22}
    gt = {"images": [], "annotations": [], "categories": [{"id": i, "name": str(i)} for i in range(1, 91)]}
    for img in det["images"]:
        name = Path(img["file"]).name
        w, h = Image.open(images / name).size
        gt["images"].append({"id": ids[name], "file_name": name, "width": w, "height": h})
        top = sorted(img["detections"], key=lambda d: -d["score"])[:TOP]
        for d in top:
            x0, y0, x1, y1 = d["box"]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": ids[name],
                                      "category_id": d["category_id"], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                      "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    (tmp_path / "gt.json").write_text(json.dumps(gt))

    aperture("eval", "--gt", tmp_path / "gt.json", "--images", images, "--model", x_model,
             "--save-dt", tmp_path / "dt.json", "--json", tmp_path / "stats.json")
    stats = json.loads((tmp_path / "stats.json").read_text())["stats"]
    assert stats[0] > 0.99 and stats[1] > 0.99

    made = sorted((d["image_id"], d["category_id"], d["score"], *d["bbox"])
                  for d in json.loads((tmp_path / "dt.json").read_text()))
    expected = sorted((ids[Path(img["file"]).name], d["category_id"], d["score"],
                       d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1])
                      for img in det["images"] for d in img["detections"])
    assert len(made) == len(expected) > 0
    assert np.allclose(np.array(made), np.array(expected), rtol=0, atol=1e-4)

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert np.allclose(ev.stats, stats, atol=1e-9)

    # `aperture report --gt --images`: the true-mAP columns score the same detections
    # against the same ground truth, so they must equal eval's mAP@50 and mAP@50:95.
    aperture("report", "--model", x_model, "--device", "cpu", "--gt", tmp_path / "gt.json",
             "--images", images, "--batches", "1", "--queries", "300", "--iters", "1",
             "--warmup", "0", "--serve-ms", "0", "-o", tmp_path / "report")
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert len(rows) == 1
    assert rows[0]["true_map50"] == pytest.approx(stats[1], abs=1e-9)
    assert rows[0]["true_map"] == pytest.approx(stats[0], abs=1e-9)


def test_eval_images_refuses_a_model_without_80_classes(tmp_path):
    tiny = ROOT / "tests" / "fixtures" / "dfine" / "tiny"
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [],
                              "categories": [{"id": 1, "name": "person"}]}))
    p = subprocess.run([BIN, "eval", "--gt", str(gt), "--images", str(tmp_path), "--model", str(tiny)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "80 COCO classes" in p.stderr
