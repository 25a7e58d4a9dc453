"""PyTorch peers for D-FINE on the GPU (run where torch + transformers are).

    python3 tools/dfine_torch_peers.py MODEL_DIR --out peers.json [--compile] [--batches 1,32]

MODEL_DIR holds config.json + model.safetensors (e.g. rebuilt by
`tools/dfine_golden.py DIR/model.safetensors --materialize tests/fixtures/dfine/x/manifest.json`).
Reports, on the golden's pixel values (tools/dfine_golden.py's generator):
  * fp16 and bf16 against fp32 (relative L2 of logits and boxes, after autocast-free casts);
  * the fp32 activation range per module (forward hooks): which modules leave the fp16
    range (|x| > 65504) or come close, and the first module whose fp16 output is not finite;
  * eager timings (fp32, fp16) and optionally torch.compile fp16 (modes reduce-overhead and
    default by default; --compile-modes), each the
    median of CUDA-event-timed iterations.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dfine_golden import name_seed, uniform  # noqa: E402

FP16_MAX = 65504.0


def rel_l2(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def matched_rel_l2(lo, bo, lr, br):
    """Relative L2 after matching each reference query to the nearest unused box (the
    top-k query order is not stable across precisions); batch 1."""
    lo, bo, lr, br = (t[0].double().cpu().numpy() for t in (lo, bo, lr, br))
    used = np.zeros(len(bo), bool)
    idx = []
    for i in range(len(br)):
        d = np.abs(bo - br[i]).max(1)
        d[used] = np.inf
        j = int(d.argmin())
        used[j] = True
        idx.append(j)
    ml, mb = lo[idx], bo[idx]
    return (float(np.linalg.norm(ml - lr) / np.linalg.norm(lr)), float(np.linalg.norm(mb - br) / np.linalg.norm(br)),
            int(sum(j != i for i, j in enumerate(idx))))


def timed(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ms.append(s.elapsed_time(e))
    ms.sort()
    return ms[len(ms) // 2]


def tensors_of(o):
    if isinstance(o, torch.Tensor):
        yield o
    elif isinstance(o, (list, tuple)):
        for x in o:
            yield from tensors_of(x)
    elif hasattr(o, "values"):
        for x in o.values():
            yield from tensors_of(x)


def activation_ranges(model, pix):
    """Largest |value| of every module's outputs (fp32), in call order."""
    ranges, handles = [], []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, i, o, name=name):
            vals = [t.detach().float().abs().max().item() for t in tensors_of(o) if t.is_floating_point() and t.numel()]
            if vals:
                ranges.append((name, type(m).__name__, max(vals)))

        handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(pixel_values=pix)
    for h in handles:
        h.remove()
    return ranges


def first_non_finite(model, pix):
    found, handles = [], []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, i, o, name=name):
            if not found:
                for t in tensors_of(o):
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        found.append((name, type(m).__name__))
                        break

        handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(pixel_values=pix)
    for h in handles:
        h.remove()
    return found[0] if found else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-modes", default="reduce-overhead,default",
                    help="torch.compile modes timed with --compile (comma separated)")
    ap.add_argument("--skip-study", action="store_true",
                    help="skip the fp16/bf16 precision study and activation ranges")
    ap.add_argument("--skip-eager", action="store_true", help="skip the eager timings")
    a = ap.parse_args()
    from transformers import DFineForObjectDetection

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = DFineForObjectDetection.from_pretrained(a.model, ignore_mismatched_sizes=True).eval().to(dev)
    pix = torch.from_numpy(uniform(name_seed("pixel_values"), 3 * 640 * 640).reshape(1, 3, 640, 640)).to(dev)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    if not a.skip_study:
        precision_study(a, model, pix, res)
    del model
    timings(a, res)
    json.dump(res, open(a.out, "w"), indent=1)


