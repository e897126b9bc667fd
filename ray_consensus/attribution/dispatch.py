"""The driver's dispatcher: the shards in windows, each decoded once, handed to idle slots as work items.

    ShardTask ─► windows ─► decode_window (the next window while the slots work on this one)
                                │
             idle slot ◄─ work item: one member over its shards of the window
                                │
                     UnitWritten (one per unit) … WindowDone (the item ended)
                                │
                     ShardDone once every member's unit of a shard is written ─► the shard's reduce

The driver's `Dispatcher` decodes the shards a window at a time (the next window while the slots
work on the current one; two windows at most are held), and hands each idle slot a work item: one
member over the window's shards, preferring the member the slot already holds. Where every
member has slots of its own, the first window holds one shard per slot, so that explaining
starts once those are decoded, not the whole window.
A shard is done when every member's unit of it is written; the driver then starts its reduce.

Making a `Dispatcher` starts nothing. Its `run` is a generator of events (`records`), which the
runner reads in one loop beside the reduce tasks; the slots are requested when the run starts,
before Ray Data is first touched, and killed when it ends (closing the generator ends it).
The bookkeeping (windows, work items, which members a shard still waits for) is plain Python on
`Window`, so it can be driven by hand without Ray.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from ray_consensus import compat
from ray_consensus.attribution.decode_stage import decode_window
from ray_consensus.attribution.records import (
    AttributionEvent,
    AttributionsDone,
    ShardDone,
    ShardTask,
    StageContext,
    UnitWritten,
    WindowDone,
)
from ray_consensus.attribution.slot import Slot
from ray_consensus.errors import ClusterError


@dataclass
class Window:
    """A run of consecutive shards decoded together; its blocks are freed once every item is done."""

    index: int
    tasks: list[ShardTask]
    blocks: list | None = None                                 # decoded blocks (object refs), once decoded
    todo: deque = field(default_factory=deque)                 # (model_id, shards) items not yet handed out
    running: int = 0
    left: dict[int, set] = field(default_factory=dict)         # shard -> members still to write

    @property
    def finished(self) -> bool:
        return self.blocks is not None and not self.todo and not self.running

    def decoded(self, blocks: list) -> list[ShardDone]:
        """The window's shards are decoded into `blocks`: those with only an inputs unit to write (written
        while decoding) are done."""
        self.blocks = blocks
        return [ShardDone(t.shard, None, None, []) for t in self.tasks if not t.attributions]

    def written(self, unit: UnitWritten) -> ShardDone | None:
        """A member's unit of one of the window's shards is written: the shard's ShardDone when it was the
        last one the shard waited for (its counts from that unit), else None."""
        left = self.left[unit.shard]
        if unit.model_id not in left:
            return None
        left.remove(unit.model_id)
        if left:
            return None
        task = next(t for t in self.tasks if t.shard == unit.shard)
        return ShardDone(unit.shard, unit.n_images, unit.n_errors, sorted(task.attributions))


def split_windows(tasks: list, size: int, first: int | None = None) -> list[list]:
    """The tasks in windows of `size`; with `first`, the first window holds only that many, so that the
    slots start on the first shards decoded rather than on a whole window's. Only where every work item
    has a slot of its own: a slot then keeps its member across windows and a small first window costs
    no member load."""
    head = min(size, first) if first else size
    return [tasks[:head]] + [tasks[i:i + size] for i in range(head, len(tasks), size)] if tasks else []


def plan_windows(tasks: list[ShardTask], members: list[str], size: int, parts: int,
                 first: int | None = None) -> list[Window]:
    """The tasks' windows (`split_windows`), each with its work items: member by member in `members`'
    order, the member's shards of the window dealt round robin into at most `parts` items
    (resources.actors_per_model), so that that many slots can share one member's window."""
    windows = [Window(i, part) for i, part in enumerate(split_windows(tasks, size, first))]
    for w in windows:
        for t in w.tasks:
            w.left[t.shard] = set(t.attributions)
        for model_id in members:
            shards = [t.shard for t in w.tasks if model_id in t.attributions]
            n = max(1, min(parts, len(shards)))
            w.todo.extend((model_id, shards[i::n]) for i in range(n) if shards[i::n])
    return windows


def next_item(windows, held: str | None) -> tuple[Window, tuple[str, list[int]]] | None:
    """Take the work item for an idle slot that holds member `held` (None: none yet) out of its window:
    `held`'s first item in the decoded windows, oldest first, else the oldest decoded window's first
    item; None while no decoded window has items left."""
    decoded = [w for w in windows if w.blocks is not None and w.todo]
    if not decoded:
        return None
    for w in decoded:
        for i, item in enumerate(w.todo):
            if item[0] == held:
                del w.todo[i]
                return w, item
    return decoded[0], decoded[0].todo.popleft()


