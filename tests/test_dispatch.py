"""The dispatcher's bookkeeping, driven by hand without Ray: windows and their work items, which
member an idle slot gets, and the events a window's units turn into (a shard is done once, when its
last member's unit is written)."""

from __future__ import annotations

import ray

from ray_consensus.attribution.dispatch import Dispatcher, next_item, plan_windows
from ray_consensus.attribution.records import ShardDone, ShardTask, StageContext, UnitWritten
from ray_consensus.planning.schedule import Capacity, make_schedule
from ray_consensus.spec.config import parse_spec


def task(shard: int, *members: str) -> ShardTask:
    """A shard whose units still to compute are `members`' (units are not read by the bookkeeping)."""
    return ShardTask(shard, [], None, {m: None for m in members})


# Shards 0-2 want members a and b, shard 3 only a, shard 4 only its inputs unit (no member left to compute).
TASKS = [task(0, "a", "b"), task(1, "a", "b"), task(2, "a", "b"), task(3, "a"), task(4)]


def test_each_window_deals_each_members_shards_into_at_most_actors_per_model_items_in_committee_order():
    first, second = plan_windows(TASKS, ["b", "a"], size=3, parts=2)
    assert [t.shard for t in first.tasks] == [0, 1, 2] and [t.shard for t in second.tasks] == [3, 4]
    assert list(first.todo) == [("b", [0, 2]), ("b", [1]), ("a", [0, 2]), ("a", [1])]
    assert list(second.todo) == [("a", [3])]  # one shard: one item; b has none here
    assert first.left == {0: {"a", "b"}, 1: {"a", "b"}, 2: {"a", "b"}} and second.left == {3: {"a"}, 4: set()}


def test_a_shard_is_done_once_when_its_last_members_unit_is_written_with_that_units_counts():
    (w,) = plan_windows(TASKS[:2], ["a", "b"], size=2, parts=1)
    assert w.decoded(["block"]) == []  # every shard waits for members
    assert w.written(UnitWritten("b", 0, 3, 1)) is None
    assert w.written(UnitWritten("a", 1, 4, 0)) is None
    assert w.written(UnitWritten("a", 0, 3, 1)) == ShardDone(0, 3, 1, ["a", "b"])
    assert w.written(UnitWritten("a", 0, 3, 1)) is None  # the same unit again: not done twice
    assert w.written(UnitWritten("b", 1, 4, 0)) == ShardDone(1, 4, 0, ["a", "b"])


def test_a_shard_with_only_its_inputs_unit_is_done_when_its_window_is_decoded():
    _, w = plan_windows(TASKS, ["a", "b"], size=3, parts=1)
    assert w.blocks is None and not w.finished
    assert w.decoded(["block"]) == [ShardDone(4, None, None, [])]
    assert w.blocks == ["block"]


def test_an_idle_slot_gets_its_members_item_from_any_decoded_window_else_the_oldest_windows_first():
    first, second, third = plan_windows(TASKS + [task(5, "a", "b")], ["a", "b"], size=2, parts=1)
    windows = [first, second, third]
    assert next_item(windows, "a") is None  # nothing decoded yet
    first.decoded(["w0"])
    second.decoded(["w1"])
    assert next_item(windows, "a") == (first, ("a", [0, 1]))
    assert next_item(windows, "a") == (second, ("a", [2, 3]))  # keeps its member: the next window's item
    assert next_item(windows, None) == (first, ("b", [0, 1]))
    assert next_item(windows, "a") == (second, ("b", [2]))  # no more a in decoded windows: the oldest's first
    assert next_item(windows, "b") is None  # the third window is not decoded
    first.running = 1
    assert not first.finished and second.finished
    first.running = 0
    assert first.finished


def test_making_a_dispatcher_starts_nothing_and_a_run_without_tasks_yields_nothing():
    spec = parse_spec({"dataset": {"path": "x"}, "run": {"output": "y"},
                       "committee": [{"id": m, "arch": "resnet10t"} for m in "ab"]})
    schedule = make_schedule(spec, 2, Capacity(2, 0, 2, 0, None, "test"), n_shards=5)
    ctx = StageContext(spec, 3, None, schedule)
    dispatcher = Dispatcher(ctx, TASKS)
    run = dispatcher.run()  # a generator: its body runs when the first event is read
    assert dispatcher.slots == [] and not ray.is_initialized()
    # Each member has a slot of its own: a first window of one shard, then the rest.
    assert [[t.shard for t in w.tasks] for w in dispatcher.windows] == [[0], [1, 2, 3, 4]]
    run.close()
    assert list(Dispatcher(ctx, []).run()) == [] and not ray.is_initialized()
