"""`aperture serve` against the stock Triton clients (tritonclient http + grpc).

Starts the server binary (env APERTURE_BIN, default target/debug/aperture) on free
loopback ports with a generated model repository of built-in models.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("APERTURE_BIN", REPO_ROOT / "target" / "debug" / "aperture"))

MODELS = {
    # Triton's "simple" model: OUTPUT0 = a + b, OUTPUT1 = a - b.
    "simple": 'architecture = "add_sub"\nmax_batch_size = 8\ninput_size = [16]\n',
    # A slow identity that batches: 64 clients must share executions.
    "ident": (
        'architecture = "identity"\nmax_batch_size = 32\ninput_size = [4]\n'
        "[dynamic_batching]\nmax_queue_delay_microseconds = 2000\n"
        "[parameters]\ndelay_us = 3000\n"
    ),
    # One item per 30 ms and room for 4 queued requests: bursts overflow.
    "tiny_queue": (
        'architecture = "identity"\nmax_batch_size = 1\ninput_size = [4]\n'
        "[dynamic_batching.default_queue_policy]\nmax_queue_size = 4\n"
        "[parameters]\ndelay_us = 30000\n"
    ),
    "versioned": 'architecture = "identity"\nmax_batch_size = 4\ninput_size = [2]\nversion_policy = { latest = 2 }\n',
    "spare": 'architecture = "identity"\nmax_batch_size = 4\ninput_size = [3]\n',
    # Image-to-image: RGB planes of any size.
    "img": 'architecture = "identity"\nmax_batch_size = 4\ninput_size = [3, -1, -1]\n',
    "slow": 'architecture = "identity"\nmax_batch_size = 4\ninput_size = [2]\n[parameters]\ndelay_us = 400000\n',
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIXTURES = REPO_ROOT / "tests" / "fixtures"
RESTORMER = FIXTURES / "restormer" / "withbias"
DFINE = FIXTURES / "dfine" / "tiny"


def make_repo(root: Path, real_models=False):
    for name, cfg in MODELS.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "config.toml").write_text(cfg)
        for v in (1, 2, 3) if name == "versioned" else (1,):
            (d / str(v)).mkdir()
    if real_models:
        # The repository's tiny random-weight fixtures, served like user models.
        for name, src, cfg in [
            ("enh", RESTORMER, 'architecture = "restormer"\nweights = "model.safetensors"\nmax_batch_size = 2\n'),
            ("det", DFINE, 'architecture = "dfine"\nmax_batch_size = 4\n'),
        ]:
            (root / name / "1").mkdir(parents=True)
            (root / name / "config.toml").write_text(cfg)
            for f in ["config.json", "model.safetensors", "preprocessor_config.json"]:
                if (src / f).exists():
                    shutil.copy(src / f, root / name / "1" / f)
    return root


class Server:
    def __init__(self, repo: Path, *extra, log_path: Path = None):
        if not BIN.exists():
            pytest.skip(f"server binary {BIN} not built (cargo build -p aperture-cli)")
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        cmd = [
            str(BIN), "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
            "--http-port", str(self.http), "--grpc-port", str(self.grpc),
            "--metrics-port", str(self.metrics), "--max-body-mb", "1", *extra,
        ]
        # Standard error to a file where a test reads the server's log lines (a pipe
        # nobody reads would fill up and stall a chatty server).
        self.log = open(log_path, "wb") if log_path else None
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=self.log or subprocess.PIPE
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = log_path.read_text() if log_path else self.proc.stderr.read().decode()
                raise RuntimeError(f"server exited: {err}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become ready in 30 s")

    @property
    def http_url(self):
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self):
        return f"127.0.0.1:{self.grpc}"

    def request(self, method, path, body=None, headers=None, port=None):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.http, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    s = Server(make_repo(tmp_path_factory.mktemp("repo"), real_models=True), "--device", "cpu",
               log_path=logs / "server.log")
    yield s
    s.stop()


@pytest.fixture
def hc(server):
    c = httpclient.InferenceServerClient(server.http_url)
    yield c
    c.close()


@pytest.fixture
def gc(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def simple_inputs(mod, binary=True, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, 16)).astype(np.float32)
    b = rng.standard_normal((batch, 16)).astype(np.float32)
    ins = [mod.InferInput("INPUT0", [batch, 16], "FP32"), mod.InferInput("INPUT1", [batch, 16], "FP32")]
    if mod is httpclient:
        ins[0].set_data_from_numpy(a, binary_data=binary)
        ins[1].set_data_from_numpy(b, binary_data=binary)
    else:
        ins[0].set_data_from_numpy(a)
        ins[1].set_data_from_numpy(b)
    return ins, a, b


def test_server_and_model_metadata(hc, gc):
    assert hc.is_server_live() and hc.is_server_ready()
    assert gc.is_server_live() and gc.is_server_ready()
    meta = hc.get_server_metadata()
    assert meta["name"] == "aperture"
    assert {"binary_tensor_data", "statistics", "model_repository"} <= set(meta["extensions"])
    assert "statistics" in gc.get_server_metadata().extensions

    m = hc.get_model_metadata("simple")
    assert [i["name"] for i in m["inputs"]] == ["INPUT0", "INPUT1"]
    assert m["inputs"][0]["datatype"] == "FP32" and m["inputs"][0]["shape"] == [-1, 16]
    assert m["versions"] == ["1"]
    gm = gc.get_model_metadata("simple")
    assert [o.name for o in gm.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert list(gm.outputs[1].shape) == [-1, 16]
    assert hc.is_model_ready("simple") and gc.is_model_ready("simple")
    assert not hc.is_model_ready("nope")


def test_model_config(hc, gc):
    cfg = hc.get_model_config("ident")
    assert cfg["name"] == "ident" and cfg["max_batch_size"] == 32
    assert cfg["input"][0] == {**cfg["input"][0], "name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}
    assert cfg["output"][0]["name"] == "OUTPUT0"
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert cfg["instance_group"][0]["count"] == 1
    g = gc.get_model_config("tiny_queue").config
    assert g.name == "tiny_queue" and g.max_batch_size == 1
    assert g.dynamic_batching.default_queue_policy.max_queue_size == 4
    assert list(g.input[0].dims) == [4]


@pytest.mark.parametrize("binary", [False, True])
def test_http_infer(hc, binary):
    ins, a, b = simple_inputs(httpclient, binary=binary, batch=3, seed=int(binary))
    outs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
            httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    r = hc.infer("simple", ins, outputs=outs, request_id="req-7")
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert r.get_response()["id"] == "req-7"
    # No outputs named: all come back.
    r = hc.infer("simple", ins)
    np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


@pytest.mark.parametrize("request_alg,response_alg", [("gzip", None), ("deflate", "deflate"), (None, "gzip"), ("gzip", "gzip")])
@pytest.mark.parametrize("binary", [False, True])
def test_http_infer_compressed(hc, request_alg, response_alg, binary):
    # tritonclient compresses the whole body and decompresses the answer itself from
    # its Content-Encoding (Inference-Header-Content-Length counts the plain header).
    ins, a, b = simple_inputs(httpclient, binary=binary, batch=5, seed=3)
    outs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
            httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    r = hc.infer("simple", ins, outputs=outs, request_compression_algorithm=request_alg,
                 response_compression_algorithm=response_alg)
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def test_http_compressed_answer_headers(server):
    import gzip
    import zlib
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}).encode()
    for enc, unpack in [("gzip", gzip.decompress), ("deflate", zlib.decompress)]:
        status, raw, headers = server.request(
            "POST", "/v2/models/simple/infer", body=gzip.compress(body),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                     "Accept-Encoding": f"br;q=1, {enc};q=0.8"})
        assert status == 200, raw
        headers = {k.lower(): v for k, v in headers.items()}
        assert headers["content-encoding"] == enc
        assert int(headers["content-length"]) == len(raw)
        outs = {o["name"]: o["data"] for o in json.loads(unpack(raw))["outputs"]}
        assert outs["OUTPUT0"] == [1.5] * 16 and outs["OUTPUT1"] == [0.5] * 16


def test_http_compressed_request_errors(server):
    import gzip
    limit = 1 << 20  # --max-body-mb 1
    cases = [
        # Corrupt data: 400 naming the coding.
        (b"\x1f\x8b not really gzip", "gzip", 400, "failed to decompress the gzip request body"),
        # A kilobyte that inflates past --max-body-mb: 413.
        (gzip.compress(b" " * (limit + 1)), "gzip", 413, "decompressed request body exceeds"),
        (b"x", "br", 400, "Content-Encoding 'br'"),
    ]
    for data, enc, status, needle in cases:
        got, raw, _ = server.request("POST", "/v2/models/simple/infer", body=data,
                                     headers={"Content-Type": "application/json", "Content-Encoding": enc})
        assert got == status, raw
        assert needle in raw.decode(), raw
    # Still serving.
    assert server.request("GET", "/v2/health/ready")[0] == 200


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_grpc_infer_compressed(gc, algorithm):
    ins, a, b = simple_inputs(grpcclient, batch=4, seed=5)
    r = gc.infer("simple", ins, compression_algorithm=algorithm)
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b, rtol=1e-6)



@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_grpc_compressed_answers_reach_tritonclient(tmp_path, algorithm):
    """A server started with --grpc-response-compression answers tritonclient (grpcio,
    which accepts gzip and deflate) with compressed messages it decodes to the same
    values; --max-connections leaves a client within the bound unaffected."""
    s = Server(make_repo(tmp_path / "repo"), "--grpc-response-compression", algorithm, "--max-connections", "8")
    try:
        c = grpcclient.InferenceServerClient(s.grpc_url)
        ins, a, b = simple_inputs(grpcclient, seed=11)
        r = c.infer("simple", ins, compression_algorithm=algorithm)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
        c.close()
        status, body, _ = s.request("GET", "/metrics", port=s.metrics)
        assert status == 200 and b"aperture_max_connections 8" in body
    finally:
        s.stop()

def test_grpc_compressed_request_past_the_limit(gc):
    # 1.5 MiB of zeros compresses to a few kilobytes; inflated it passes --max-body-mb 1.
    n = 3 * (1 << 16)
    ins = [grpcclient.InferInput("INPUT0", [n // 16, 16], "FP32"),
           grpcclient.InferInput("INPUT1", [n // 16, 16], "FP32")]
    for i in ins:
        i.set_data_from_numpy(np.zeros((n // 16, 16), np.float32))
    with pytest.raises(InferenceServerException) as e:
        gc.infer("simple", ins, compression_algorithm="gzip")
    assert "RESOURCE_EXHAUSTED" in str(e.value) and "size limit" in str(e.value), str(e.value)
    assert gc.is_server_live()


def test_grpc_health_checking_protocol(server):
    """grpc.health.v1.Health/Check through grpcio, as Kubernetes' gRPC probes call it:
    the messages are encoded by hand (field 1: service name; field 1: status)."""
    import grpc

    def check(service):
        req = b"\x0a" + bytes([len(service)]) + service.encode() if service else b""
        with grpc.insecure_channel(server.grpc_url) as ch:
            call = ch.unary_unary("/grpc.health.v1.Health/Check")
            return call(req, timeout=10)

    serving = b"\x08\x01"
    assert check("") == serving
    assert check("inference.GRPCInferenceService") == serving
    assert check("simple") == serving
    with pytest.raises(grpc.RpcError) as e:
        check("no_such_model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_log_settings_change_the_running_servers_level(tmp_path):
    """Triton's logging extension through both tritonclients: the settings read back,
    a change takes effect in the running process (debug lines appear in its log), and
    what cannot be done is refused with the reason."""
    log = tmp_path / "server.log"
    s = Server(make_repo(tmp_path / "repo"), "--device", "cpu", log_path=log)
    hc = httpclient.InferenceServerClient(s.http_url)
    gc = grpcclient.InferenceServerClient(s.grpc_url)
    try:
        assert hc.get_log_settings() == {
            "log_file": "", "log_info": False, "log_warnings": True, "log_errors": True,
            "log_verbose_level": 0, "log_format": "default",
        }

        def grpc_values(answer):
            return {k: next(iter(v.values())) for k, v in answer["settings"].items()}

        updated = grpc_values(gc.update_log_settings(
            {"log_info": True, "log_verbose_level": 1}, as_json=True))
        assert updated["log_verbose_level"] == 1 and updated["log_info"] is True
        assert grpc_values(gc.get_log_settings(as_json=True)) == updated
        assert hc.get_log_settings()["log_verbose_level"] == 1
        assert hc.is_server_ready()
        assert hc.update_log_settings({"log_verbose_level": 0, "log_info": False}) == {
            "log_file": "", "log_info": False, "log_warnings": True, "log_errors": True,
            "log_verbose_level": 0, "log_format": "default",
        }
        deadline = time.time() + 5
        while " DEBUG " not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert " DEBUG " in log.read_text(), "no debug line while the verbose level was 1"
        with pytest.raises(InferenceServerException) as e:
            hc.update_log_settings({"log_file": "/tmp/server.log"})
        assert "standard error" in str(e.value)
        with pytest.raises(InferenceServerException) as e:
            gc.update_log_settings({"log_errors": False})
        assert "thresholds" in str(e.value)
    finally:
        hc.close()
        gc.close()
        s.stop()


def test_trace_settings_and_trace_file(tmp_path):
    """Triton's trace extension through both tritonclients: settings read and changed
    for the server and for one model, requests sampled by the model's rate, and the
    trace file written at shutdown in Triton's layout (model objects, then timestamps)."""
    trace = tmp_path / "trace.json"
    s = Server(make_repo(tmp_path / "repo"), "--device", "cpu", "--trace-file", str(trace),
               "--trace-level", "timestamps", "--trace-rate", "1000")
    hc = httpclient.InferenceServerClient(s.http_url)
    gc = grpcclient.InferenceServerClient(s.grpc_url)
    try:
        assert "trace" in hc.get_server_metadata()["extensions"]
        got = hc.get_trace_settings()
        assert got["trace_level"] == ["TIMESTAMPS"] and got["trace_rate"] == "1000"
        assert got["trace_file"] == str(trace) and got["trace_count"] == "-1"
        # The model traces every third request, at most three; the server is unchanged.
        answer = gc.update_trace_settings(model_name="simple",
                                          settings={"trace_rate": "3", "trace_count": "3"},
                                          as_json=True)
        assert answer["settings"]["trace_rate"]["value"] == ["3"]
        assert hc.get_trace_settings(model_name="simple")["trace_count"] == "3"
        assert hc.get_trace_settings()["trace_rate"] == "1000"
        for i in range(9):
            ins, a, b = simple_inputs(httpclient if i % 2 else grpcclient, seed=i)
            client = hc if i % 2 else gc
            client.infer("simple", ins, request_id=f"r{i}")
        assert hc.get_trace_settings(model_name="simple")["trace_count"] == "0"
        # Clearing the model's rate goes back to the server's.
        cleared = hc.update_trace_settings(model_name="simple", settings={"trace_rate": None})
        assert cleared["trace_rate"] == "1000"
        with pytest.raises(InferenceServerException) as e:
            gc.update_trace_settings(settings={"trace_file": str(tmp_path / "other.json")})
        assert "--trace-file" in str(e.value)
        with pytest.raises(InferenceServerException) as e:
            hc.update_trace_settings(settings={"trace_level": ["TENSORS"]})
        assert "TENSORS" in str(e.value)
    finally:
        hc.close()
        gc.close()
        s.stop()
    # The third trace used up the count: those traces went to the first indexed file.
    objects = json.loads((tmp_path / "trace.json.0").read_text())
    assert [o["request_id"] for o in objects if "model_name" in o] == ["r2", "r5", "r8"]
    assert all(o["model_name"] == "simple" for o in objects if "model_name" in o)
    # r5 came over HTTP, r2 and r8 over gRPC: each protocol's receive and send stamps
    # frame the server's own, as Triton's trace tools expect.
    stamped = [o for o in objects if "timestamps" in o]
    for o, proto in zip(stamped, ["grpc", "http", "grpc"]):
        names = [t["name"] for t in o["timestamps"]]
        recv, send = (("HTTP_RECV", "HTTP_SEND") if proto == "http" else ("GRPC_WAITREAD", "GRPC_SEND"))
        assert names[:2] == [f"{recv}_START", f"{recv}_END"], names
        assert names[2] == "REQUEST_START" and names[-3] == "REQUEST_END", names
        assert names[-2:] == [f"{send}_START", f"{send}_END"], names
        assert "COMPUTE_START" in names and "QUEUE_START" in names
        ns = [t["ns"] for t in o["timestamps"]]
        assert ns == sorted(ns)
    assert len(stamped) == 3


