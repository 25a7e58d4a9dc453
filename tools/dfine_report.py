"""Combines aperture's timings (`aperture check-dfine --json`, or `aperture bench --out`)
and `tools/dfine_torch_peers.py --out` into bench/results/<gpu>-dfine.{json,md}, in the
Restormer results' layout: {"device", "date", "model", "rows": [{"engine", "precision",
"batch", "images_per_s", "p50_ms", "p99_ms", "peak_gib", "rel_l2_vs_fp32"}]}.

    python3 tools/dfine_report.py CHECK_OR_BENCH.json PEERS.json --device "NVIDIA H100 80GB HBM3" \
        [--pre-post BENCH_PRE.json] --out-dir bench/results

Aperture rows are CUDA-graph replays (device time, pre/post-processing not included);
with check-dfine's JSON rel_l2_vs_fp32 is the logits' relative L2 against transformers
fp32 on the golden input after matching queries by box (top-k order is not stable across
precisions), with `aperture bench`'s against the CPU backend in fp32. `--pre-post` adds
`aperture bench --postprocess --preprocess WxH` rows (engine "aperture-pixels": 8-bit
pixels in, detection rows out, both copies timed).
"""
import argparse
import datetime
import json
import os
import re


def check_rows(check):
    """Graph timings of `aperture check-dfine --json`, errors against transformers fp32."""
    err = {r["precision"]: r["rel_l2_logits"] for r in check["accuracy"]
           if r["engine"] == "aperture-cuda" and r["against"] == "transformers-fp32"}
    rows = []
    for t in check["timings"]:
        # Older check-dfine JSON also listed post-processing checks here (no "mode").
        if t.get("mode") != "graph":
            continue
        rows.append({"engine": "aperture", "precision": t["precision"], "batch": t["batch"],
                     "images_per_s": t["images_per_s"], "p50_ms": t["p50_ms"], "p99_ms": t.get("p99_ms"),
                     "peak_gib": t["peak_gib"], "rel_l2_vs_fp32": err.get(t["precision"])})
    return rows


def bench_rows(bench, engine):
    """Rows of `aperture bench --out` (already in the results layout) under `engine`."""
    keys = ("precision", "batch", "images_per_s", "p50_ms", "p99_ms", "peak_gib", "rel_l2_vs_fp32")
    return [{"engine": engine, **{k: r.get(k) for k in keys}}
            for r in bench["rows"] if r.get("engine") == "aperture"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("check")
    ap.add_argument("peers", nargs="?")
    ap.add_argument("--device", required=True)
    ap.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--command", default="`tools/dfine_gpu_check.sh` (one device call: parity, graph timings, profile, peers)",
                    help="how the figures were obtained (markdown)")
    ap.add_argument("--note", action="append", default=[], help="a line added under the table (repeatable)")
    ap.add_argument("--pre-post", help="`aperture bench --postprocess --preprocess WxH --out` JSON")
    a = ap.parse_args()
    doc_in = json.load(open(a.check))
    peers = json.load(open(a.peers)) if a.peers and os.path.exists(a.peers) else {"rows": []}
    # check-dfine's JSON holds its model section under "model"; bench's names the model there.
    from_check = isinstance(doc_in.get("model"), dict)
    rows = check_rows(doc_in["model"]) if from_check else bench_rows(doc_in, "aperture")
    if a.pre_post:
        rows += bench_rows(json.load(open(a.pre_post)), "aperture-pixels")
    perr = {r["precision"]: r.get("matched_rel_l2_logits") for r in peers["rows"] if "matched_rel_l2_logits" in r}
    perr["fp32"] = 0.0
    for r in peers["rows"]:
        if "p50_ms" in r:
            rows.append({"engine": r["engine"], "precision": r["precision"], "batch": r["batch"],
                         "images_per_s": r["images_per_s"], "p50_ms": r["p50_ms"], "p99_ms": None,
                         "peak_gib": None, "rel_l2_vs_fp32": perr.get(r["precision"])})
    slug = re.sub(r"[^a-z0-9]+", "-", a.device.lower().replace("nvidia ", "")).strip("-")
    doc = {"device": a.device, "date": a.date, "model": "dfine_x (tests/fixtures/dfine/x seeded weights) 640x640",
           "rows": rows}
    os.makedirs(a.out_dir, exist_ok=True)
    base = os.path.join(a.out_dir, f"{slug}-dfine")
    json.dump(doc, open(base + ".json", "w"), indent=1)
    best_compile = {}
    for r in rows:
        if r["engine"] == "torch-compile":
            best_compile[r["batch"]] = max(best_compile.get(r["batch"], 0), r["images_per_s"])
    fmt = lambda v, f: "" if v is None else format(v, f)
    lines = [f"# D-FINE benchmark: {doc['model']}", "", f"- device: {a.device}", f"- date: {a.date}",
             f"- command: {a.command}",
             "- aperture: one CUDA graph per batch size, device time of a replay (host copies and pre/post-processing excluded)",
             *(["- aperture-pixels: the same graph from 8-bit pixels to detection rows (resize, rescale, forward, "
                "sigmoid + top-k + boxes), both host copies timed"] if a.pre_post else []),
             ("- rel L2: logits vs transformers fp32 after matching queries by box" if from_check else
              "- rel L2: logits vs the CPU backend in fp32 on the bench's seeded input (`aperture bench`)"), "",
             "| engine | precision | batch | images/s | p50 ms | p99 ms | peak GiB | rel L2 vs fp32 | x torch.compile (same batch) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["images_per_s"] / best_compile[r["batch"]] if r["batch"] in best_compile else None
        lines.append(f"| {r['engine']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.1f} | {r['p50_ms']:.2f} | "
                     f"{fmt(r['p99_ms'], '.2f')} | {fmt(r['peak_gib'], '.2f')} | {fmt(r['rel_l2_vs_fp32'], '.2e')} | "
                     f"{fmt(ratio, '.2f')} |")
    if a.note:
        lines += [""] + [f"- {n}" for n in a.note]
    open(base + ".md", "w").write("\n".join(lines) + "\n")
    print("wrote", base + ".json", base + ".md")


if __name__ == "__main__":
    main()
