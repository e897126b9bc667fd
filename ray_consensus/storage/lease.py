"""A lease on a run root, so that two runs (a schedule that overlaps itself) never write
into the same root at once.

The lease is `_lease.json` in the run root: holder (host, pid, run id) and expiry time. A
live run renews it in the background; a crashed run's lease simply expires. A run that
finds a live lease held by another refuses with a message naming the holder and expiry.
run.json names the holder too (`driver`), so `status` tells a run that is still going from one
whose driver was killed (`holds`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from ray_consensus.console import say
from ray_consensus.errors import LeaseHeld, StorageError, first_line
from ray_consensus.storage.store import Store

LEASE_FILE = "_lease.json"
TTL_S = float(os.environ.get("RAY_CONSENSUS_LEASE_TTL", "300"))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def read_lease(store: Store) -> dict | None:
    try:
        return store.read_json(LEASE_FILE)
    except (FileNotFoundError, ValueError):
        return None


def live(held: dict | None) -> bool:
    """A lease that still counts: unexpired, and not left by a dead process on this host."""
    if not held or held.get("expires_at", 0) <= time.time():
        return False
    return held.get("host") != socket.gethostname() or _pid_alive(int(held.get("pid", -1)))


def holds(store: Store, run_id: str | None) -> bool:
    """Whether the run `run_id` (None: any run) holds the run root's lease and is alive, as far as can be told:
    its lease is unexpired and, on this host, its process is running."""
    held = read_lease(store)
    return live(held) and (run_id is None or held.get("run_id") == run_id)


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
        return read_lease(self.store)

    def _write(self) -> None:
        now = time.time()
        self.store.write_json(LEASE_FILE, {**self.holder, "acquired": _iso(now), "expires_at": now + self.ttl,
                                           "expires": _iso(now + self.ttl)})

    def _live(self, held: dict | None) -> bool:
        """A foreign lease that still counts (a run that crashed on this very machine does not: no need to
        wait for its expiry)."""
        return live(held) and held.get("run_id") != self.holder["run_id"]

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
        from botocore.exceptions import BotoCoreError, ClientError  # here: a local run root never loads botocore

        every = self.ttl / 3  # two renewals may fail before the lease expires
        while not self._stop.wait(every):
            try:
                self._write()
            except (OSError, BotoCoreError, ClientError, StorageError) as e:  # the next renewal tries again
                say(f"could not renew the lease on {self.store.root} ({first_line(e)}); retrying in {every:g} s")

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