def test_json_log_lines(tmp_path):
    """`--log-format json`: the logging extension reports it, and every line the server
    writes once info is on is one JSON object with a level and a message."""
    log = tmp_path / "server.log"
    s = Server(make_repo(tmp_path / "repo"), "--device", "cpu", "--log-format", "json",
               log_path=log)
    hc = httpclient.InferenceServerClient(s.http_url)
    try:
        assert hc.get_log_settings()["log_format"] == "json"
        hc.update_log_settings({"log_info": True})
        hc.unload_model("simple")
        hc.load_model("simple")
    finally:
        hc.close()
        s.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, "no JSON log line"
    assert all("level" in line and "fields" in line for line in lines)
    assert any(line["level"] == "INFO" for line in lines)


def test_grpc_infer_async_and_stream(gc, hc):
    ins, a, b = simple_inputs(grpcclient, seed=3)
    r = gc.infer("simple", ins, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert r.as_numpy("OUTPUT0") is None

    done = threading.Event()
    box = {}

    def cb(result, error):
        box["r"], box["e"] = result, error
        done.set()

    gc.async_infer("simple", ins, cb)
    assert done.wait(10)
    assert box["e"] is None
    np.testing.assert_allclose(box["r"].as_numpy("OUTPUT0"), a + b, rtol=1e-6)

    # HTTP async (gevent pool inside tritonclient).
    hins, ha, hb = simple_inputs(httpclient, seed=4)
    np.testing.assert_allclose(hc.async_infer("simple", hins).get_result().as_numpy("OUTPUT0"), ha + hb, rtol=1e-6)

    # Streaming: each response matches its request id.
    got = {}
    all_in = threading.Event()

    def scb(result, error):
        if error is None:
            got[result.get_response().id] = result.as_numpy("OUTPUT0")
        else:
            got[f"err{len(got)}"] = error
        if len(got) == 5:
            all_in.set()

    gc.start_stream(callback=scb)
    expected = {}
    for i in range(5):
        sins, sa, sb = simple_inputs(grpcclient, seed=10 + i)
        expected[str(i)] = sa + sb
        gc.async_stream_infer("simple", sins, request_id=str(i))
    assert all_in.wait(10)
    gc.stop_stream()
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6)


