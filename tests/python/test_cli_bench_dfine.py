"""`aperture bench` on a D-FINE model on the CPU: the architecture comes from the
folder's config.json, the input size from its preprocessor_config.json, and the JSON has
the Restormer rows' layout plus the logits/boxes errors behind `rel_l2_vs_fp32`, which
`aperture report --from` reads back."""
import json
import math
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("APERTURE_BIN", str(ROOT / "target" / "debug" / "aperture"))
DFINE = ROOT / "tests" / "fixtures" / "dfine" / "tiny"
ROW_KEYS = {"engine", "precision", "batch", "images_per_s", "p50_ms", "p99_ms", "peak_gib", "rel_l2_vs_fp32"}
DFINE_KEYS = {"rel_l2_logits", "rel_l2_boxes", "rows_moved"}


def run(*args, cwd=ROOT):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    p = run("bench", "--model", DFINE, "--device", "cpu", "--iters", "2", "--warmup", "1",
            "--json", "--out", out, *extra)
    assert p.returncode == 0, p.stderr
    assert "panicked" not in p.stderr
    printed = json.loads(p.stdout)
    written = json.loads(out.read_text())
    assert printed == written
    return out, written


def test_cpu_sweep_rows_have_the_restormer_layout_and_accuracy(tmp_path):
    _, doc = bench(tmp_path, "--batch", "1,2", "--precision", "fp32")
    assert set(doc) == {"device", "date", "model", "rows"}
    size = json.loads((DFINE / "preprocessor_config.json").read_text())["size"]
    assert doc["model"] == f"dfine (tiny) {size['height']}x{size['width']}"
    rows = doc["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) == ROW_KEYS | DFINE_KEYS, set(r)
        assert r["engine"] == "aperture" and r["precision"] == "fp32"
        assert r["images_per_s"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        # Throughput is batch / mean latency, and the mean lies within [min, max].
        per_batch_ms = 1000.0 * r["batch"] / r["images_per_s"]
        assert per_batch_ms <= r["p99_ms"] * 1.0001
        # The CPU against its own batch-1 output: the same numbers up to summation order.
        for key in ("rel_l2_vs_fp32", "rel_l2_logits", "rel_l2_boxes"):
            assert math.isfinite(r[key]) and 0 <= r[key] < 1e-5, (key, r[key])
        assert r["rel_l2_vs_fp32"] == max(r["rel_l2_logits"], r["rel_l2_boxes"])
        assert r["rows_moved"] == 0
        assert r["peak_gib"] == 0  # no memory counter on the CPU


def test_size_and_queries_options(tmp_path):
    _, doc = bench(tmp_path, "--batch", "1", "--size", "64", "--width", "96", "--queries", "7")
    num_queries = json.loads((DFINE / "config.json").read_text())["num_queries"]
    assert doc["model"] == f"dfine (tiny) 64x96, 7 of {num_queries} queries"
    [row] = doc["rows"]
    assert row["rel_l2_vs_fp32"] < 1e-5


def test_report_from_reads_the_bench_json(tmp_path):
    out, doc = bench(tmp_path, "--batch", "1")
    p = run("report", "--from", out, "-o", tmp_path / "report")
    assert p.returncode == 0, p.stderr
    rendered = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rendered["model"] == doc["model"]
    [got], [want] = rendered["rows"], doc["rows"]
    for key in ROW_KEYS:
        assert got[key] == want[key], key


def test_table_and_refusals():
    p = run("bench", "--model", DFINE, "--device", "cpu", "--batch", "1,3", "--iters", "1", "--warmup", "0")
    assert p.returncode == 0, p.stderr
    lines = [l.split() for l in p.stdout.splitlines() if l.startswith("aperture")]
    assert [int(l[2]) for l in lines] == [1, 3]
    assert all("rel_l2_logits" in l and "rel_l2_boxes" in l for l in lines)

    p = run("bench", "--model", DFINE, "--device", "cpu", "--check")
    assert p.returncode != 0 and "check-dfine" in p.stderr, p.stderr
    p = run("bench", "--model", DFINE, "--device", "cpu", "--batch", "1", "--queries", "1000")
    assert p.returncode != 0 and "queries" in p.stderr and "panicked" not in p.stderr, p.stderr
