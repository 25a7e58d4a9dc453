"""tools/dfine_ab.sh: argument handling (the runs themselves need the GPU machine)."""
import subprocess
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "dfine_ab.sh"


def test_without_a_switch_and_values_it_prints_usage_and_exits_2():
    for args in ([], ["APERTURE_DEFORMABLE"]):
        r = subprocess.run(["bash", str(TOOL), *args], capture_output=True, text=True)
        assert r.returncode == 2
        assert "usage:" in r.stderr and "VARIABLE VALUE" in r.stderr
