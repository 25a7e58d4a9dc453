"""D-FINE parity goldens from HF transformers' DFineForObjectDetection (run where torch is).

    python3 tools/dfine_golden.py OUT_DIR --tiny     # small config, committed as a fixture
    python3 tools/dfine_golden.py OUT_DIR --x        # dfine_x_coco shapes (weights stay out of git)
    python3 tools/dfine_golden.py OUT_DIR --materialize MANIFEST.json   # no torch needed

Weights are not torch's random init: every tensor is filled by a tiny, portable generator
(SplitMix64 over the tensor's name, see `uniform`) so that the X-sized weights, which are
too large to ship, can be rebuilt bit-exactly on any machine from `manifest.json` with
`--materialize` (numpy + safetensors only). Batch-norm statistics and affines, layer-norm
affines and learnable affine blocks are all perturbed so that folding them matters.
`reg_scale` and `up` are written into the weights with values that differ from
config.json, because D-FINE reads them from the weights.

Each case folder gets: model.safetensors (tiny only), config.json, preprocessor_config.json,
golden.safetensors (pixel_values, logits, pred_boxes, f64 outputs, intermediates),
detections.json (post_process_object_detection), manifest.json and info.json.
"""
import argparse
import json
import os
import sys
import time
import traceback
import zlib

import numpy as np

MASK64 = (1 << 64) - 1


def uniform(seed, n):
    """n floats in [0, 1) from SplitMix64 seeded with `seed` (exact in float32)."""
    with np.errstate(over="ignore"):
        idx = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(seed & MASK64) + idx * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float64) / float(1 << 24)).astype(np.float32)


def name_seed(name):
    return zlib.crc32(name.encode()) * 2654435761 + 12345


def fill(name, shape, lo, hi):
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(name_seed(name), n).astype(np.float64)
    return (lo + (hi - lo) * u).astype(np.float32).reshape(shape)


# ---------------------------------------------------------------- configs

TINY_BACKBONE = dict(
    num_channels=3, embedding_size=16, depths=[1, 1, 2, 1], hidden_sizes=[32, 64, 96, 128],
    hidden_act="relu", stem_channels=[3, 8, 16], stage_in_channels=[16, 32, 64, 96],
    stage_mid_channels=[8, 16, 24, 32], stage_out_channels=[32, 64, 96, 128],
    stage_num_blocks=[1, 1, 2, 1], stage_downsample=[False, True, True, True],
    stage_light_block=[False, False, True, True], stage_kernel_size=[3, 3, 5, 5],
    stage_numb_of_layers=[2, 2, 2, 2], use_learnable_affine_block=True,
    out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
)
TINY = dict(
    num_labels=5, encoder_in_channels=[64, 96, 128], feat_strides=[8, 16, 32], encoder_hidden_dim=48,
    encoder_ffn_dim=64, encoder_attention_heads=2, encoder_layers=1, encode_proj_layers=[2],
    hidden_expansion=0.5, depth_mult=0.5, d_model=32, decoder_in_channels=[48, 48, 48],
    decoder_ffn_dim=64, num_feature_levels=3, decoder_n_points=[2, 3, 2], decoder_layers=3,
    decoder_attention_heads=4, num_queries=20, max_num_bins=16, reg_max=16, reg_scale=4.0, up=0.5,
    top_prob_values=4, lqe_hidden_dim=16, lqe_layers=2, eval_idx=-1, layer_scale=1,
    num_denoising=100, anchor_image_size=None, eval_size=None, decoder_offset_scale=0.5,
)
TINY_WEIGHT_OVERRIDES = {"reg_scale": 6.0, "up": 0.6}
TINY_INPUT = (2, 96, 416)  # batch, height, width: non-square, level-0 border anchors invalid

