"""`aperture eval` against pycocotools' COCOeval on randomised ground truth and results.

Every set is generated here with a fixed seed, written to temporary files, and evaluated by
both sides from the same files. Both sort detections by score with a stable sort (numpy's
mergesort in pycocotools, Rust's stable sort in aperture), so tied scores resolve to the same
order: results-file order within an image, image-id order across images.

The binary comes from $APERTURE_BIN (default: target/debug/aperture).
"""

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("APERTURE_BIN", REPO / "target" / "debug" / "aperture"))
TOL = 1e-9


def random_box(rng, size_class):
    """A box whose area falls in the small / medium / large range (or straddles them)."""
    lo, hi = {"tiny": (0.5, 6), "small": (4, 32), "medium": (32, 96), "large": (96, 400)}[size_class]
    w = float(rng.uniform(lo, hi))
    h = float(rng.uniform(lo, hi))
    x = float(rng.uniform(0, 600))
    y = float(rng.uniform(0, 600))
    return [x, y, w, h]


def jitter(rng, box, amount):
    x, y, w, h = box
    return [
        x + float(rng.normal(0, amount * w)),
        y + float(rng.normal(0, amount * h)),
        max(0.5, w * float(rng.uniform(1 - amount, 1 + amount))),
        max(0.5, h * float(rng.uniform(1 - amount, 1 + amount))),
    ]


def make_dataset(seed, num_images=40, first_ann_id=1, duplicate_ids=False):
    rng = np.random.default_rng(seed)
    # Non-contiguous category ids; the last two never get ground truth.
    cat_ids = [1, 3, 7, 18, 44, 90]
    cats_with_gt = cat_ids[:4]
    image_ids = [int(i) for i in rng.choice(np.arange(1, 10_000), num_images, replace=False)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 640} for i in image_ids]
    sizes = ["tiny", "small", "medium", "large"]

    annotations, results = [], []
    ann_id = first_ann_id
    for n, img in enumerate(image_ids):
        empty_gt = n % 9 == 4
        no_dets = n % 11 == 6
        gts = []
        for _ in range(0 if empty_gt else int(rng.integers(0, 9))):
            cat = int(rng.choice(cats_with_gt))
            box = random_box(rng, sizes[int(rng.integers(0, 4))])
            crowd = int(rng.random() < 0.1)
            if crowd:
                box[2] *= 3
                box[3] *= 3
            # The mask area of a real annotation is below its box area; sometimes equal.
            area = box[2] * box[3] * (1.0 if rng.random() < 0.3 else float(rng.uniform(0.5, 1.0)))
            annotations.append(
                {"id": ann_id, "image_id": img, "category_id": cat, "bbox": box,
                 "area": area, "iscrowd": crowd, "segmentation": []}
            )
            gts.append((cat, box))
            ann_id += 1
        if no_dets:
            continue
        dets = []
        for cat, box in gts:
            for _ in range(int(rng.integers(0, 4))):
                wrong = rng.random() < 0.1
                amount = float(rng.choice([0.02, 0.05, 0.1, 0.2]))
                dets.append((int(rng.choice(cat_ids)) if wrong else cat, jitter(rng, box, amount), 0.3))
        for _ in range(int(rng.integers(0, 6))):
            # False positives, also for categories absent from the image or from the dataset.
            dets.append((int(rng.choice(cat_ids)), random_box(rng, sizes[int(rng.integers(0, 4))]), 0.0))
        if n % 7 == 0:
            # Over 100 detections of one category in one image: maxDets truncation matters.
            cat = int(rng.choice(cats_with_gt))
            base = gts[0][1] if gts else random_box(rng, "medium")
            dets += [(cat, jitter(rng, base, 0.3), 0.0) for _ in range(130)]
        for cat, box, boost in dets:
            # Two-decimal scores make many ties; detections near a box tend to score higher.
            score = round(min(1.0, float(rng.uniform(0.01, 0.7)) + boost), 2)
            results.append({"image_id": img, "category_id": cat, "bbox": box, "score": score})
    # A category the ground truth does not list: both sides must ignore it.
    results.append({"image_id": image_ids[0], "category_id": 555, "bbox": [1.0, 2.0, 30.0, 40.0], "score": 0.5})
    rng.shuffle(results)
    if duplicate_ids:
        # Reused annotation ids: pycocotools' loadAnns resolves an id to its last annotation.
        for i in range(0, len(annotations) - 10, 10):
            annotations[i + 7]["id"] = annotations[i]["id"]
    gt = {
        "images": images[::-1],  # not sorted by id: evaluation order must not depend on it
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in cat_ids],
    }
    return gt, results


