"""`aperture bench` without a GPU: the CPU sweep writes the JSON layout of issue 3, and
asking for CUDA where there is none fails with a clear message instead of a crash."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("APERTURE_BIN", str(ROOT / "target" / "debug" / "aperture"))
MODEL = ROOT / "tests" / "fixtures" / "restormer" / "withbias"
ROW_KEYS = {"engine", "precision", "batch", "images_per_s", "p50_ms", "p99_ms", "peak_gib", "rel_l2_vs_fp32"}


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cpu_sweep_writes_the_issue_layout(tmp_path):
    out = tmp_path / "bench.json"
    p = run("bench", "--model", MODEL, "--device", "cpu", "--size", "16", "--width", "24",
            "--batch", "1,2", "--iters", "3", "--warmup", "1", "--json", "--out", out)
    assert p.returncode == 0, p.stderr
    printed = json.loads(p.stdout)
    written = json.loads(out.read_text())
    assert printed == written
    assert set(written) == {"device", "date", "model", "rows"}
    assert "16x24" in written["model"]
    rows = written["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["engine"] == "aperture" and r["precision"] == "fp32"
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        # Throughput comes from the mean latency, which lies between the fastest and
        # the slowest of three runs; p50 and p99 bracket most of that.
        per_image_ms = 1000.0 * r["batch"] / r["images_per_s"]
        assert 0.2 * r["p50_ms"] <= per_image_ms * 1.0 <= 5 * r["p99_ms"] * r["batch"]


def test_table_lists_every_batch(tmp_path):
    p = run("bench", "--model", MODEL, "--device", "cpu", "--size", "16", "--batch", "1,3", "--iters", "1",
            "--warmup", "0")
    assert p.returncode == 0, p.stderr
    lines = [l.split() for l in p.stdout.splitlines() if l.startswith("aperture")]
    assert [int(l[2]) for l in lines] == [1, 3]


def test_bad_batch_is_refused():
    p = run("bench", "--model", MODEL, "--device", "cpu", "--batch", "0")
    assert p.returncode != 0
    assert "positive" in p.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU driver is present")
def test_cuda_without_a_driver_fails_clearly():
    p = run("bench", "--model", MODEL, "--device", "cuda", "--size", "16", "--batch", "1", "--iters", "1")
    assert p.returncode != 0
    assert "no NVIDIA driver found" in p.stderr, p.stderr
    assert "panicked" not in p.stderr