X_BACKBONE = dict(
    num_channels=3, embedding_size=32, depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
    hidden_act="relu", stem_channels=[3, 32, 64], stage_in_channels=[64, 128, 512, 1024],
    stage_mid_channels=[64, 128, 256, 512], stage_out_channels=[128, 512, 1024, 2048],
    stage_num_blocks=[1, 2, 5, 2], stage_downsample=[False, True, True, True],
    stage_light_block=[False, False, True, True], stage_kernel_size=[3, 3, 5, 5],
    stage_numb_of_layers=[6, 6, 6, 6], use_learnable_affine_block=False,
    out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
)
X = dict(
    num_labels=80, encoder_in_channels=[512, 1024, 2048], feat_strides=[8, 16, 32], encoder_hidden_dim=384,
    encoder_ffn_dim=2048, encoder_attention_heads=8, encoder_layers=1, encode_proj_layers=[2],
    hidden_expansion=1.0, depth_mult=1.0, d_model=256, decoder_in_channels=[384, 384, 384],
    decoder_ffn_dim=1024, num_feature_levels=3, decoder_n_points=[3, 6, 3], decoder_layers=6,
    decoder_attention_heads=8, num_queries=300, max_num_bins=32, reg_max=32, reg_scale=4.0, up=0.5,
    top_prob_values=4, lqe_hidden_dim=64, lqe_layers=2, eval_idx=-1, layer_scale=1,
    num_denoising=100, anchor_image_size=None, eval_size=None, decoder_offset_scale=0.5,
)
X_WEIGHT_OVERRIDES = {"reg_scale": 8.0, "up": 0.5}
X_INPUT = (1, 640, 640)


def make_config(bb, cfg, id2label):
    from transformers import DFineConfig, HGNetV2Config

    backbone = HGNetV2Config(**bb)
    kw = dict(cfg)
    kw["id2label"] = {int(k): v for k, v in id2label.items()}
    kw["label2id"] = {v: int(k) for k, v in id2label.items()}
    try:
        config = DFineConfig(backbone_config=backbone, **kw)
    except TypeError as e:  # a field this transformers version does not know
        print("DFineConfig(**kw) failed:", e, "- setting fields one by one")
        config = DFineConfig(backbone_config=backbone)
        for k, v in kw.items():
            setattr(config, k, v)
    for k, v in cfg.items():  # make sure every field holds what we asked for
        if getattr(config, k, None) != v:
            print(f"note: config.{k} = {getattr(config, k, None)!r}, setting {v!r}")
            setattr(config, k, v)
    return config


# ---------------------------------------------------------------- weights