def test_statistics(hc, gc):
    ins, _, _ = simple_inputs(httpclient)
    hc.infer("simple", ins)
    s = hc.get_inference_statistics("simple")["model_stats"][0]
    assert s["name"] == "simple" and s["version"] == "1"
    assert s["inference_count"] >= 1 and s["execution_count"] >= 1
    for f in ["success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss"]:
        assert set(s["inference_stats"][f]) == {"count", "ns"}, f
    assert s["inference_stats"]["success"]["count"] >= 1
    assert s["batch_stats"] and s["batch_stats"][0]["batch_size"] >= 1
    g = gc.get_inference_statistics("simple").model_stats[0]
    assert g.inference_stats.success.count >= 1 and g.execution_count >= 1
    names = {m["name"] for m in hc.get_inference_statistics()["model_stats"]}
    assert {"simple", "ident"} <= names


def test_versions(hc, gc):
    assert hc.get_model_metadata("versioned")["versions"] == ["2", "3"]
    assert hc.is_model_ready("versioned", "2") and not hc.is_model_ready("versioned", "1")
    x = np.array([[1.5, -2.0]], dtype=np.float32)
    inp = httpclient.InferInput("INPUT0", [1, 2], "FP32")
    inp.set_data_from_numpy(x)
    r = hc.infer("versioned", [inp], model_version="2")
    assert r.get_response()["model_version"] == "2"
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
    with pytest.raises(InferenceServerException, match="version 1"):
        hc.infer("versioned", [inp], model_version="1")
    with pytest.raises(InferenceServerException, match="not found"):
        gc.get_model_metadata("versioned", "9")


