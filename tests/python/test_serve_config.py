"""config.toml settings that reach the model builders: precision (and GPU index)."""
import json
import shutil

from test_server import RESTORMER, Server


def test_precision_from_config_toml_reaches_the_builder(tmp_path):
    for name, precision in [("enh_fp16", "fp16"), ("enh_bad", "fp99")]:
        d = tmp_path / name / "1"
        d.mkdir(parents=True)
        (tmp_path / name / "config.toml").write_text(
            f'architecture = "restormer"\nweights = "model.safetensors"\nprecision = "{precision}"\n')
        for f in ["config.json", "model.safetensors"]:
            shutil.copy(RESTORMER / f, d / f)
    s = Server(tmp_path, "--device", "cpu")
    try:
        status, body, _ = s.request("POST", "/v2/repository/index", body=b"{}")
        assert status == 200
        index = {m["name"]: m for m in json.loads(body)}
        # fp16 on the CPU backend computes in fp32 (with a warning) and serves.
        assert index["enh_fp16"]["state"] == "READY"
        assert index["enh_bad"]["state"] == "UNAVAILABLE"
        assert "fp99" in index["enh_bad"].get("reason", ""), index["enh_bad"]
    finally:
        s.stop()