def randomise(model, overrides):
    """Fills every parameter and batch-norm buffer from `fill`; returns {param name: (lo, hi)}."""
    import torch
    from torch import nn

    rules = {}

    def put(name, t, lo, hi):
        t.data.copy_(torch.from_numpy(fill(name, tuple(t.shape), lo, hi)))
        rules[name] = (lo, hi)

    for mod_name, mod in model.named_modules():
        p = mod_name + "." if mod_name else ""
        cls = type(mod).__name__
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight
            fan_in = int(np.prod(w.shape[1:]))
            b = float(np.sqrt(3.0 / fan_in))
            put(p + "weight", w, -b, b)
            if mod.bias is not None:
                put(p + "bias", mod.bias, -0.1, 0.1)
        elif isinstance(mod, nn.BatchNorm2d) or "BatchNorm" in cls:
            put(p + "weight", mod.weight, 0.5, 1.5)
            put(p + "bias", mod.bias, -0.2, 0.2)
            put(p + "running_mean", mod.running_mean, -0.2, 0.2)
            put(p + "running_var", mod.running_var, 0.5, 1.5)
        elif isinstance(mod, nn.LayerNorm):
            put(p + "weight", mod.weight, 0.8, 1.2)
            put(p + "bias", mod.bias, -0.1, 0.1)
        elif isinstance(mod, nn.Embedding):
            put(p + "weight", mod.weight, -0.5, 0.5)
        elif "LearnableAffine" in cls:
            put(p + "scale", mod.scale, 0.8, 1.2)
            put(p + "bias", mod.bias, -0.1, 0.1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in overrides:
                t.fill_(overrides[leaf])
    return rules


def manifest_for(st_path, model, rules):
    """For each tensor in the saved safetensors file: its shape and how to rebuild it."""
    from safetensors import safe_open

    params = dict(model.state_dict())
    out = {}
    with safe_open(st_path, framework="np") as f:
        for key in f.keys():
            arr = f.get_tensor(key)
            entry = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
            rule = rules.get(key)
            if rule is not None and np.array_equal(arr, fill(key, arr.shape, *rule)):
                entry["fill"] = [key, rule[0], rule[1]]
            else:  # saved under another name, or a buffer/override: find its source or inline it
                src = None
                for pname, (lo, hi) in rules.items():
                    t = params.get(pname)
                    if t is not None and tuple(t.shape) == arr.shape and np.array_equal(t.numpy(), arr):
                        src = [pname, lo, hi]
                        break
                if src is not None and np.array_equal(arr, fill(src[0], arr.shape, src[1], src[2])):
                    entry["fill"] = src
                elif arr.size <= 65536:
                    entry["values"] = arr.astype(np.float64).ravel().tolist()
                else:
                    entry["unknown"] = True
            out[key] = entry
    return out


def materialize(manifest_path, out_path):
    from safetensors.numpy import save_file

    man = json.load(open(manifest_path))
    tensors = {}
    for key, e in man["tensors"].items():
        shape = tuple(e["shape"])
        if "fill" in e:
            arr = fill(e["fill"][0], shape, e["fill"][1], e["fill"][2])
        elif "values" in e:
            arr = np.asarray(e["values"], dtype=np.float64).reshape(shape)
        else:
            raise SystemExit(f"{key}: the manifest cannot rebuild this tensor")
        tensors[key] = np.ascontiguousarray(arr.astype(np.dtype(e["dtype"])))
    save_file(tensors, out_path)
    print(f"wrote {len(tensors)} tensors to {out_path}")


# ---------------------------------------------------------------- reference run

HOOKS = {
    "backbone": "model.backbone",
    "encoder_input_proj.0": "model.encoder_input_proj.0",
    "encoder_input_proj.1": "model.encoder_input_proj.1",
    "encoder_input_proj.2": "model.encoder_input_proj.2",
    "aifi": "model.encoder.aifi.0",
    "encoder": "model.encoder",
    "enc_output": "model.enc_output",
    "decoder_input_proj.0": "model.decoder_input_proj.0",
    "decoder.layers.0": "model.decoder.layers.0",
}


def flatten_tensors(prefix, obj, out):
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().float().contiguous().clone()
    elif isinstance(obj, (list, tuple)):
        for i, o in enumerate(obj):
            flatten_tensors(f"{prefix}.{i}", o, out)
    elif hasattr(obj, "keys"):
        for k in obj.keys():
            flatten_tensors(f"{prefix}.{k}", obj[k], out)


def run_case(name, bb, cfg, overrides, shape, out_root, save_weights, want_f64):
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import DFineForObjectDetection

    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    id2label = {i: f"class_{i}" for i in range(cfg["num_labels"])}
    if cfg["num_labels"] == 80:
        id2label = {i: n for i, n in enumerate(COCO80)}
    config = make_config(bb, cfg, id2label)
    torch.manual_seed(0)
    model = DFineForObjectDetection(config).eval()
    rules = randomise(model, overrides)
    model.save_pretrained(out, safe_serialization=True)
    st = os.path.join(out, "model.safetensors")
    man = {"tensors": manifest_for(st, model, rules), "weight_overrides": overrides}
    json.dump(man, open(os.path.join(out, "manifest.json"), "w"))
    if not save_weights:
        os.remove(st)
    unknown = [k for k, e in man["tensors"].items() if e.get("unknown")]
    info["unrebuildable_tensors"] = unknown
    info["state_dict_keys"] = len(model.state_dict())
    info["saved_keys"] = len(man["tensors"])

    # preprocessor_config.json as the HF D-FINE checkpoints ship it
    try:
        from transformers import RTDetrImageProcessor

        proc = RTDetrImageProcessor(do_normalize=False, size={"height": shape[1], "width": shape[2]})
        proc.save_pretrained(out)
    except Exception:
        traceback.print_exc()
        proc = None

    b, h, w = shape
    pix = torch.from_numpy(uniform(name_seed("pixel_values"), b * 3 * h * w).reshape(b, 3, h, w))
    captured = {}
    handles = []
    mods = dict(model.named_modules())
    for key, path in HOOKS.items():
        if path in mods:
            handles.append(mods[path].register_forward_hook(
                lambda m, i, o, key=key: flatten_tensors(key, o, captured)))
    with torch.no_grad():
        t0 = time.time()
        outputs = model(pixel_values=pix)
        info["cpu_forward_s"] = time.time() - t0
        t0 = time.time()
        outputs = model(pixel_values=pix)
        info["cpu_forward_s_second"] = time.time() - t0
    for hnd in handles:
        hnd.remove()
    tensors = {"pixel_values": pix.contiguous().clone(), "logits": outputs.logits.contiguous().clone(),
               "pred_boxes": outputs.pred_boxes.contiguous().clone()}
    for field in ["init_reference_points", "enc_topk_logits", "enc_topk_bboxes", "intermediate_logits",
                  "intermediate_reference_points", "intermediate_predicted_corners",
                  "initial_reference_points", "intermediate_hidden_states", "last_hidden_state"]:
        v = getattr(outputs, field, None)
        if isinstance(v, torch.Tensor):
            tensors["out." + field] = v.detach().float().contiguous().clone()
    if save_weights:
        for k, v in captured.items():
            tensors["hook." + k] = v
    if want_f64:
        try:
            m64 = model.double()
            with torch.no_grad():
                o64 = m64(pixel_values=pix.double())
            tensors["logits_f64"] = o64.logits.float().contiguous().clone()
            tensors["pred_boxes_f64"] = o64.pred_boxes.float().contiguous().clone()
            model = model.float()
        except Exception:
            traceback.print_exc()
    save_file(tensors, os.path.join(out, "golden.safetensors"))

    # post-processing exactly as transformers does it
    target_sizes = [(480, 640), (300, 200)][:b]
    dets = {"threshold": 0.3, "target_sizes": target_sizes, "images": []}
    try:
        if proc is None:
            raise RuntimeError("no image processor")
        res = proc.post_process_object_detection(outputs, threshold=0.3, target_sizes=target_sizes)
    except Exception:
        traceback.print_exc()
        res = manual_post_process(outputs.logits, outputs.pred_boxes, 0.3, target_sizes)
        dets["manual"] = True
    for r in res:
        dets["images"].append({"scores": r["scores"].tolist(), "labels": r["labels"].tolist(),
                               "boxes": r["boxes"].tolist(),
                               "names": [config.id2label[int(i)] for i in r["labels"].tolist()]})
    json.dump(dets, open(os.path.join(out, "detections.json"), "w"), indent=1)
    info["sigmoid_max"] = float(outputs.logits.sigmoid().max())
    info["num_detections"] = [len(r["scores"]) for r in dets["images"]]
    json.dump(info, open(os.path.join(out, "info.json"), "w"), indent=1)
    print(name, json.dumps({k: v for k, v in info.items() if k != "unrebuildable_tensors"}))
    print(name, "unrebuildable:", unknown)


def manual_post_process(logits, boxes_cxcywh, threshold, target_sizes):
    """Fallback mirroring RTDetrImageProcessor.post_process_object_detection (focal loss)."""
    import torch

    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
    ts = torch.as_tensor(target_sizes, dtype=boxes.dtype)
    img_h, img_w = ts.unbind(1)
    boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], 1)[:, None, :]
    q, c = logits.shape[1], logits.shape[2]
    scores, index = torch.topk(logits.sigmoid().flatten(1), q, dim=-1)
    labels = index % c
    boxes = boxes.gather(1, (index // c).unsqueeze(-1).repeat(1, 1, 4))
    return [{"scores": s[s > threshold], "labels": l[s > threshold], "boxes": b[s > threshold]}
            for s, l, b in zip(scores, labels, boxes)]


def dump_sources(out_root):
    import inspect
    import shutil

    import transformers

    d = os.path.join(out_root, "src")
    os.makedirs(d, exist_ok=True)
    for modname in ["transformers.models.d_fine.modeling_d_fine", "transformers.models.d_fine.configuration_d_fine",
                    "transformers.models.hgnet_v2.modeling_hgnet_v2",
                    "transformers.models.hgnet_v2.configuration_hgnet_v2",
                    "transformers.models.rt_detr.image_processing_rt_detr",
                    "transformers.models.rt_detr.image_processing_rt_detr_fast"]:
        try:
            mod = __import__(modname, fromlist=["x"])
            shutil.copy(inspect.getsourcefile(mod), d)
        except Exception as e:
            print("source dump:", modname, e)
    print("transformers", transformers.__version__, os.path.dirname(transformers.__file__))


COCO80 = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
          "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
          "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
          "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
          "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
          "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
          "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
          "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
          "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
          "teddy bear", "hair drier", "toothbrush"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--x", action="store_true")
    ap.add_argument("--sources", action="store_true")
    ap.add_argument("--materialize", metavar="MANIFEST")
    a = ap.parse_args()
    if a.materialize:
        materialize(a.materialize, a.out)
        return
    os.makedirs(a.out, exist_ok=True)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    failed = False
    if a.sources:
        dump_sources(a.out)
    for flag, args in [(a.tiny, ("tiny", TINY_BACKBONE, TINY, TINY_WEIGHT_OVERRIDES, TINY_INPUT, True, True)),
                       (a.x, ("x", X_BACKBONE, X, X_WEIGHT_OVERRIDES, X_INPUT, False, False))]:
        if not flag:
            continue
        try:
            name, bb, cfg, overrides, shape, save_weights, want_f64 = args
            run_case(name, bb, cfg, overrides, shape, a.out, save_weights, want_f64)
        except Exception:
            traceback.print_exc()
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
