"""tools/dfine_report.py: check-dfine JSON + PyTorch peers -> results JSON/markdown."""
import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "dfine_report.py"


def test_graph_rows_and_peers_become_results(tmp_path):
    check = {"model": {
        "accuracy": [
            {"engine": "aperture-cuda", "against": "transformers-fp32", "precision": "fp16", "rel_l2_logits": 1.2e-3},
            {"engine": "aperture-cuda", "against": "cpu", "precision": "fp16", "rel_l2_logits": 9.9},
        ],
        "timings": [
            {"precision": "fp16", "batch": 1, "mode": "eager", "p50_ms": 10.0, "images_per_s": 100.0, "peak_gib": 1.0},
            {"precision": "fp16", "batch": 32, "mode": "graph", "p50_ms": 32.0, "p99_ms": 33.0,
             "images_per_s": 1000.0, "peak_gib": 5.0},
            # Older files listed post-processing checks among the timings.
            {"case": "model outputs (graph)", "precision": "fp16", "pass": True},
        ],
    }}
    peers = {"rows": [
        {"engine": "torch-compile", "precision": "fp16", "batch": 32, "p50_ms": 64.0, "images_per_s": 500.0},
        {"engine": "torch-eager", "precision": "fp16", "batch": 32, "matched_rel_l2_logits": 2e-3},
    ]}
    (tmp_path / "check.json").write_text(json.dumps(check))
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(TOOL), str(tmp_path / "check.json"), str(tmp_path / "peers.json"),
                    "--device", "NVIDIA H100 80GB HBM3", "--date", "2026-11-24 15:00 UTC", "--out-dir", str(out)],
                   check=True, capture_output=True)
    doc = json.loads((out / "h100-80gb-hbm3-dfine.json").read_text())
    rows = doc["rows"]
    assert [(r["engine"], r["batch"]) for r in rows] == [("aperture", 32), ("torch-compile", 32)]
    assert rows[0]["images_per_s"] == 1000.0 and rows[0]["rel_l2_vs_fp32"] == 1.2e-3
    md = (out / "h100-80gb-hbm3-dfine.md").read_text()
    # aperture's batch-32 row against torch.compile's at the same batch: 1000 / 500.
    assert "| aperture | fp16 | 32 | 1000.0 | 32.00 | 33.00 | 5.00 | 1.20e-03 | 2.00 |" in md


def test_command_and_notes_are_written_under_the_table(tmp_path):
    check = {"model": {"accuracy": [], "timings": [
        {"precision": "fp16", "batch": 1, "mode": "graph", "p50_ms": 3.0, "p99_ms": 3.1,
         "images_per_s": 333.0, "peak_gib": 1.0}]}}
    (tmp_path / "check.json").write_text(json.dumps(check))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(TOOL), str(tmp_path / "check.json"), "--device", "NVIDIA H100 80GB HBM3",
                    "--out-dir", str(out), "--command", "`aperture check-dfine` alone",
                    "--note", "first note", "--note", "second note"], check=True, capture_output=True)
    md = (out / "h100-80gb-hbm3-dfine.md").read_text()
    assert "- command: `aperture check-dfine` alone" in md
    assert md.rstrip().endswith("- first note\n- second note")


def test_bench_rows_with_pixels_in_are_compared_with_torch_compile(tmp_path):
    def bench(p50, ips):
        return {"device": "x", "model": "dfine_x", "rows": [
            {"engine": "aperture", "precision": "fp16", "batch": 32, "p50_ms": p50, "p99_ms": p50 + 1,
             "images_per_s": ips, "peak_gib": 4.4, "rel_l2_vs_fp32": 1.2e-3},
            {"engine": "torch-eager", "precision": "fp16", "batch": 32, "p50_ms": 1.0, "images_per_s": 1.0}]}
    (tmp_path / "fwd.json").write_text(json.dumps(bench(26.0, 1200.0)))
    (tmp_path / "pre.json").write_text(json.dumps(bench(27.0, 1150.0)))
    peers = {"rows": [{"engine": "torch-compile", "precision": "fp16", "batch": 32, "p50_ms": 54.0,
                       "images_per_s": 600.0}]}
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(TOOL), str(tmp_path / "fwd.json"), str(tmp_path / "peers.json"),
                    "--pre-post", str(tmp_path / "pre.json"), "--device", "NVIDIA H100 80GB HBM3",
                    "--date", "2026-11-24 23:30 UTC", "--out-dir", str(out)], check=True, capture_output=True)
    rows = json.loads((out / "h100-80gb-hbm3-dfine.json").read_text())["rows"]
    # Only aperture's own rows are taken from the bench files.
    assert [(r["engine"], r["images_per_s"]) for r in rows] == [
        ("aperture", 1200.0), ("aperture-pixels", 1150.0), ("torch-compile", 600.0)]
    md = (out / "h100-80gb-hbm3-dfine.md").read_text()
    assert "| aperture | fp16 | 32 | 1200.0 | 26.00 | 27.00 | 4.40 | 1.20e-03 | 2.00 |" in md
    assert "| aperture-pixels | fp16 | 32 | 1150.0 | 27.00 | 28.00 | 4.40 | 1.20e-03 | 1.92 |" in md
    assert "- aperture-pixels: the same graph from 8-bit pixels" in md
