"""`aperture report` on the CPU: the measuring run on tiny fixtures writes README.md,
report.json and readable SVG/PNG plots whose numbers agree with each other; `--from`
renders the committed H100 results without changing a number; bad input fails with
a message that says what to fix."""
import json
import math
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("APERTURE_BIN", str(ROOT / "target" / "debug" / "aperture"))
RESTORMER = ROOT / "tests" / "fixtures" / "restormer" / "withbias"
DFINE = ROOT / "tests" / "fixtures" / "dfine" / "tiny"
H100_JSON = ROOT / "bench" / "results" / "h100-80gb-hbm3-restormer.json"
H100_PROFILE = ROOT / "bench" / "logs" / "h100-profile.log"
RESULTS = ROOT / "bench" / "results"

# Markdown column -> (JSON key, decimals); None decimals: scientific with 2 digits.
NUMERIC = {
    "images/s": ("images_per_s", 1),
    "mean ms": ("mean_ms", 2),
    "std ms": ("std_ms", 2),
    "p50 ms": ("p50_ms", 2),
    "p95 ms": ("p95_ms", 2),
    "p99 ms": ("p99_ms", 2),
    "peak GiB": ("peak_gib", 2),
    "rel L1 vs fp32": ("rel_l1_vs_fp32", None),
    "rel L2 vs fp32": ("rel_l2_vs_fp32", None),
    "mAP50 vs fp32": ("map50_vs_fp32", 3),
    "mAP vs fp32": ("map_vs_fp32", 3),
}


def run(*args, cwd=ROOT):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def results_table(readme):
    """The first markdown table after '## Results' as a list of {column: cell}."""
    lines = readme.split("## Results", 1)[1].splitlines()
    end = next((i for i, l in enumerate(lines) if l.startswith("## ")), len(lines))
    table = [l for l in lines[:end] if l.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in l.strip("|").split("|")))) for l in table[2:]]


def assert_cell_matches(cell, value, decimals):
    if value is None:
        assert cell == "-", cell
        return
    if decimals is None:
        # "2.19e-3": two decimals in the mantissa.
        got = float(cell)
        assert abs(got - value) <= 0.0051 * abs(value) + 1e-300, (cell, value)
    else:
        assert abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-12, (cell, value)


def check_table_against_json(readme, rows):
    table = results_table(readme)
    assert len(table) == len(rows)
    for cells, row in zip(table, rows):
        assert cells["engine"] == row["engine"]
        assert cells["precision"] == row["precision"]
        assert int(cells["batch"]) == row["batch"]
        for col, (key, decimals) in NUMERIC.items():
            if col in cells:
                assert_cell_matches(cells[col], row.get(key), decimals)


def check_plot(out, stem):
    svg = ET.parse(out / f"{stem}.svg").getroot()
    assert svg.tag.endswith("svg")
    w, h = int(svg.get("width")), int(svg.get("height"))
    img = Image.open(out / f"{stem}.png")
    img.load()
    # Both renderings lay out the same chart: same canvas.
    assert img.size == (w, h)
    assert h == 600 and w >= 900
    rgb = img.convert("RGB")
    colours = {c for _, c in rgb.getcolors(maxcolors=1 << 24)}
    assert (255, 255, 255) in colours and (0, 0, 0) in colours
    # The first series colour (lines and markers) is drawn.
    assert (31, 119, 180) in colours
    texts = [t.text for t in svg.iter() if t.tag.endswith("text")]
    assert any(texts)
    return texts


def test_restormer_cpu_report(tmp_path):
    out = tmp_path / "report"
    p = run("report", "--model", RESTORMER, "--device", "cpu", "--precisions", "fp32",
            "--batches", "1,2", "--size", "16", "--iters", "2", "--warmup", "1", "--serve-ms", "300", "-o", out)
    assert p.returncode == 0, p.stderr
    readme = (out / "README.md").read_text()
    doc = json.loads((out / "report.json").read_text())
    rows = doc["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [
        ("eager", 1), ("eager", 2), ("served, HTTP, 2 clients", 1), ("served, HTTP, 2 clients", 2)]
    assert all((r["engine"], r["precision"]) == ("aperture", "fp32") for r in rows)
    for r in rows[2:]:
        # Through `aperture serve` on loopback: a round trip per request.
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
    for r in rows[:2]:
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert math.isclose(r["images_per_s"], r["batch"] / (r["mean_ms"] / 1e3), rel_tol=1e-9)
        # fp32 against itself: identical output.
        assert r["rel_l2_vs_fp32"] == 0.0 and r["psnr_db_vs_fp32"] == "inf"
    check_table_against_json(readme, rows)
    assert "CPU" in doc["device"] and "CPU" in readme
    assert "aperture report --model" in readme
    for stem in ("throughput", "latency"):
        texts = check_plot(out, stem)
        assert "aperture fp32 (eager)" in texts or "aperture fp32 (eager) p50" in texts
        assert f"({stem}.png)" in readme
    assert "roofline: not drawn" in readme


