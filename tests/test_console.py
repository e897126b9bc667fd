"""A quiet console: a run prints the project's own lines and, on a terminal, one progress bar; none of
Ray's warnings reach the user."""

import io
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from imagesets import make_image_folder, tiny_spec

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# What Ray's Python loggers print ("2026-12-02 04:23:46,100\tWARNING file.py:85 -- ..."), its C++ logs
# ("[2026-12-02 04:23:46,100 E 123 456] core_worker.cc:..."), and lines forwarded from its workers.
RAY_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR)|^\[\d{4}-\d\d-\d\d .*\] |"
                      r"^\((raylet|\w+ pid=\d+)")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_bar_counts_rate_and_time_left_and_lines_pass_above_it(monkeypatch):
    from ray_consensus import console

    clock, out = Clock(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    with console.Progress(200, stream=out, clock=clock) as bar:
        assert "0/200 image×member" in bar.text() and "ETA -" in bar.text()
        clock.t += 10
        bar.add(50)  # 5 per second, 150 left: 30 s
        assert "50/200 image×member" in bar.text() and "5.0/s" in bar.text() and "ETA 30s" in bar.text()
        console.say("a line of ours")
        clock.t += 290
        bar.add(100)  # 150 in 300 s: 0.5/s, 50 left: 1m 40s
        assert "ETA 1m 40s" in bar.text()
        bar.note("reduce 3/7 shards")
        bar.add(500)  # never past the total
        assert "200/200" in bar.text() and "done in 5m 00s" in bar.text() and bar.text().endswith("reduce 3/7 shards")
    screen = out.getvalue()
    # The line was written on a cleared line, and the bar drawn again after it.
    before, after = screen.split("[ray-consensus] a line of ours\n")
    assert before.endswith("\r\x1b[2K") and after.startswith("\r\x1b[2K[ray-consensus] attributions")
    assert screen.endswith("\n") and console._bar is None
    assert console.duration(7325) == "2h 02m"


def test_errors_of_rays_own_processes_become_one_line_of_ours_per_source(monkeypatch):
    from ray_consensus import console

    out, passed = io.StringIO(), []
    monkeypatch.setattr(sys, "stderr", out)
    logs = console.RayLogs(passed.append)
    disk = ("[2026-12-02 18:08:{s},864 E 27487 27498] (raylet) file_system_monitor.cc:116: /tmp/ray/session_x is over "
            "95% full, available space: {gb} GB; capacity: 251.972 GB.")
    with console.Progress(10, stream=out):
        logs({"pid": "raylet", "is_err": True, "lines": [disk.format(s=49, gb="12.0128")]})
        logs({"pid": "raylet", "is_err": True, "lines": [disk.format(s=59, gb="12.0001"), "a line without a source"]})
        worker = {"pid": 123, "is_err": False, "lines": ["printed by a worker"]}
        logs(worker)
    lines = [ANSI.sub("", p).strip() for p in re.split(r"[\r\n]+", out.getvalue())]
    ours = [p for p in lines if p.startswith("[ray-consensus] Ray's raylet: ")]
    assert ours == ["[ray-consensus] Ray's raylet: /tmp/ray/session_x is over 95% full, available space: 12.0128 GB; "
                    "capacity: 251.972 GB.", "[ray-consensus] Ray's raylet: a line without a source"], ours
    assert not [p for p in lines if RAY_LINE.search(p)]
    assert passed == [worker]  # a worker's batch goes to Ray's printer as it came


@pytest.mark.slow
def test_a_run_on_a_terminal_shows_our_lines_and_one_bar_and_no_ray_logs(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=8)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(data, str(tmp_path / "run"))))
    master, slave = pty.openpty()  # stderr on a terminal, as a user at a shell has it
    # The package beside these tests, whatever the virtualenv's editable install points at.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("RAY_ADDRESS", None)
    # The raylet's disk warning, as on a machine whose disk is over 95% full (CI's was): over 1% here.
    env["RAY_local_fs_capacity_threshold"] = "0.01"
    proc = subprocess.Popen([sys.executable, "-m", "ray_consensus", "run", str(spec_file)], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: the run has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout = proc.stdout.read().decode()
    assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")
    os.close(master)
    screen = b"".join(chunks).decode()
    pieces = [ANSI.sub("", p).strip() for p in re.split(r"[\r\n]+", screen)]
    pieces = [p for p in pieces if p]
    ray_lines = [p for p in pieces if RAY_LINE.search(p) or "WARNING" in p or "core_worker" in p]
    assert not ray_lines, ray_lines
    disk = [p for p in pieces if p.startswith("[ray-consensus] Ray's raylet: ")]
    assert len(disk) == 1 and "is over 1% full" in disk[0], disk  # one line of ours for the raylet's many
    assert all(p.startswith("[ray-consensus]") for p in pieces), [p for p in pieces if not p.startswith("[ray")]
    assert not [p for p in pieces if "; checked on " in p]  # the installed Ray and timm take no compat fallback
    bars = [p for p in pieces if "image×member" in p]
    assert bars and "32/32 image×member" in bars[-1] and "done in" in bars[-1], bars
    assert "reduce 2/2 shards" in bars[-1]
    # On a terminal the bar stands for the per-shard lines a log gets.
    assert not [p for p in pieces if "attributions: shard" in p]
    assert any(p.startswith("[ray-consensus] plan:") for p in pieces)
    assert "run root:" in stdout
