"""The device-call scripts' argument handling (the runs themselves need the GPU machine)."""
import os
import subprocess
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.mark.parametrize("script", ["wgmma_check.sh", "dfine_vs_compile.sh"])
def test_without_a_binary_it_names_the_missing_path_and_exits_2(tmp_path, script):
    env = dict(os.environ, APERTURE_BIN=str(tmp_path / "none"), OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", str(TOOLS / script)], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert str(tmp_path / "none") in r.stderr
    assert not (tmp_path / "out").exists()
