#!/usr/bin/env python3
"""Writes small checkpoints laid out exactly like torch.save's zip format, without torch.

Used to make the fixtures in crates/weights/tests/fixtures/ (re-run to regenerate):

    python3 tools/make_torch_like_checkpoint.py crates/weights/tests/fixtures

The pickles come from CPython's own pickler with stand-in `torch._utils` / `torch`
globals registered under their real names, so the byte stream has the same GLOBAL,
BINPERSID, REDUCE and BUILD opcodes torch writes. Every `<name>.pt` gets a twin
`<name>.safetensors` (`legacy_<name>.pt`, in the pre-1.6 format, shares `<name>`'s) holding the tensors a loader must produce (views materialised,
`module.` stripped), written here with `struct` so it is independent of the Rust writer.
Only the standard library is needed.
"""

import collections
import io
import json
import pickle
import random
import struct
import sys
import types
import zipfile
from pathlib import Path

# --- stand-ins for the torch names that appear in a pickle -------------------------

torch_mod = types.ModuleType("torch")
utils_mod = types.ModuleType("torch._utils")
torch_mod._utils = utils_mod
sys.modules["torch"] = torch_mod
sys.modules["torch._utils"] = utils_mod


def _register(module, name, obj):
    obj.__module__ = module.__name__
    obj.__qualname__ = name
    obj.__name__ = name
    setattr(module, name, obj)
    return obj


def _never_called(*_args):
    raise RuntimeError("stand-in only used for pickling")


rebuild_tensor_v2 = _register(utils_mod, "_rebuild_tensor_v2", lambda *a: _never_called(*a))
rebuild_parameter = _register(utils_mod, "_rebuild_parameter", lambda *a: _never_called(*a))

# storage class name -> (struct code, safetensors dtype)
STORAGES = {
    "FloatStorage": ("f", "F32"),
    "HalfStorage": ("e", "F16"),
    "BFloat16Storage": ("bf16", "BF16"),
    "DoubleStorage": ("d", "F64"),
    "LongStorage": ("q", "I64"),
    "IntStorage": ("i", "I32"),
    "ByteStorage": ("B", "U8"),
    "BoolStorage": ("?", "BOOL"),
    "ComplexFloatStorage": ("ff", None),
}
STORAGE_CLASSES = {name: _register(torch_mod, name, type(name, (), {})) for name in STORAGES}


def bf16_bits(x):
    """Round-to-nearest-even bf16 bit pattern of a float (as torch does)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", x))
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def pack(code, values):
    if code == "bf16":
        return b"".join(struct.pack("<H", bf16_bits(v)) for v in values)
    if code == "ff":
        return b"".join(struct.pack("<ff", v, 0.0) for v in values)
    return b"".join(struct.pack("<" + code, v) for v in values)


def roundtrip(code, values):
    """The values as the storage type holds them (what a loader must read back)."""
    if code == "bf16":
        return [struct.unpack("<f", struct.pack("<I", bf16_bits(v) << 16))[0] for v in values]
    if code in ("e", "f"):
        return [struct.unpack("<" + code, struct.pack("<" + code, v))[0] for v in values]
    return list(values)


class Storage:
    def __init__(self, kind, key, values):
        self.kind, self.key, self.values = kind, key, list(values)

    def bytes(self):
        return pack(STORAGES[self.kind][0], self.values)


class Tensor:
    """A strided view on a Storage; pickles like torch.Tensor.__reduce_ex__."""

    def __init__(self, storage, size, stride=None, offset=0):
        self.storage, self.size, self.offset = storage, tuple(size), offset
        if stride is None:
            stride, acc = [], 1
            for d in reversed(self.size):
                stride.insert(0, acc)
                acc *= d
        self.stride = tuple(stride)

    def __reduce_ex__(self, _proto):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (rebuild_tensor_v2, args)

    def elements(self):
        """Row-major materialisation, by explicit index arithmetic."""
        vals = roundtrip(STORAGES[self.storage.kind][0], self.storage.values)
        out, idx = [], [0] * len(self.size)
        total = 1
        for d in self.size:
            total *= d
        for _ in range(total):
            out.append(vals[self.offset + sum(i * s for i, s in zip(idx, self.stride))])
            for dim in reversed(range(len(idx))):
                idx[dim] += 1
                if idx[dim] < self.size[dim]:
                    break
                idx[dim] = 0
        return out


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce_ex__(self, _proto):
        return (rebuild_parameter, (self.tensor, True, collections.OrderedDict()))


class Namespace:
    """Stands for an arbitrary user class (like argparse.Namespace) in a checkpoint."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


user_mod = types.ModuleType("trainer_options")
sys.modules["trainer_options"] = user_mod
_register(user_mod, "Namespace", Namespace)


class StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGE_CLASSES[obj.kind], obj.key, "cpu", len(obj.values))
        return None


def save(obj, path, prefix="archive", protocol=2):
    """torch.save's zip layout: data.pkl, byteorder, data/<key>, version."""
    buf = io.BytesIO()
    storages = {}

    class Collecting(StoragePickler):
        def persistent_id(self, o):
            if isinstance(o, Storage):
                storages[o.key] = o
            return super().persistent_id(o)

    Collecting(buf, protocol=protocol).dump(obj)
    entries = [("data.pkl", buf.getvalue()), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little")]
    entries += [(f"data/{key}", storages[key].bytes()) for key in sorted(storages)]
    entries += [("version", b"3\n"), (".data/serialization_id", b"0123456789")]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries:
            # A fixed timestamp keeps the fixtures byte-for-byte reproducible.
            z.writestr(zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0)), data)


