"""`aperture selftest preprocess`: GPU preprocessing against the CPU path. Without a GPU
(CI) it must fail with a clear message, never a panic; with one, every case passes."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("APERTURE_BIN", str(ROOT / "target" / "debug" / "aperture"))


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_selftest_preprocess_passes_or_says_there_is_no_gpu():
    p = run("selftest", "preprocess", "--iters", "0")
    assert "panicked" not in p.stderr
    if p.returncode == 0:
        rows = [l for l in p.stdout.splitlines() if l.endswith(("PASS", "FAIL"))]
        assert len(rows) >= 10 and all(l.endswith("PASS") for l in rows), p.stdout
        assert "passed" in p.stdout.splitlines()[-1]
    else:
        assert "no usable GPU" in p.stderr or "CUDA" in p.stderr, p.stderr


def test_selftest_names_its_checks():
    p = run("selftest", "nonsense")
    assert p.returncode != 0
    assert "preprocess" in p.stderr
