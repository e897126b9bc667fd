"""The benchmark scripts stay runnable: they import the package's current API and parse their options."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, option", [("run.py", "--only"), ("gpu.py", "--smoke")])
def test_benchmark_script_imports_and_lists_its_options(script, option):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert option in out.stdout