def precision_study(a, model, pix, res):
    """fp16/bf16 against fp32 on one input, and where fp32 activations leave fp16's range."""
    from transformers import DFineForObjectDetection

    dev = pix.device
    with torch.no_grad():
        ref = model(pixel_values=pix)
    ranges = activation_ranges(model, pix)
    over = [r for r in ranges if r[2] > FP16_MAX]
    near = [r for r in ranges if FP16_MAX / 16 < r[2] <= FP16_MAX]
    res["fp32_max_abs"] = max(r[2] for r in ranges)
    res["over_fp16"] = over[:200]
    res["near_fp16"] = near[:200]
    print(f"fp32 activations: max |x| {res['fp32_max_abs']:.3e}; {len(over)} module outputs exceed fp16, {len(near)} within 16x")
    for r in over[:40]:
        print(f"  over  {r[2]:11.4e}  {r[1]:<28} {r[0]}")
    for r in near[:15]:
        print(f"  near  {r[2]:11.4e}  {r[1]:<28} {r[0]}")
    for name, dt in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        m = DFineForObjectDetection.from_pretrained(a.model, ignore_mismatched_sizes=True).eval().to(dev).to(dt)
        with torch.no_grad():
            o = m(pixel_values=pix.to(dt))
        el, eb = rel_l2(o.logits.float(), ref.logits), rel_l2(o.pred_boxes.float(), ref.pred_boxes)
        ml, mb, moved = matched_rel_l2(o.logits.float(), o.pred_boxes.float(), ref.logits, ref.pred_boxes)
        bad = first_non_finite(m, pix.to(dt))
        print(f"torch {name} vs fp32: logits {el:.3e} boxes {eb:.3e}; matched rows: logits {ml:.3e} boxes {mb:.3e} "
              f"({moved} moved); first non-finite output: {bad}")
        res["rows"].append({"engine": "torch-eager", "precision": name, "batch": 1, "rel_l2_logits": el,
                            "rel_l2_boxes": eb, "matched_rel_l2_logits": ml, "matched_rel_l2_boxes": mb,
                            "moved": moved, "first_non_finite": bad})
        del m


def timings(a, res):
    """Eager fp32/fp16 and torch.compile fp16 (each requested mode) per batch size."""
    from transformers import DFineForObjectDetection

    dev = torch.device("cuda")
    batches = [int(b) for b in a.batches.split(",")]
    for name, dt in [("fp32", torch.float32), ("fp16", torch.float16)]:
        if a.skip_eager and not (a.compile and dt == torch.float16):
            continue
        m = DFineForObjectDetection.from_pretrained(a.model, ignore_mismatched_sizes=True).eval().to(dev).to(dt)
        for b in [] if a.skip_eager else batches:
            x = torch.rand(b, 3, 640, 640, device=dev, dtype=dt)
            with torch.no_grad():
                ms = timed(lambda: m(pixel_values=x), a.iters)
            print(f"torch-eager {name} batch {b}: {ms:.2f} ms, {b * 1e3 / ms:.1f} images/s")
            res["rows"].append({"engine": "torch-eager", "variant": "eager", "precision": name, "batch": b,
                                "p50_ms": ms, "images_per_s": b * 1e3 / ms})
        modes = [mode for mode in a.compile_modes.split(",") if mode] if a.compile and dt == torch.float16 else []
        for mode in modes:
            torch._dynamo.reset()
            cm = torch.compile(m, mode=mode)
            for b in batches:
                x = torch.rand(b, 3, 640, 640, device=dev, dtype=dt)
                t0 = time.time()
                with torch.no_grad():
                    ms = timed(lambda: cm(pixel_values=x), a.iters)
                print(f"torch-compile {mode} fp16 batch {b}: {ms:.2f} ms, {b * 1e3 / ms:.1f} images/s "
                      f"(compile+run {time.time() - t0:.0f} s)")
                res["rows"].append({"engine": "torch-compile", "variant": mode, "precision": "fp16",
                                    "batch": b, "p50_ms": ms, "images_per_s": b * 1e3 / ms})
                json.dump(res, open(a.out, "w"), indent=1)
        del m


if __name__ == "__main__":
    main()
