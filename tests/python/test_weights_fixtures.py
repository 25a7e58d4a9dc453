"""Checks the torch-format weight fixtures with Python's own tools.

crates/weights/tests compare what the Rust loader reads from each `<name>.pt` with the
`<name>.safetensors` twin beside it. Here the same pairs are checked independently:
each .pt is read with CPython's unpickler plus numpy strides (a minimal torch.load),
each twin with the reference `safetensors` library, and the generator must reproduce
the committed files byte for byte.
"""

import collections
import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "weights" / "tests" / "fixtures"
GENERATOR = ROOT / "tools" / "make_torch_like_checkpoint.py"

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": "bf16",
}


def bf16_to_f32(raw):
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


class MiniTorchUnpickler(pickle.Unpickler):
    """Resolves torch's storage ids and tensor rebuilds to numpy arrays."""

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def persistent_load(self, pid):
        tag, storage_class, key, _location, _numel = pid
        assert tag == "storage"
        raw = self.archive.read(f"{self.prefix}data/{key}")
        dtype = STORAGE_DTYPES.get(storage_class)
        if dtype is None:
            return None  # a type the tests never need to read (complex)
        return bf16_to_f32(raw) if dtype == "bf16" else np.frombuffer(raw, dtype=dtype)

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda tensor, *_: tensor
        if module == "torch" and name.endswith("Storage"):
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return Opaque


class Opaque:
    """Any other class or function (user objects in a checkpoint)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def rebuild_tensor(storage, offset, size, stride, *_):
    if storage is None:
        return None
    if not size:  # as_strided treats an empty shape as "keep the input's shape"
        return np.array(storage[offset])
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * item for s in stride]
    )
    return np.ascontiguousarray(view)


def torch_load(path):
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        with z.open(pkl) as f:
            return MiniTorchUnpickler(f, z, pkl[: -len("data.pkl")]).load()


class LegacyUnpickler(MiniTorchUnpickler):
    """The pre-1.6 layout: the storages follow the pickles, so tensors are deferred."""

    def __init__(self, file):
        pickle.Unpickler.__init__(self, file)
        self.storage_classes = {}

    def persistent_load(self, pid):
        tag, storage_class, key, _location, _numel, _view = pid
        assert tag == "storage"
        self.storage_classes[key] = storage_class
        return key

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return DeferredTensor
        return super().find_class(module, name)


class DeferredTensor:
    def __init__(self, key, offset, size, stride, *_):
        self.key, self.view = key, (offset, size, stride)


def legacy_torch_load(path):
    with open(path, "rb") as f:
        assert pickle.load(f) == 0x1950A86A20F9469CFC6C
        assert pickle.load(f) == 1001
        assert pickle.load(f)["little_endian"]
        u = LegacyUnpickler(f)
        obj = u.load()
        storages = {}
        for key in pickle.load(f):
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = STORAGE_DTYPES.get(u.storage_classes[key])
            if dtype is None:  # complex: 8 bytes an element, never needed
                f.read(numel * 8)
            elif dtype == "bf16":
                storages[key] = bf16_to_f32(f.read(numel * 2))
            else:
                storages[key] = np.frombuffer(f.read(numel * np.dtype(dtype).itemsize), dtype=dtype)
        assert f.read() == b""

    def resolve(v):
        if isinstance(v, DeferredTensor):
            return rebuild_tensor(storages.get(v.key), *v.view)
        if isinstance(v, dict):
            return {k: resolve(x) for k, x in v.items()}
        return v

    return resolve(obj)


def twin(path):
    """The twin via the reference library; BF16 (unknown to numpy) via its header."""
    out = {}
    with safe_open(str(path), framework="np") as f:
        for name in f.keys():
            try:
                out[name] = f.get_tensor(name)
            except TypeError:
                out[name] = None
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] == "BF16":
            b, e = info["data_offsets"]
            out[name] = bf16_to_f32(raw[8 + n + b : 8 + n + e]).reshape(info["shape"])
    return out


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(g.astype(np.float64), w.astype(np.float64), err_msg=name)


def test_bare_state_dict_matches_twin():
    sd = torch_load(FIXTURES / "bare.pt")
    assert isinstance(sd, collections.OrderedDict)
    assert_same(dict(sd), twin(FIXTURES / "bare.safetensors"))
    # The transposed view really is non-contiguous in the archive.
    assert sd["conv.weight_t"].shape == (3, 2)


def test_nested_checkpoint_matches_twin_without_prefix():
    ckpt = torch_load(FIXTURES / "nested_module.pt")
    assert ckpt["epoch"] == 7
    model = {k.removeprefix("module."): v for k, v in ckpt["model_state_dict"].items()}
    assert_same(model, twin(FIXTURES / "nested_module.safetensors"))


def test_params_ema_is_the_twin():
    ckpt = torch_load(FIXTURES / "params_ema_proto4.pt")
    assert ckpt["also_ema"] is ckpt["params_ema"]
    assert_same(ckpt["params_ema"], twin(FIXTURES / "params_ema_proto4.safetensors"))
    assert not np.array_equal(ckpt["params"]["body.0.weight"], ckpt["params_ema"]["body.0.weight"])


def test_legacy_files_match_twins():
    assert_same(legacy_torch_load(FIXTURES / "legacy_bare.pt"), twin(FIXTURES / "bare.safetensors"))
    ckpt = legacy_torch_load(FIXTURES / "legacy_nested_module.pt")
    model = {k.removeprefix("module."): v for k, v in ckpt["model_state_dict"].items()}
    assert_same(model, twin(FIXTURES / "nested_module.safetensors"))


@pytest.mark.parametrize("protocol_name,first_bytes", [("bare.pt", b"\x80\x02"), ("params_ema_proto4.pt", b"\x80\x04")])
def test_pickle_protocols_are_those_intended(protocol_name, first_bytes):
    with zipfile.ZipFile(FIXTURES / protocol_name) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        assert z.read(pkl)[:2] == first_bytes


def test_generator_reproduces_committed_fixtures(tmp_path):
    # A separate process: the generator registers stand-in `torch` modules.
    subprocess.run([sys.executable, str(GENERATOR), str(tmp_path)], check=True)
    made = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in FIXTURES.iterdir())
    assert made == committed
    for name in made:
        assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), name
