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


def test_s3_reads_benchmark_runs_small_and_prints_its_four_lines():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "s3_reads.py"), "--images", "768", "--members", "3",
                          "--rounds", "1", "--delay-ms", "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(":")[0]: float(line.split(":")[1]) for line in out.stdout.splitlines()
             if line and not line.startswith("#")}
    assert set(lines) == {"s3_end_of_run_read_ahead_vs_sequential",
                          "s3_end_of_run_read_ahead_vs_sequential_5ms_round_trip",
                          "s3_reducer_reads_ahead_vs_sequential", "s3_reducer_reads_ahead_vs_sequential_5ms_round_trip"}
    assert all(v > 0 for v in lines.values())
    assert "3 shards x 4 files" in out.stdout and "one shard's 3 member units" in out.stdout
