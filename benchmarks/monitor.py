"""What the benchmark's processes use while a step runs: peak memory and CPU, sampled in a thread.

Ray started with `ray.init(address="local")` runs its raylet as a child of the driver, and the
raylet forks the workers, so every Ray process is a descendant of this one. Memory counts the
driver plus the Ray *worker* processes (command line `ray::...`: `ray::IDLE`,
`ray::MapWorker(...)`, ...), not Ray's system processes (GCS, raylet, monitors). CPU counts
all descendants, and also what every other process on the machine used meanwhile: on a
shared machine a ratio means little without it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


@dataclass
class Usage:
    wall_s: float
    peak_rss_bytes: int   # largest summed RSS of the driver + Ray workers in one sample
    peak_pss_bytes: int   # the same with shared pages split between the processes using them
    peak_processes: int   # processes summed in the sample with the largest RSS
    peak_driver_rss_bytes: int  # the driver's share of that sample
    ours_cores: float     # mean CPU cores used by this process and all its descendants
    others_cores: float   # mean CPU cores used by every other process on the machine
    samples: int


def _is_worker(p) -> bool:
    cmd = p.cmdline()
    return bool(cmd) and (cmd[0].startswith("ray::") or any("default_worker.py" in c for c in cmd))


class Monitor:
    """Context manager; `usage` is filled in on exit.

        with Monitor() as m:
            execute(spec)
        m.usage.peak_rss_bytes, m.usage.ours_cores

    Sampling memory reads every worker's smaps, which costs a 2-core machine about a tenth of a
    core at 0.5 s; `Monitor(2.0, memory=False)` samples CPU only (the peak fields stay 0) and
    leaves a timed run alone.
    """

    def __init__(self, interval_s: float = 0.5, memory: bool = True):
        import psutil
        import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)

        self._psutil = psutil
        self.interval_s = interval_s
        self.memory = memory  # False: CPU only (reading every worker's smaps costs the run real CPU)
        self.usage: Usage | None = None
        self._me = psutil.Process(os.getpid())
        self._cpu_seen: dict[tuple[int, float], float] = {}  # (pid, create_time) -> CPU seconds at last sample
        self._ours_s = 0.0
        self._peak = (0, 0, 0, 0)  # RSS, PSS, processes, driver RSS
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _busy_s(self) -> float:
        t = self._psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def _sample(self) -> None:
        rss = pss = n = driver = 0
        for p in [self._me] + self._me.children(recursive=True):
            try:
                with p.oneshot():
                    key, cpu = (p.pid, p.create_time()), sum(p.cpu_times()[:2])
                    # A process born during the step used all its CPU time during it.
                    before = self._cpu_seen.get(key, 0.0 if key[1] >= self._t0_epoch else cpu)
                    self._ours_s += cpu - before
                    self._cpu_seen[key] = cpu
                    if self.memory and (p is self._me or _is_worker(p)):
                        info = p.memory_full_info()  # smaps_rollup: PSS as well as RSS
                        rss, pss, n = rss + info.rss, pss + getattr(info, "pss", info.rss), n + 1
                        driver = info.rss if p is self._me else driver
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue
        if rss > self._peak[0]:
            self._peak = (rss, max(pss, self._peak[1]), n, driver)
        else:
            self._peak = (self._peak[0], max(pss, self._peak[1]), *self._peak[2:])
        self._samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)  # wakes at once on exit: the step's wall time holds no sampler sleep

    def __enter__(self) -> "Monitor":
        self._t0, self._t0_epoch, self._busy0 = time.perf_counter(), time.time(), self._busy_s()
        self._sample()  # baseline CPU times of the processes already running
        self._ours_s = 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t0  # the step's, before the sampler is stopped and read a last time
        self._stop.set()
        self._thread.join()
        self._sample()
        others = max(0.0, self._busy_s() - self._busy0 - self._ours_s)
        self.usage = Usage(wall, *self._peak, self._ours_s / wall, others / wall, self._samples)


def combined(*usages: Usage) -> Usage:
    """Several monitored sittings as one: wall times summed, cores averaged over them, the largest peak."""
    wall = sum(u.wall_s for u in usages)
    peak = max(usages, key=lambda u: u.peak_rss_bytes)
    return Usage(wall, peak.peak_rss_bytes, max(u.peak_pss_bytes for u in usages), peak.peak_processes,
                 peak.peak_driver_rss_bytes, sum(u.ours_cores * u.wall_s for u in usages) / wall,
                 sum(u.others_cores * u.wall_s for u in usages) / wall, sum(u.samples for u in usages))
