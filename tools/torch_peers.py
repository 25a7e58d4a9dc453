"""PyTorch peers for `aperture bench`, on the same GPU with the same weights.

    torch_peers.py reference --weights DIR --height H --width W --out io.safetensors
        input "x" (uniform [0,1), seeded) and outputs "y" (float64 forward on the GPU,
        stored as float32) and "y32" (float32, TF32 off).
    torch_peers.py bench --weights DIR --json OUT.json [--size 512]
        [--eager-fp32 1,8] [--eager-fp16 1,8,32] [--compile-fp16 1,8] [--compile-default-fp16 1,8] [--iters 20]
        eager fp32, eager fp16, torch.compile(mode="reduce-overhead") and torch.compile() fp16 rows.
    torch_peers.py merge --aperture A.json --torch T.json --out-json R.json --out-md R.md
        one document in the layout of issue 3, a markdown table with ratios, and a
        short table printed last.

DIR holds model.safetensors and config.json as written by tools/restormer_ref.py.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_model(weights_dir):
    import torch
    from safetensors.torch import load_file
    from restormer_ref import Restormer

    cfg = json.load(open(os.path.join(weights_dir, "config.json")))
    cfg.pop("architecture", None)
    m = Restormer(**cfg).eval()
    m.load_state_dict(load_file(os.path.join(weights_dir, "model.safetensors")))
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def rel_l2(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm())


def cmd_reference(a):
    import torch
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(a.seed)
    x = torch.rand(1, 3, a.height, a.width, generator=g)
    m = load_model(a.weights).cuda()
    with torch.no_grad():
        y32 = m(x.cuda()).cpu()
        y64 = m.double()(x.double().cuda()).cpu()
    print(f"reference {a.height}x{a.width}: torch fp32 (tf32 off) vs fp64 rel L2 {rel_l2(y32, y64):.3e}")
    save_file({"x": x.contiguous(), "y": y64.float().contiguous(), "y32": y32.contiguous()}, a.out)


def stats(ms):
    s = sorted(ms)
    n = len(s)
    pct = lambda p: s[min(max(math.ceil(p / 100 * n), 1), n) - 1]
    mean = sum(s) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in s) / n)
    return dict(mean=mean, std=std, p50=pct(50), p95=pct(95), p99=pct(99))


def time_variant(fn, x, warmup, iters):
    import torch

    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    ms = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(x)
        e.record()
        e.synchronize()
        ms.append(s.elapsed_time(e))
    return stats(ms)


def batches(text):
    return [int(v) for v in text.split(",") if v.strip()]


def cmd_bench(a):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base = load_model(a.weights).cuda()
    g = torch.Generator().manual_seed(a.seed)
    x1 = torch.rand(1, 3, a.size, a.size, generator=g).cuda()
    with torch.no_grad():
        ref = base(x1).float()
    rows = []

    def save(rows):  # after every row, so a run cut short still leaves its numbers
        doc = dict(device=torch.cuda.get_device_name(0), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   model=f"restormer {a.size}x{a.size}", rows=rows,
                   versions=dict(torch=torch.__version__, cuda=torch.version.cuda))
        json.dump(doc, open(a.json, "w"), indent=1)

    variants = [
        ("torch-eager", "fp32", batches(a.eager_fp32), lambda: base, torch.float32),
        ("torch-eager", "fp16", batches(a.eager_fp16), lambda: load_model(a.weights).cuda().half(), torch.float16),
        ("torch-compile", "fp16", batches(a.compile_fp16),
         lambda: torch.compile(load_model(a.weights).cuda().half(), mode="reduce-overhead"), torch.float16),
        ("torch-compile", "fp16", batches(a.compile_default_fp16),
         lambda: torch.compile(load_model(a.weights).cuda().half()), torch.float16),
    ]
    modes = ["eager", "eager", "reduce-overhead", "default"]
    for (engine, prec, bs, make, dtype), variant in zip(variants, modes):
        if not bs:
            continue
        t0 = time.time()
        model = make()
        fn = lambda x: model(x)
        with torch.no_grad():
            for i, b in enumerate(bs):
                if engine == "torch-compile" and i > 0:
                    # A second input shape would recompile with a dynamic batch size
                    # (slower kernels): each batch size gets a fresh static compile.
                    torch._dynamo.reset()
                    model = make()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                x = torch.rand(b, 3, a.size, a.size, generator=g).cuda().to(dtype)
                x[:1] = x1.to(dtype)
                try:
                    y = fn(x)
                    rel = rel_l2(y[:1].float(), ref)
                    st = time_variant(fn, x, a.warmup, a.iters)
                except torch.OutOfMemoryError as e:
                    print(f"{engine} {prec} batch {b}: out of memory ({e})", flush=True)
                    continue
                peak = torch.cuda.max_memory_allocated() / 2**30
                row = dict(engine=engine, variant=variant, precision=prec, batch=b, images_per_s=b / (st["mean"] / 1e3),
                           p50_ms=st["p50"], p99_ms=st["p99"], peak_gib=peak, rel_l2_vs_fp32=rel)
                rows.append(row)
                save(rows)
                print(f"{engine:<13} {prec:>5} {b:>5} mean {st['mean']:9.3f} std {st['std']:7.3f} p50 {st['p50']:9.3f} "
                      f"p95 {st['p95']:9.3f} p99 {st['p99']:9.3f} ms  {row['images_per_s']:8.1f} img/s  "
                      f"peak {peak:6.2f} GiB  relL2 {rel:.2e}  ({time.time() - t0:.0f} s since start)", flush=True)
        del model
    save(rows)


def cmd_merge(a):
    ap = json.load(open(a.aperture))
    th = json.load(open(a.torch)) if os.path.exists(a.torch) else dict(rows=[], versions={})
    rows = ap["rows"] + th["rows"]
    doc = dict(device=ap["device"], date=ap["date"], model=ap["model"], rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(a.out_json)), exist_ok=True)
    json.dump(doc, open(a.out_json, "w"), indent=1)
    best = lambda eng, prec: max((r["images_per_s"] for r in rows if r["engine"] == eng and r["precision"] == prec), default=None)
    compile_best = best("torch-compile", "fp16")
    lat1 = {(r["engine"], r["precision"]): r["p50_ms"] for r in rows if r["batch"] == 1}
    lines = [f"# Restormer benchmark: {doc['model']}", "",
             f"- device: {doc['device']}", f"- date: {doc['date']}",
             f"- versions: aperture {a.version}, torch {th.get('versions', {}).get('torch', '-')}, "
             f"CUDA (torch) {th.get('versions', {}).get('cuda', '-')}",
             "- command: `tools/gpu-check.sh` (one device call: parity, benchmark, peers)", "",
             "| engine | precision | batch | images/s | p50 ms | p99 ms | peak GiB | rel L2 vs fp32 | x torch.compile best |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['images_per_s'] / compile_best:.2f}" if compile_best else "-"
        rel = "-" if r.get("rel_l2_vs_fp32") is None else f"{r['rel_l2_vs_fp32']:.2e}"
        lines.append(f"| {r['engine']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['peak_gib']:.2f} | {rel} | {ratio} |")
    if a.note:
        lines.append("")
        lines += [f"- {n}" for n in a.note]
    open(a.out_md, "w").write("\n".join(lines) + "\n")
    print("\nsummary (best images/s per engine and precision; batch-1 p50):")
    seen = []
    for r in rows:
        k = (r["engine"], r["precision"])
        if k in seen:
            continue
        seen.append(k)
        b = best(*k)
        bb = max((x for x in rows if (x["engine"], x["precision"]) == k), key=lambda x: x["images_per_s"])
        l1 = lat1.get(k)
        ratio = f"{b / compile_best:5.2f}x compile" if compile_best else ""
        print(f"  {k[0]:<13} {k[1]:>5}  best {b:8.1f} img/s (batch {bb['batch']:>2})  "
              f"b1 p50 {'-' if l1 is None else f'{l1:7.2f} ms'}  {ratio}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--weights", required=True)
    r.add_argument("--height", type=int, default=512)
    r.add_argument("--width", type=int, default=512)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--out", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--weights", required=True)
    b.add_argument("--json", required=True)
    b.add_argument("--size", type=int, default=512)
    b.add_argument("--eager-fp32", default="1,8")
    b.add_argument("--eager-fp16", default="1,8,32")
    b.add_argument("--compile-fp16", default="1,8", help="torch.compile mode=reduce-overhead")
    b.add_argument("--compile-default-fp16", default="", help="torch.compile mode=default")
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("merge")
    m.add_argument("--aperture", required=True)
    m.add_argument("--torch", required=True)
    m.add_argument("--out-json", required=True)
    m.add_argument("--out-md", required=True)
    m.add_argument("--note", action="append", default=[], help="a line under the table (repeatable)")
    m.add_argument("--version", default="-")
    a = p.parse_args()
    {"reference": cmd_reference, "bench": cmd_bench, "merge": cmd_merge}[a.cmd](a)


if __name__ == "__main__":
    main()