def pycocotools_eval(gt_path, dt_path):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(dt_path))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_cat = {}
    for k, cat_id in enumerate(ev.params.catIds):
        def mean(p):
            p = p[p > -1]
            return float(np.mean(p)) if p.size else None
        per_cat[cat_id] = (mean(ev.eval["precision"][:, :, k, 0, -1]), mean(ev.eval["precision"][0, :, k, 0, -1]))
    return np.array(ev.stats, dtype=np.float64), per_cat


def aperture_eval(gt_path, dt_path, out_path):
    proc = subprocess.run(
        [str(BIN), "eval", "--gt", str(gt_path), "--dt", str(dt_path), "--json", str(out_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out_path.read_text())
    return proc.stdout, report


@pytest.fixture(scope="module", autouse=True)
def binary():
    if not BIN.exists():
        pytest.fail(f"aperture binary not found at {BIN}: build it (cargo build -p aperture-cli) or set APERTURE_BIN")


@pytest.mark.parametrize(
    "seed,num_images,first_ann_id,duplicate_ids",
    [(0, 40, 1, False), (1, 60, 1, False), (2, 25, 1, False), (3, 80, 0, False), (4, 50, 1, False), (5, 40, 1, True)],
)
def test_matches_pycocotools(tmp_path, seed, num_images, first_ann_id, duplicate_ids):
    gt, results = make_dataset(seed, num_images, first_ann_id, duplicate_ids)
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(results))

    expected, expected_per_cat = pycocotools_eval(gt_path, dt_path)
    stdout, report = aperture_eval(gt_path, dt_path, tmp_path / "out.json")

    got = np.array(report["stats"], dtype=np.float64)
    assert got.shape == (12,)
    diff = np.abs(got - expected)
    assert diff.max() <= TOL, f"seed {seed}: stats differ\n aperture    {got}\n pycocotools {expected}"
    # The sets must exercise something: real AP values, not all -1.
    assert 0.0 < expected[0] < 1.0

    per_cat = {c["category_id"]: (c["ap"], c["ap50"]) for c in report["per_category"]}
    assert set(per_cat) == set(expected_per_cat)
    for cat_id, (ap, ap50) in expected_per_cat.items():
        got_ap, got_ap50 = per_cat[cat_id]
        for name, e, g in (("AP", ap, got_ap), ("AP50", ap50, got_ap50)):
            if e is None:
                assert g is None, f"category {cat_id} {name}: pycocotools has none, aperture {g}"
            else:
                assert g is not None and abs(g - e) <= TOL, f"category {cat_id} {name}: {g} vs {e}"

    # The printed summary is pycocotools' format with its rounding.
    lines = [l for l in stdout.splitlines() if l.startswith(" Average")]
    assert len(lines) == 12
    for line, value in zip(lines, expected):
        assert line.endswith(f"= {value:0.3f}"), line


def run_fail(tmp_path, gt_obj, dt_text):
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(gt_obj if isinstance(gt_obj, str) else json.dumps(gt_obj))
    dt_path.write_text(dt_text)
    proc = subprocess.run([str(BIN), "eval", "--gt", str(gt_path), "--dt", str(dt_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "panicked" not in proc.stderr
    return proc.stderr


def test_bad_inputs_give_clear_errors(tmp_path):
    gt, _ = make_dataset(0, 5)
    good_det = {"image_id": gt["images"][0]["id"], "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.3}
    err = run_fail(tmp_path, gt, json.dumps([dict(good_det, image_id=123456)]))
    assert "123456" in err and "not among the ground-truth images" in err
    assert "no detections" in run_fail(tmp_path, gt, "[]")
    assert "JSON" in run_fail(tmp_path, gt, "[{\"image_id\": 1,")
    assert "JSON array" in run_fail(tmp_path, gt, "{\"annotations\": []}")
    no_score = {k: v for k, v in good_det.items() if k != "score"}
    assert "`score`" in run_fail(tmp_path, gt, json.dumps([no_score]))
    assert "`bbox`" in run_fail(tmp_path, gt, json.dumps([dict(good_det, bbox=[1, 2, 3])]))
    bad_gt = json.loads(json.dumps(gt))
    del bad_gt["annotations"][0]["area"]
    assert "`area`" in run_fail(tmp_path, bad_gt, json.dumps([good_det]))
    assert "JSON" in run_fail(tmp_path, "not json", json.dumps([good_det]))