def test_repository_load_unload(hc, gc):
    index = {m["name"]: m for m in hc.get_model_repository_index()}
    assert index["spare"]["state"] == "READY"
    hc.unload_model("spare")
    assert not hc.is_model_ready("spare")
    assert hc.is_model_ready("simple"), "unloading one model must not touch another"
    states = {m.name: m.state for m in gc.get_model_repository_index().models}
    assert states["spare"] == "UNAVAILABLE"
    gc.load_model("spare")
    assert gc.is_model_ready("spare")
    gc.unload_model("spare")
    assert not gc.is_model_ready("spare")
    hc.load_model("spare")
    assert hc.is_model_ready("spare")
    with pytest.raises(InferenceServerException):
        hc.load_model("does_not_exist")


def test_64_concurrent_clients_get_their_own_answers(server):
    def client(i):
        c = httpclient.InferenceServerClient(server.http_url)
        try:
            out = []
            for k in range(3):
                x = np.full((1, 4), i * 10 + k, dtype=np.float32) + np.arange(4, dtype=np.float32) / 8
                inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
                inp.set_data_from_numpy(x)
                r = c.infer("ident", [inp])
                out.append((x, r.as_numpy("OUTPUT0")))
            return out
        finally:
            c.close()

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(client, range(64)))
    for per_client in results:
        for sent, got in per_client:
            np.testing.assert_array_equal(got, sent)
    c = httpclient.InferenceServerClient(server.http_url)
    s = c.get_inference_statistics("ident")["model_stats"][0]
    c.close()
    assert s["inference_count"] == 64 * 3
    assert s["execution_count"] < 64 * 3
    assert max(b["batch_size"] for b in s["batch_stats"]) > 1


