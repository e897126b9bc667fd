"""A lease on a run root, so that two runs (a schedule that overlaps itself) never write
into the same root at once.

The lease is `_lease.json` in the run root: holder (host, pid, run id) and expiry time. A
live run renews it in the background; a crashed run's lease simply expires. A run that
finds a live lease held by another refuses with a message naming the holder and expiry.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from ray_consensus.storage import Store

LEASE_FILE = "_lease.json"
TTL_S = float(os.environ.get("RAY_CONSENSUS_LEASE_TTL", "300"))


class LeaseHeld(RuntimeError):
    """Another live run holds the run root."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


class Lease:
    def __init__(self, store: Store, ttl_s: float = TTL_S):
        self.store, self.ttl = store, ttl_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": uuid.uuid4().hex[:12]}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _current(self) -> dict | None:
        try:
            return self.store.read_json(LEASE_FILE)
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        now = time.time()
        self.store.write_json(LEASE_FILE, {**self.holder, "acquired": _iso(now), "expires_at": now + self.ttl,
                                           "expires": _iso(now + self.ttl)})

    def _live(self, held: dict | None) -> bool:
        """A foreign lease that still counts: unexpired, and not left by a dead process on this host."""
        if not held or held.get("run_id") == self.holder["run_id"] or held.get("expires_at", 0) <= time.time():
            return False
        if held.get("host") == self.holder["host"] and not _pid_alive(int(held.get("pid", -1))):
            return False  # its run crashed on this very machine: no need to wait for the expiry
        return True

    def acquire(self) -> None:
        held = self._current()
        if self._live(held):
            raise LeaseHeld(f"run root {self.store.root} is in use by run {held.get('run_id')} on host "
                            f"{held.get('host')} (pid {held.get('pid')}); its lease expires at "
                            f"{held.get('expires')} unless renewed")
        self._write()
        # Read back after a moment: of two runs racing for a free lease, the last writer wins and
        # the other sees a foreign holder and refuses.
        time.sleep(0.2)
        held = self._current()
        if not held or held.get("run_id") != self.holder["run_id"]:
            raise LeaseHeld(f"run root {self.store.root} was just taken by run {held and held.get('run_id')} "
                            f"on host {held and held.get('host')}")
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._write()
            except Exception:  # a transient storage error: the next renewal tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        held = self._current()
        if held and held.get("run_id") == self.holder["run_id"]:
            self.store.delete(LEASE_FILE)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