def save_legacy(obj, path, protocol=2):
    """The pre-1.6 layout: magic, version, sys info, object, storage keys, then each
    storage as an int64 element count and its raw elements."""
    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=protocol)
    pickle.dump(1001, buf, protocol=protocol)
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    pickle.dump(sys_info, buf, protocol=protocol)
    storages = {}

    class Legacy(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, Storage):
                storages[o.key] = o
                return ("storage", STORAGE_CLASSES[o.kind], o.key, "cpu", len(o.values), None)
            return None

    Legacy(buf, protocol=protocol).dump(obj)
    keys = sorted(storages)
    pickle.dump(keys, buf, protocol=protocol)
    for key in keys:
        buf.write(struct.pack("<q", len(storages[key].values)))
        buf.write(storages[key].bytes())
    Path(path).write_bytes(buf.getvalue())


def save_twin(tensors, path):
    """A safetensors file of the expected tensors (name -> (dtype, shape, values))."""
    header, data = {}, b""
    codes = {"F32": "f", "F16": "e", "BF16": "bf16", "F64": "d", "I64": "q", "I32": "i", "U8": "B", "BOOL": "?"}
    for name in sorted(tensors):
        dtype, shape, values = tensors[name]
        blob = pack(codes[dtype], values)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)


def expected(t):
    return (STORAGES[t.storage.kind][1], t.size, t.elements())


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    rand = lambda n: [rng.uniform(-2, 2) for _ in range(n)]  # noqa: E731

    # 1. A bare state dict (OrderedDict with torch's _metadata attribute) covering
    #    dtypes, a transposed view, an offset view and an integer buffer.
    shared = Storage("FloatStorage", "0", rand(24))
    sd = collections.OrderedDict()
    sd["conv.weight"] = Tensor(shared, (2, 3, 2, 2))
    sd["conv.weight_t"] = Tensor(shared, (3, 2), stride=(1, 3), offset=4)  # non-contiguous view
    sd["conv.bias"] = Tensor(Storage("FloatStorage", "1", rand(10)), (4,), offset=3)
    sd["norm.weight"] = Tensor(Storage("HalfStorage", "2", rand(6)), (6,))
    sd["norm.bias"] = Tensor(Storage("BFloat16Storage", "3", rand(6)), (2, 3))
    sd["norm.running_mean"] = Tensor(Storage("DoubleStorage", "4", rand(3)), (3,))
    sd["norm.num_batches_tracked"] = Tensor(Storage("LongStorage", "5", [123456]), ())
    sd["mask"] = Tensor(Storage("BoolStorage", "6", [True, False, True]), (3,))
    sd["ids"] = Tensor(Storage("IntStorage", "7", [-5, 0, 7, 9]), (2, 2), stride=(1, 2))
    sd["pixels"] = Tensor(Storage("ByteStorage", "8", [0, 128, 255]), (3,))
    sd._metadata = collections.OrderedDict({"": {"version": 1}, "conv": {"version": 1}})
    save(sd, out / "bare.pt")
    save_legacy(sd, out / "legacy_bare.pt")  # twin: bare.safetensors
    save_twin({k: expected(v) for k, v in sd.items()}, out / "bare.safetensors")

    # 2. Nested under model_state_dict, DataParallel prefix, optimizer state (with a
    #    tensor of a type we cannot load, which must be ignored), a user object.
    model = collections.OrderedDict()
    model["module.head.weight"] = Tensor(Storage("FloatStorage", "w", rand(12)), (3, 4))
    model["module.head.bias"] = Tensor(Storage("FloatStorage", "b", rand(3)), (3,))
    ckpt = {
        "epoch": 7,
        "best_psnr": 31.5,
        "model_state_dict": model,
        "optimizer_state_dict": {
            "state": {0: {"step": Tensor(Storage("FloatStorage", "s", [10.0]), ()),
                          "exp_avg": Tensor(Storage("ComplexFloatStorage", "c", [1.0, 2.0]), (2,))}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False}],
        },
        "args": Namespace(lr=1e-3, name="run", big=2**70),
        "note": b"bytes value",
    }
    save(ckpt, out / "nested_module.pt")
    save_legacy(ckpt, out / "legacy_nested_module.pt")  # twin: nested_module.safetensors
    save_twin({k[len("module."):]: expected(v) for k, v in model.items()}, out / "nested_module.safetensors")

    # 3. Protocol 4 (STACK_GLOBAL, MEMOIZE, FRAME), a custom archive folder name,
    #    Parameters, params + params_ema (the EMA weights win), and the same dict
    #    referenced twice (a BINGET of a filled dict).
    plain = {"body.0.weight": Parameter(Tensor(Storage("FloatStorage", "p0", rand(4)), (2, 2)))}
    ema_sd = {"body.0.weight": Parameter(Tensor(Storage("FloatStorage", "e0", rand(4)), (2, 2)))}
    save({"params": plain, "params_ema": ema_sd, "also_ema": ema_sd}, out / "params_ema_proto4.pt",
         prefix="my_model", protocol=4)
    save_twin({k: expected(v.tensor) for k, v in ema_sd.items()}, out / "params_ema_proto4.safetensors")

    # 4. A needed tensor whose storage type cannot be loaded: the error must name it.
    save({"weight": Tensor(Storage("ComplexFloatStorage", "0", [1.0, 2.0]), (2,))}, out / "complex_weight.pt")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "crates/weights/tests/fixtures")