def raw_infer_body(values):
    return json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": values}]})


def test_overload_gets_429_then_recovers(server):
    def one(i):
        return server.request("POST", "/v2/models/tiny_queue/infer", raw_infer_body([i, i, i, i]))

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    codes = [r[0] for r in results]
    assert codes.count(429) >= 10, codes
    assert codes.count(200) >= 4, codes
    assert set(codes) <= {200, 429}
    busy = next(r for r in results if r[0] == 429)
    assert "queue" in json.loads(busy[1])["error"]
    status, body, _ = one(7)
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [7, 7, 7, 7]

    # The same burst over gRPC: RESOURCE_EXHAUSTED, then normal service.
    g = grpcclient.InferenceServerClient(server.grpc_url)
    results, done = [], threading.Event()

    def cb(result, error):
        results.append(error)
        if len(results) == 40:
            done.set()

    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    for _ in range(40):
        g.async_infer("tiny_queue", [inp], cb)
    assert done.wait(20)
    errors = [e for e in results if e is not None]
    assert len(errors) >= 10
    assert all("RESOURCE_EXHAUSTED" in str(e.status()) for e in errors), errors[0]
    np.testing.assert_array_equal(g.infer("tiny_queue", [inp]).as_numpy("OUTPUT0"), np.ones((1, 4), np.float32))
    g.close()


