"""Committees larger than the cluster: the schedule's arithmetic, and real runs on Ray's logical GPUs
(real scheduling; torch runs on the CPU)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import ray
from imagesets import make_image_folder, tiny_spec

from ray_consensus.errors import SpecError
from ray_consensus.planning.schedule import Capacity, make_schedule
from ray_consensus.runroot.record import UnitCounts
from ray_consensus.spec.config import parse_spec


def capacity(gpus: float, cpus: float = 8, node_gpus: float | None = None) -> Capacity:
    return Capacity(cpus, gpus, cpus, gpus if node_gpus is None else node_gpus, None, "test")


def spec_with(**resources):
    return parse_spec({"dataset": {"path": "x"}, "run": {"output": "y"}, "resources": resources,
                       "committee": [{"id": f"m{i}", "arch": "resnet10t"} for i in range(3)]})


@pytest.mark.parametrize("members", [1, 2, 5, 12, 80])
@pytest.mark.parametrize("gpus", [1, 2, 3, 8])
def test_any_committee_fits_any_cluster_with_whole_gpus(members, gpus):
    s = make_schedule(spec_with(num_gpus=1), members, capacity(gpus), n_shards=10)
    assert s.slots == min(members, gpus) and s.slot_gpus == 1  # never more GPUs than the cluster has
    assert s.slots * s.rounds >= members and s.rounds == math.ceil(members / s.slots)
    assert s.slots * s.slot_cpus + s.light_cpus <= 8  # the slots and a decode task fit the CPUs together


def test_fractions_share_gpus_and_cpu_slots_share_cpus():
    assert make_schedule(spec_with(num_gpus=0.5), 5, capacity(2), 1).slots == 4
    cpu = make_schedule(spec_with(), 7, capacity(0, cpus=2), 1)
    assert (cpu.slots, cpu.slot_gpus, cpu.torch_threads) == (2, 0, 1)
    assert cpu.slots * cpu.slot_cpus + cpu.light_cpus <= 2
    one = make_schedule(spec_with(), 1, capacity(0, cpus=2), 1)
    assert (one.slots, one.torch_threads) == (1, 2)  # a single member gets every core's thread


def test_actors_per_model_spreads_one_member_over_more_gpus():
    assert make_schedule(spec_with(num_gpus=1, actors_per_model=4), 1, capacity(8), 10).slots == 4


def test_a_slot_no_node_can_hold_is_refused():
    with pytest.raises(SpecError, match="asks for 4 GPU.*no node has more than 2"):
        make_schedule(spec_with(num_gpus=4), 3, capacity(8, node_gpus=2), 1)
    with pytest.raises(SpecError, match="num_cpus asks for 16 CPU"):
        make_schedule(spec_with(num_cpus=16), 3, capacity(8), 1)


def test_window_holds_what_fits_a_fifth_of_the_object_store():
    spec = parse_spec({"dataset": {"path": "x"}, "run": {"output": "y", "shard_size": 256, "image_size": 224},
                       "committee": [{"id": "a", "arch": "resnet10t"}]})
    per_shard = 256 * 224 * 224 * 3
    cap = Capacity(8, 0, 8, 0, 10 * per_shard / 0.2, "test")
    assert make_schedule(spec, 1, cap, n_shards=100).window_shards == 10
    assert make_schedule(spec, 1, cap, n_shards=4).window_shards == 4


def test_windows_keep_every_shard_once_in_order_and_a_first_window_may_be_small():
    from ray_consensus.attribution.dispatch import split_windows

    tasks = list(range(10))
    assert split_windows(tasks, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_windows(tasks, 4, first=1) == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert split_windows(tasks, 4, first=6) == split_windows(tasks, 4)  # never larger than the others
    assert split_windows(tasks, 10, first=2) == [[0, 1], list(range(2, 10))]
    assert split_windows([0], 8, first=1) == [[0]] and split_windows([], 8, first=1) == []


# ---------------------------------------------------------------- on Ray's logical GPUs

MEMBERS = ("a=resnet10t@random", "b=mobilenetv3_small_050@random", "c=lcnet_050@random", "d=resnet10t@random",
           "e=mobilenetv3_small_050@random")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("sched") / "ds", n_classes=2, per_class=4, size=(32, 32))


@pytest.fixture
def run_on(fresh_ray):
    """`run_on(gpus, spec_data)`: execute() on a fresh local Ray that declares `gpus` logical GPUs and 2 CPUs."""
    from ray_consensus.runner import execute

    def run(gpus: int, spec_data: dict):
        with fresh_ray(num_gpus=gpus):
            return execute(parse_spec(spec_data), progress=False, report=False)

    return run


def spec_data(dataset, root, members=MEMBERS) -> dict:
    return tiny_spec(dataset, str(root), models=members, explainer={"name": "saliency", "params": {}},
                     run={"shard_size": 4}, resources={"num_gpus": 1, "window_shards": 1})


def tables(root) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(root / "tables" / f"{name}.parquet") for name in ("models", "correlations")}


@pytest.mark.slow
def test_five_members_on_two_gpus_equal_five_gpus_and_a_new_member_computes_only_its_units(dataset, tmp_path,
                                                                                          run_on):
    small, large = tmp_path / "two-gpus", tmp_path / "five-gpus"
    info = run_on(2, spec_data(dataset, small))
    assert info.status == "complete" and info.units_computed == UnitCounts(attributions=10, reduce=2)
    assert "5 members on 2 slot(s) of 1 GPU" in info.plan.schedule
    assert info.timings["member_loads"] >= 5  # members one after another in 2 processes
    run_on(5, spec_data(dataset, large))
    a, b = tables(small), tables(large)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=0, atol=1e-9)

    grown = run_on(2, spec_data(dataset, small, MEMBERS + ("f=lcnet_050@random",)))
    assert grown.units_computed == UnitCounts(attributions=2, reduce=2)  # f on both shards, then the reducer
    assert set(pd.read_parquet(small / "tables" / "models.parquet")["model_id"]) == {*"abcdef", "consensus"}


@pytest.mark.slow
def test_a_member_no_node_can_place_fails_in_one_line_before_writing(dataset, tmp_path, fresh_ray):
    """`make_schedule`'s line (arithmetic on the cluster's figures, before any actor is asked for), not a run
    that waits for a GPU node that will never come."""
    with fresh_ray(num_gpus=2):
        address = ray.get_runtime_context().gcs_address
        data = spec_data(dataset, tmp_path / "run")
        spec_file = tmp_path / "spec.yaml"
        import yaml

        spec_file.write_text(yaml.safe_dump(data))
        proc = subprocess.run([sys.executable, "-m", "ray_consensus", "run", str(spec_file), "--quiet",
                               "--set", "resources.num_gpus=4"],
                              env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("20", "["))]
    assert proc.returncode == 2, proc.stderr
    assert lines == ["error: resources.num_gpus asks for 4 GPU(s) per member actor, but no node has more than 2 "
                     "(the cluster's nodes): no member could be placed; lower resources.num_gpus, or set "
                     "resources.max_gpus if the cluster can grow GPU nodes"], proc.stderr
    assert not (tmp_path / "run").exists()