class Dispatcher:
    """Keeps every placed slot busy with (member, shards of a window) items until all are done."""

    def __init__(self, ctx: StageContext, tasks: list[ShardTask]):
        self.ctx = ctx
        s, per_member = ctx.schedule, ctx.spec.resources.actors_per_model
        first = per_member if s.items <= s.slots else None  # one shard per slot
        self.windows = deque(plan_windows(tasks, [m.id for m in ctx.spec.committee], s.window_shards or len(tasks),
                                          per_member, first))
        self.n_windows = len(self.windows)
        self.slots: list = []
        self.starting: dict = {}                # ready() ref -> a slot not placed yet
        self.idle: list = []
        self.holding: dict = {}                 # slot -> the member it holds
        self.running: dict = {}                 # item (a streaming generator) -> (slot, window, model_id, start)
        self.decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self.decoding: dict[int, concurrent.futures.Future] = {}

    def run(self) -> Iterator[AttributionEvent]:
        """Compute every task's units on the schedule's slots, yielding each event as it happens and
        `AttributionsDone` last; with no tasks, nothing starts and nothing is yielded. Raises ClusterError
        when no slot is placed within resources.slot_wait_s. The slots are killed when it ends, raises
        or is closed."""
        import ray

        if not self.windows:
            return
        t0, placed = time.time(), False
        try:
            self.start_slots()  # the slots start first: they are the long pole
            quiet_ray_data()
            self.decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode")
            while self.windows:
                yield from self.decode_ahead()
                self.dispatch()
                refs = list(self.running) + list(self.starting)
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.2) if refs else ([], [])
                for ref in ready:
                    if ref in self.starting:
                        self.idle.append(self.starting.pop(ref))
                        placed = True
                    else:
                        yield from self.advance(ref)
                while self.windows and self.windows[0].finished:
                    self.windows.popleft()  # its decoded blocks go with it
                if not placed and time.time() - t0 > self.ctx.spec.resources.slot_wait_s:
                    raise ClusterError(self.unplaced_message(time.time() - t0))
            loads = [load for slot in self.slots for load in ray.get(slot.take_loads.remote())]
            yield AttributionsDone(time.time() - t0, loads)
        finally:
            if self.decoder is not None:
                self.decoder.shutdown(wait=False, cancel_futures=True)
            for slot in self.slots:
                ray.kill(slot)

    def start_slots(self) -> None:
        import ray

        s = self.ctx.schedule
        # Slots take Ray's prestarted workers (no runtime env of their own): a slot at nice 0 instead of
        # Ray's 15 was measured no faster (the same batch, and whole runs alternated; benchmarks/README.md).
        slot = ray.remote(Slot).options(num_cpus=s.slot_cpus, num_gpus=s.slot_gpus, max_restarts=-1,
                                        max_task_retries=3)
        self.slots = [slot.remote(self.ctx) for _ in range(s.slots)]
        self.starting = {a.ready.remote(): a for a in self.slots}

    def decode_ahead(self) -> Iterator[ShardDone]:
        """Decode the first two windows (the one the slots work on and the next); collect finished decodes."""
        for w in list(self.windows)[:2]:
            if w.blocks is None and w.index not in self.decoding:
                self.decoding[w.index] = self.decoder.submit(decode_window, self.ctx, w.tasks)
            future = self.decoding.get(w.index)
            if future is not None and future.done():
                del self.decoding[w.index]
                yield from w.decoded(future.result())

    def dispatch(self) -> None:
        """Give each idle slot an item of the oldest decoded window, preferring the member it holds."""
        while self.idle:
            choice = next_item(self.windows, self.holding.get(self.idle[0]))
            if choice is None:
                return
            slot = self.idle.pop(0)
            w, (model_id, shards) = choice
            w.running += 1
            self.holding[slot] = model_id
            item = slot.explain.options(num_returns="streaming").remote(model_id, shards, w.blocks)
            self.running[item] = (slot, w, model_id, time.time())

    def advance(self, item) -> Iterator[AttributionEvent]:
        """An item has a unit written (UnitWritten, and ShardDone when it was its shard's last), or has
        ended (WindowDone)."""
        import ray

        slot, w, model_id, started = self.running[item]
        try:
            unit = ray.get(next(item))
        except StopIteration:
            del self.running[item]
            w.running -= 1
            self.idle.append(slot)
            yield WindowDone(model_id, w.index + 1, self.n_windows, time.time() - started)
            return
        yield unit
        done = w.written(unit)
        if done is not None:
            yield done

    def unplaced_message(self, waited: float) -> str:
        s = self.ctx.schedule
        return (f"no attribution slot ({s.slot_gpus:g} GPU, {s.slot_cpus:g} CPU) could be placed in {waited:.0f} s: "
                f"the cluster ({s.capacity.gpus:g} GPUs, {s.capacity.cpus:g} CPUs from {s.capacity.source}) did "
                f"not provide them; check `ray status`, or lower resources.num_gpus / raise resources.slot_wait_s")


def quiet_ray_data() -> None:
    """Our own lines are the progress: no Ray Data bars, execution banners or warnings (its errors stay)."""
    import logging

    from ray.data import DataContext

    data_ctx = DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    compat.quiet_issue_detectors(data_ctx)  # its memory hints misread the models' one-off load
    logging.getLogger("ray.data").setLevel(logging.ERROR)