def test_dfine_cpu_report_has_query_variants_and_self_consistency(tmp_path):
    out = tmp_path / "report"
    p = run("report", "--model", DFINE, "--device", "cpu", "--batches", "1", "--queries", "300,10",
            "--iters", "1", "--warmup", "0", "--serve-ms", "0", "-o", out)
    assert p.returncode == 0, p.stderr
    doc = json.loads((out / "report.json").read_text())
    variants = [r["variant"] for r in doc["rows"]]
    assert variants == ["20 queries, eager", "10 queries, eager"]
    full, fewer = doc["rows"]
    # The reference scored against itself is perfect; fewer queries cannot beat it.
    assert full["map50_vs_fp32"] == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= fewer["map_vs_fp32"] <= fewer["map50_vs_fp32"] <= 1.0
    assert any("300 queries skipped" in n for n in doc["notes"])
    check_table_against_json((out / "README.md").read_text(), doc["rows"])


def test_from_reproduces_the_h100_numbers(tmp_path):
    out = tmp_path / "h100"
    p = run("report", "--from", H100_JSON, "--profile-log", H100_PROFILE, "-o", out)
    assert p.returncode == 0, p.stderr
    source = json.loads(H100_JSON.read_text())
    doc = json.loads((out / "report.json").read_text())
    assert doc["device"] == source["device"] and doc["date"] == source["date"]
    assert len(doc["rows"]) == len(source["rows"])
    for got, want in zip(doc["rows"], source["rows"]):
        for key, value in want.items():
            assert got[key] == value, (key, got[key], value)
    readme = (out / "README.md").read_text()
    check_table_against_json(readme, source["rows"])
    assert "rendered from" in readme and "tools/gpu-check.sh" in readme
    for stem in ("throughput", "latency", "roofline-1", "roofline-2"):
        check_plot(out, stem)


@pytest.mark.parametrize("model", ["restormer", "dfine"])
def test_committed_h100_report_is_the_rendering_of_its_measurements(tmp_path, model):
    # The README's reports: `aperture report` measured on the H100 (report.json) plus the
    # PyTorch peers measured with the same weights, rendered with --from.
    measured_json = RESULTS / f"h100-80gb-hbm3-{model}-report.json"
    peers_json = RESULTS / f"h100-80gb-hbm3-{model}-peers.json"
    out = tmp_path / "h100"
    p = run("report", "--from", measured_json, peers_json, "-o", out)
    assert p.returncode == 0, p.stderr
    measured = json.loads(measured_json.read_text())
    peers = json.loads(peers_json.read_text())
    doc = json.loads((out / "report.json").read_text())
    timed_peers = [r for r in peers["rows"] if "images_per_s" in r]
    assert len(doc["rows"]) == len(measured["rows"]) + len(timed_peers)
    assert {r["engine"] for r in doc["rows"]} == {"aperture", "torch-eager", "torch-compile"}
    # Both torch.compile modes are peers.
    assert {r["variant"] for r in doc["rows"] if r["engine"] == "torch-compile"} == {
        "reduce-overhead", "default"}
    assert doc["profiles"] == measured["profiles"] and doc["profiles"]
    check_table_against_json((out / "README.md").read_text(), doc["rows"])
    for stem in ("throughput", "latency", "roofline-1"):
        check_plot(out, stem)
    committed = json.loads((ROOT / "bench" / "report" / f"h100-{model}" / "report.json").read_text())
    assert committed["rows"] == doc["rows"] and committed["profiles"] == doc["profiles"]


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/model", "--device", "cpu"], "no such file"),
    (["--model", RESTORMER, "--device", "cpu", "--precisions", "fp8"], "unknown precision 'fp8'"),
    (["--model", RESTORMER, "--device", "cpu", "--batches", ""], "at least one positive batch size"),
    (["--model", RESTORMER, "--device", "cpu", "--batches", "1,0"], "'0' is not a positive batch size"),
    (["--from", "no/such.json"], "cannot read"),
    (["--model", RESTORMER, "--device", "tpu"], "unknown --device 'tpu'"),
])
def test_bad_input_is_reported(tmp_path, args, message):
    p = run("report", *args, "-o", tmp_path / "out")
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert "panicked" not in p.stderr


def test_cuda_without_a_gpu_says_so(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU driver is present")
    p = run("report", "--model", RESTORMER, "--device", "cuda", "-o", tmp_path / "out")
    assert p.returncode != 0
    assert "--device cuda:" in p.stderr and "panicked" not in p.stderr
    assert not (tmp_path / "out" / "README.md").exists()