@pytest.mark.parametrize(
    "path,body,headers,status,needle",
    [
        ("/v2/models/simple/infer", "{oops", {}, 400, "parse"),
        ("/v2/models/ident/infer",
         json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]}),
         {}, 400, "INT32"),
        ("/v2/models/ident/infer",
         json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}),
         {}, 400, "shape"),
        ("/v2/models/ident/infer",
         json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 16}}]}).encode() + b"\0" * 8,
         "HEADER", 400, "end of binary data"),
        ("/v2/models/ident/infer", raw_infer_body([1, 2, 3, 4]),
         {"Inference-Header-Content-Length": "100000"}, 400, "Inference-Header-Content-Length"),
        ("/v2/models/nope/infer", raw_infer_body([1, 2, 3, 4]), {}, 404, "unknown model"),
        ("/v2/models/ident/versions/7/infer", raw_infer_body([1, 2, 3, 4]), {}, 404, "version 7"),
        ("/v2/models/ident/infer", b"x" * (2 << 20), {}, 413, "limit"),
        ("/v2/models/ident/infer",
         json.dumps({"inputs": [{"name": "INPUT0", "shape": [1 << 30, 1 << 30], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 16}}]}).encode() + b"\0" * 16,
         "HEADER", 400, "more than"),
        # The model itself refuses (Restormer needs sides divisible by 8): still a 400.
        ("/v2/models/enh/infer",
         json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 6, 6], "datatype": "FP32", "data": [0.5] * 108}]}),
         {}, 400, "multiples of 8"),
        ("/v2/models/ident/infer",
         json.dumps({"inputs": [{"name": "WRONG", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}),
         {}, 400, "INPUT0"),
    ],
)
def test_malformed_requests_get_clear_4xx(server, path, body, headers, status, needle):
    if headers == "HEADER":
        head_len = body.index(b"}]}") + 3
        headers = {"Inference-Header-Content-Length": str(head_len)}
    got, resp, _ = server.request("POST", path, body, headers)
    assert got == status, resp
    err = json.loads(resp)["error"]
    assert needle.lower() in err.lower(), err
    # The server keeps serving.
    assert server.request("GET", "/v2/health/live")[0] == 200


def test_grpc_errors_have_triton_codes(gc):
    with pytest.raises(InferenceServerException) as e:
        gc.get_model_metadata("nope")
    assert "NOT_FOUND" in str(e.value.status())
    inp = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as e:
        gc.infer("ident", [inp])
    assert "INVALID_ARGUMENT" in str(e.value.status())


def test_metrics(server):
    c = httpclient.InferenceServerClient(server.http_url)
    ins, _, _ = simple_inputs(httpclient)
    c.infer("simple", ins)
    c.close()
    status, body, _ = server.request("GET", "/metrics", port=server.metrics)
    text = body.decode()
    assert status == 200
    for name in ["nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                 "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count",
                 "aperture_batch_size_bucket"]:
        assert f'{name}{{model="simple",version="1"' in text, name
    line = next(l for l in text.splitlines() if l.startswith('nv_inference_request_success{model="simple"'))
    assert int(line.split()[-1]) >= 1


