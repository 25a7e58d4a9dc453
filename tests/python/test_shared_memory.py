"""Triton's system shared-memory extension in `aperture serve`, driven by the stock
tritonclient (HTTP and gRPC) and its `tritonclient.utils.shared_memory` regions.

Starts the server binary (env APERTURE_BIN, default target/debug/aperture) on free
loopback ports with the built-in `add_sub` ("simple") and `identity` models.
"""

import os

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from test_server import Server  # noqa: E402

MODELS = {
    "simple": 'architecture = "add_sub"\nmax_batch_size = 8\ninput_size = [16]\n',
    "ident": 'architecture = "identity"\nmax_batch_size = 4\ninput_size = [3, 8]\n',
}
BATCH = 2
NBYTES = BATCH * 16 * 4  # one [2, 16] FP32 tensor


def make_repo(root):
    for name, cfg in MODELS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.toml").write_text(cfg)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(make_repo(tmp_path_factory.mktemp("shmrepo")), "--device", "cpu")
    yield s
    s.stop()


class Regions:
    """Shared-memory objects created for one test, destroyed (unlinked) afterwards."""

    def __init__(self):
        self.handles = []

    def create(self, name, byte_size):
        key = f"/aperture_{os.getpid()}_{name}"
        h = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(h)
        return h, key

    def close(self):
        for h in self.handles:
            shm.destroy_shared_memory_region(h)


@pytest.fixture
def regions():
    r = Regions()
    yield r
    r.close()


@pytest.fixture(params=["http", "grpc"])
def client(request, server):
    if request.param == "http":
        c = httpclient.InferenceServerClient(server.http_url)
        mod = httpclient
    else:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        mod = grpcclient
    c.unregister_system_shared_memory()
    yield c, mod
    c.unregister_system_shared_memory()
    c.close()


