"""A lease whose renewal fails says so in one line and keeps trying."""

from __future__ import annotations

import threading

from ray_consensus.storage.lease import Lease, read_lease
from ray_consensus.storage.store import LocalStore


class FlakyStore(LocalStore):
    """A local run root whose writes fail (a full disk) while `failing` is set; `failed` counts the writes
    that failed, `written` is set by each write that succeeds."""

    def __init__(self, root: str):
        super().__init__(root)
        self.failing, self.failed, self.written = False, threading.Semaphore(0), threading.Event()

    def write_bytes(self, rel, data):
        if self.failing:
            self.failed.release()
            raise OSError("No space left on device")
        super().write_bytes(rel, data)
        self.written.set()


def test_a_failed_renewal_is_one_line_and_the_next_one_renews(tmp_path, capsys):
    store = FlakyStore(str(tmp_path / "root"))
    with Lease(store, ttl_s=0.3) as lease:
        store.failing = True
        assert store.failed.acquire(timeout=60) and store.failed.acquire(timeout=60)  # two renewals failed
        store.written.clear()
        store.failing = False
        assert store.written.wait(timeout=60)  # and a later one renews
        assert read_lease(store)["run_id"] == lease.holder["run_id"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "renew" in line]
    assert len(lines) >= 2
    assert lines[0] == (f"[ray-consensus] could not renew the lease on {store.root} (No space left on device); "
                        "retrying in 0.1 s")