def test_api_keys_and_graceful_shutdown(tmp_path):
    s = Server(make_repo(tmp_path / "repo"), "--api-key", "sesame", "--admin-key", "root")
    try:
        assert s.request("GET", "/v2/health/live")[0] == 200
        assert s.request("GET", "/v2/models/simple")[0] == 401
        assert s.request("GET", "/v2/models/simple", headers={"Authorization": "Bearer sesame"})[0] == 200
        assert s.request("POST", "/v2/repository/index", b"{}", {"Authorization": "Bearer sesame"})[0] == 401
        assert s.request("POST", "/v2/repository/index", b"{}", {"X-Api-Key": "root"})[0] == 200
        g = grpcclient.InferenceServerClient(s.grpc_url)
        with pytest.raises(InferenceServerException):
            g.get_model_metadata("simple")
        assert g.get_model_metadata("simple", headers={"authorization": "Bearer sesame"}).name == "simple"
        g.close()

        # SIGTERM while a slow request runs: it still gets its answer, then the process exits 0.
        box = {}
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [3, 4]}]})
        t = threading.Thread(target=lambda: box.update(r=s.request(
            "POST", "/v2/models/slow/infer", body, {"Authorization": "Bearer sesame"})))
        t.start()
        time.sleep(0.15)
        s.proc.send_signal(signal.SIGTERM)
        t.join(10)
        assert box["r"][0] == 200 and json.loads(box["r"][1])["outputs"][0]["data"] == [3, 4]
        assert s.proc.wait(timeout=10) == 0
    finally:
        s.stop()