def status_list(c, name=""):
    """Both clients' status answers as [{name, key, offset, byte_size}]."""
    st = c.get_system_shared_memory_status(name)
    if isinstance(st, list):  # HTTP: Triton's JSON list
        return sorted(
            ({k: r[k] for k in ("name", "key", "offset", "byte_size")} for r in st),
            key=lambda r: r["name"],
        )
    return sorted(
        ({"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in st.regions.values()),
        key=lambda r: r["name"],
    )


def inputs_ab(seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((BATCH, 16)).astype(np.float32),
            rng.standard_normal((BATCH, 16)).astype(np.float32))


def test_inputs_and_outputs_in_shared_memory_match_the_body_path(client, regions):
    c, mod = client
    a, b = inputs_ab(1)
    # Inputs side by side in one region (the second at an offset), outputs in another.
    in_h, in_key = regions.create("in", 2 * NBYTES)
    out_h, out_key = regions.create("out", 2 * NBYTES)
    shm.set_shared_memory_region(in_h, [a, b])
    c.register_system_shared_memory("in", in_key, 2 * NBYTES)
    c.register_system_shared_memory("out", out_key, 2 * NBYTES)
    assert status_list(c) == [
        {"name": "in", "key": in_key, "offset": 0, "byte_size": 2 * NBYTES},
        {"name": "out", "key": out_key, "offset": 0, "byte_size": 2 * NBYTES},
    ]
    assert status_list(c, "out") == [{"name": "out", "key": out_key, "offset": 0, "byte_size": 2 * NBYTES}]

    ins = [mod.InferInput("INPUT0", [BATCH, 16], "FP32"), mod.InferInput("INPUT1", [BATCH, 16], "FP32")]
    ins[0].set_shared_memory("in", NBYTES)
    ins[1].set_shared_memory("in", NBYTES, offset=NBYTES)
    outs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
    outs[0].set_shared_memory("out", NBYTES)
    outs[1].set_shared_memory("out", NBYTES, offset=NBYTES)
    r = c.infer("simple", ins, outputs=outs)
    sum_ = shm.get_contents_as_numpy(out_h, np.float32, [BATCH, 16])
    diff = shm.get_contents_as_numpy(out_h, np.float32, [BATCH, 16], offset=NBYTES)

    # The same request with tensors in the body.
    body_ins = [mod.InferInput("INPUT0", [BATCH, 16], "FP32"), mod.InferInput("INPUT1", [BATCH, 16], "FP32")]
    body_ins[0].set_data_from_numpy(a)
    body_ins[1].set_data_from_numpy(b)
    ref = c.infer("simple", body_ins)
    np.testing.assert_array_equal(sum_, ref.as_numpy("OUTPUT0"))
    np.testing.assert_array_equal(diff, ref.as_numpy("OUTPUT1"))
    np.testing.assert_allclose(sum_, a + b, rtol=1e-6)

    # The answer names the region instead of carrying data.
    out1 = r.get_output("OUTPUT1")
    if mod is httpclient:
        assert "data" not in out1
        p = out1["parameters"]
        assert p["shared_memory_region"] == "out" and p["shared_memory_byte_size"] == NBYTES
        assert p["shared_memory_offset"] == NBYTES
        assert out1["shape"] == [BATCH, 16]
    else:
        assert out1.parameters["shared_memory_region"].string_param == "out"
        assert out1.parameters["shared_memory_byte_size"].int64_param == NBYTES
        assert list(out1.shape) == [BATCH, 16]
        assert len(r.get_response().raw_output_contents) == 0

    c.unregister_system_shared_memory("in")
    assert [s["name"] for s in status_list(c)] == ["out"]
    c.unregister_system_shared_memory()
    assert status_list(c) == []


def test_shared_memory_input_with_output_in_the_body(client, regions):
    c, mod = client
    x = np.arange(BATCH * 3 * 8, dtype=np.float32).reshape(BATCH, 3, 8) * 0.25
    h, key = regions.create("img", x.nbytes + 64)
    shm.set_shared_memory_region(h, [x], offset=64)
    # A region that starts 64 bytes into the object.
    c.register_system_shared_memory("img", key, x.nbytes, offset=64)
    assert status_list(c, "img")[0]["offset"] == 64
    inp = mod.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_shared_memory("img", x.nbytes)
    r = c.infer("ident", [inp])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)


def test_output_in_shared_memory_before_one_in_the_body(client, regions):
    c, mod = client
    a, b = inputs_ab(2)
    h, key = regions.create("o0", NBYTES)
    c.register_system_shared_memory("o0", key, NBYTES)
    ins = [mod.InferInput("INPUT0", [BATCH, 16], "FP32"), mod.InferInput("INPUT1", [BATCH, 16], "FP32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    outs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
    outs[0].set_shared_memory("o0", NBYTES)
    r = c.infer("simple", ins, outputs=outs)
    np.testing.assert_allclose(shm.get_contents_as_numpy(h, np.float32, [BATCH, 16]), a + b, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def expect_error(fn, *needles):
    with pytest.raises(InferenceServerException) as e:
        fn()
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    return e.value


def test_errors(client, regions):
    c, mod = client
    h, key = regions.create("small", NBYTES)
    # A missing key names it; out-of-range registrations and duplicates are refused.
    expect_error(lambda: c.register_system_shared_memory("x", f"/aperture_{os.getpid()}_missing", 8),
                 f"/aperture_{os.getpid()}_missing")
    expect_error(lambda: c.register_system_shared_memory("x", key, NBYTES, offset=8), "exceed")
    c.register_system_shared_memory("small", key, NBYTES)
    expect_error(lambda: c.register_system_shared_memory("small", key, 8), "already in manager")
    assert status_list(c) == [{"name": "small", "key": key, "offset": 0, "byte_size": NBYTES}]

    def infer_with(region, byte_size, offset=0, out=None):
        ins = [mod.InferInput("INPUT0", [BATCH, 16], "FP32"), mod.InferInput("INPUT1", [BATCH, 16], "FP32")]
        ins[0].set_shared_memory(region, byte_size, offset=offset)
        ins[1].set_data_from_numpy(np.zeros((BATCH, 16), np.float32))
        outs = None
        if out is not None:
            o = mod.InferRequestedOutput("OUTPUT0")
            o.set_shared_memory(*out)
            outs = [o]
        return lambda: c.infer("simple", ins, outputs=outs)

    expect_error(infer_with("nope", NBYTES), "Unable to find system shared memory region: 'nope'")
    expect_error(infer_with("small", NBYTES, offset=4), "Invalid offset + byte size", "'small'")
    expect_error(infer_with("small", NBYTES - 4), "INPUT0", "needs 128 bytes")
    # An output region smaller than the output.
    h2, key2 = regions.create("tiny", 16)
    c.register_system_shared_memory("tiny", key2, 16)
    expect_error(infer_with("small", NBYTES, out=("tiny", 16)), "OUTPUT0", "at least 128 bytes")
    expect_error(infer_with("small", NBYTES, out=("tiny", 32)), "Invalid offset + byte size", "'tiny'")
    # The regions still work after the refusals.
    ok = infer_with("small", NBYTES)()
    assert ok.as_numpy("OUTPUT0").shape == (BATCH, 16)


def test_http_status_codes_and_api_key(tmp_path, regions):
    s = Server(make_repo(tmp_path / "repo"), "--api-key", "sesame", "--admin-key", "root")
    try:
        h, key = regions.create("auth", 64)
        body = f'{{"key": "{key}", "offset": 0, "byte_size": 64}}'
        assert s.request("POST", "/v2/systemsharedmemory/region/r/register", body)[0] == 401
        auth = {"Authorization": "Bearer sesame"}
        assert s.request("POST", "/v2/systemsharedmemory/region/r/register", body, auth)[0] == 200
        st, out, _ = s.request("GET", "/v2/systemsharedmemory/region/r/status", headers=auth)
        assert st == 200 and b'"byte_size":64' in out
        assert s.request("GET", "/v2/systemsharedmemory/region/zz/status", headers=auth)[0] == 404
        st, out, _ = s.request("POST", "/v2/systemsharedmemory/region/q/register", b"{}", auth)
        assert st == 400 and b"key" in out
        assert s.request("POST", "/v2/systemsharedmemory/unregister", b"", auth)[0] == 200
        st, out, _ = s.request("GET", "/v2/systemsharedmemory/status", headers=auth)
        assert st == 200 and out.strip() == b"[]"
        st, out, _ = s.request("GET", "/v2", headers=auth)
        assert b"system_shared_memory" in out
        g = grpcclient.InferenceServerClient(s.grpc_url)
        try:
            e = expect_error(lambda: g.register_system_shared_memory("g", key, 64))
            assert "UNAUTHENTICATED" in str(e.status())
            g.register_system_shared_memory("g", key, 64, headers={"authorization": "Bearer sesame"})
            st = g.get_system_shared_memory_status(headers={"authorization": "Bearer sesame"})
            assert list(st.regions) == ["g"] and st.regions["g"].key == key
            e = expect_error(lambda: g.get_system_shared_memory_status("zz", headers={"x-api-key": "sesame"}))
            assert "NOT_FOUND" in str(e.status())
            assert "system_shared_memory" in g.get_server_metadata(headers={"x-api-key": "sesame"}).extensions
        finally:
            g.close()
    finally:
        s.stop()


def test_loadgen_sends_tensors_through_shared_memory(server):
    # `aperture loadgen --shared-memory system`: inputs registered once, every request
    # names the regions; the server counts the inferences and the regions are gone after.
    import subprocess

    from test_server import BIN

    hc = httpclient.InferenceServerClient(server.http_url)
    before = hc.get_inference_statistics("simple")["model_stats"][0]["inference_count"]
    r = subprocess.run(
        [str(BIN), "loadgen", "-m", "simple", "-u", server.http_url, "--shared-memory", "system",
         "-b", "2", "--concurrency-range", "2", "--measurement-interval", "300", "--warmup-ms", "50"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[1].split()
    assert row[0] == "2" and float(row[1]) > 0 and row[3] == "0", r.stdout
    after = hc.get_inference_statistics("simple")["model_stats"][0]["inference_count"]
    assert after > before
    assert hc.get_system_shared_memory_status() == []
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("aperture-loadgen-")]
    bad = subprocess.run(
        [str(BIN), "loadgen", "-m", "simple", "-u", server.grpc_url, "-i", "grpc", "--shared-memory", "system"],
        capture_output=True, text=True, timeout=30,
    )
    assert bad.returncode != 0 and "over HTTP" in bad.stderr