def png_bytes(arr):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width, height):
    """A PNG whose header declares width x height pixels (the data is not there)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_image_enhance_round_trip(server):
    from PIL import Image
    import io

    rng = np.random.default_rng(5)
    arr = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    status, body, headers = server.request("POST", "/v1/models/img/enhance", png_bytes(arr))
    assert status == 200, body
    assert headers.get("content-type") == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")), arr)
    status, body, headers = server.request("POST", "/v1/models/img/enhance?format=jpeg", png_bytes(arr))
    assert status == 200 and headers.get("content-type") == "image/jpeg" and body[:2] == b"\xff\xd8"


def test_image_enhance_multipart(server):
    """`curl -F image=@photo.png` style uploads work like raw bodies."""
    from PIL import Image
    import io

    arr = np.random.default_rng(6).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    boundary = "----aperture-test"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png_bytes(arr) + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, resp, _ = server.request("POST", "/v1/models/img/enhance", body, headers)
    assert status == 200, resp
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(resp)).convert("RGB")), arr)


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/v1/models/img/enhance", b"definitely not an image", 400, "image"),
        ("/v1/models/img/enhance", bomb_png(100_000, 100_000), 413, "pixels"),
        ("/v1/models/img/detect", png_bytes(np.zeros((4, 4, 3), np.uint8)), 400, "does not detect"),
        ("/v1/models/simple/enhance", png_bytes(np.zeros((4, 4, 3), np.uint8)), 400, "no image pipeline"),
        ("/v1/models/nope/detect", png_bytes(np.zeros((4, 4, 3), np.uint8)), 404, "unknown model"),
    ],
)
def test_image_endpoint_errors(server, path, body, status, needle):
    got, resp, _ = server.request("POST", path, body)
    assert got == status, resp
    err = json.loads(resp)["error"]
    assert needle in err.lower(), err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_loadgen_csv(server, tmp_path, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    csv = tmp_path / "out.csv"
    r = subprocess.run(
        [str(BIN), "loadgen", "-m", "simple", "-u", url, "-i", protocol, "--concurrency-range", "1,4",
         "--measurement-interval", "300", "--warmup-ms", "50", "--csv", str(csv)],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    lines = csv.read_text().splitlines()
    assert lines[0].split(",")[:2] == ["Concurrency", "Inferences/Second"]
    assert lines[0].split(",")[-4:] == ["p50 latency", "p90 latency", "p95 latency", "p99 latency"]
    rows = [l.split(",") for l in lines[1:]]
    assert [r[0] for r in rows] == ["1", "4"]
    assert all(float(r[1]) > 0 for r in rows)
    assert all(int(r[9]) <= int(r[12]) for r in rows), "p50 must not exceed p99"


def test_loadgen_image_bodies(server, tmp_path):
    img = tmp_path / "in.png"
    img.write_bytes(png_bytes(np.full((8, 8, 3), 200, np.uint8)))
    r = subprocess.run(
        [str(BIN), "loadgen", "-m", "img", "-u", server.http_url, "--image", str(img), "--task", "enhance",
         "--concurrency-range", "2", "--measurement-interval", "300", "--warmup-ms", "50"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[1].split()
    assert row[0] == "2" and float(row[1]) > 0 and row[3] == "0", r.stdout


def test_loadgen_request_rate_mode(server, tmp_path):
    csv = tmp_path / "rate.csv"
    r = subprocess.run(
        [str(BIN), "loadgen", "-m", "simple", "-u", server.http_url, "--request-rate-range", "100,200",
         "--concurrency-range", "4", "--measurement-interval", "500", "--warmup-ms", "50", "--csv", str(csv)],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("Request Rate,Inferences/Second")
    rows = [l.split(",") for l in lines[1:]]
    assert [float(x[0]) for x in rows] == [100.0, 200.0]
    for rate, row in zip([100, 200], rows):
        assert 0.6 * rate <= float(row[1]) <= 1.2 * rate, row


def test_enhance_matches_aperture_enhance(server, tmp_path):
    """A Restormer served over /v1/.../enhance gives the CLI's pixels (odd size: padded and cropped)."""
    from PIL import Image
    import io

    rng = np.random.default_rng(9)
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes(rng.integers(0, 256, size=(21, 30, 3), dtype=np.uint8)))
    status, body, _ = server.request("POST", "/v1/models/enh/enhance", src.read_bytes())
    assert status == 200, body
    out = tmp_path / "cli.png"
    r = subprocess.run([str(BIN), "enhance", "--model", str(RESTORMER / "model.safetensors"), "--device", "cpu",
                        "-o", str(out), str(src)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    want = np.asarray(Image.open(out).convert("RGB"))
    assert got.shape == (21, 30, 3)
    np.testing.assert_array_equal(got, want)


def test_detect_matches_aperture_detect(server, tmp_path):
    """A D-FINE served over /v1/.../detect finds what `aperture detect` finds."""
    image = REPO_ROOT.parent / "shared" / "data" / "images" / "000000039769.png"
    if not image.exists():
        image = tmp_path / "img.png"
        image.write_bytes(png_bytes(np.random.default_rng(2).integers(0, 256, (120, 160, 3), dtype=np.uint8)))
    status, body, _ = server.request("POST", "/v1/models/det/detect?threshold=0.2", image.read_bytes())
    assert status == 200, body
    got = json.loads(body)
    out = tmp_path / "d.json"
    r = subprocess.run([str(BIN), "detect", "--model", str(DFINE), "--threshold", "0.2", "--json", str(out),
                        str(image)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    want = json.loads(out.read_text())["images"][0]["detections"]
    assert len(got["detections"]) == len(want) > 0
    for g, w in zip(got["detections"], want):
        assert g["label"] == w["label"]
        assert abs(g["score"] - w["score"]) < 1e-6
        np.testing.assert_allclose(g["bbox"], w["box"], rtol=1e-5, atol=1e-3)
    assert got["width"] > 0 and got["height"] > 0


def test_shutdown_does_not_wait_forever_for_open_streams(tmp_path):
    s = Server(make_repo(tmp_path / "repo"), "--shutdown-grace-s", "1")
    try:
        g = grpcclient.InferenceServerClient(s.grpc_url)
        got = threading.Event()
        g.start_stream(callback=lambda result, error: got.set())
        ins, _, _ = simple_inputs(grpcclient)
        g.async_stream_infer("simple", ins)
        assert got.wait(10)
        start = time.time()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=10) == 0
        assert time.time() - start < 6
        try:
            g.stop_stream()
            g.close()
        except Exception:  # the server is gone; closing may complain
            pass
    finally:
        s.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bytes_input_of_encoded_images(server, protocol):
    """A KServe BYTES input of PNG files: decoded and preprocessed in the server."""
    mod = httpclient if protocol == "http" else grpcclient
    c = mod.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    rng = np.random.default_rng(11)
    arrs = [rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8) for _ in range(2)]
    data = np.array([png_bytes(a) for a in arrs], dtype=np.object_)
    inp = mod.InferInput("IMAGE", [2], "BYTES")
    inp.set_data_from_numpy(data)
    out = c.infer("img", [inp]).as_numpy("OUTPUT0")
    assert out.shape == (2, 3, 6, 10)
    for got, arr in zip(out, arrs):
        np.testing.assert_allclose(got, arr.transpose(2, 0, 1) / 255.0, atol=1e-6)
    with pytest.raises(InferenceServerException, match="image pipeline"):
        c.infer("simple", [inp])
    c.close()
