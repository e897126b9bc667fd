"""Faults: a killed driver, a killed actor, overlapping runs, untrusted checkpoints, path escapes."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from imagesets import make_image_folder, tiny_spec

from ray_consensus.errors import LeaseHeld, SpecError
from ray_consensus.models.committee import load_state_dict_bytes
from ray_consensus.spec.config import parse_spec
from ray_consensus.storage.lease import Lease
from ray_consensus.storage.store import LocalStore

RUN = [sys.executable, "-m", "ray_consensus", "run", "--quiet"]


def tables(root: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("models", "correlations"):
        out[name] = pd.read_parquet(root / "tables" / f"{name}.parquet")
    scores = pq.read_table(str(root / "scores")).to_pandas().drop(columns=["shard"])
    out["scores"] = scores.sort_values(["image_id", "model_id"]).reset_index(drop=True)
    return out


def assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=False, rtol=1e-6, atol=1e-9)


def markers(root: Path) -> list[Path]:
    return sorted((root / "attributions").rglob("_done-*")) if (root / "attributions").exists() else []


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A data set big enough to kill a run halfway: 6 shards of 4 images, 2 models."""
    base = tmp_path_factory.mktemp("faults")
    data = make_image_folder(base / "ds", n_classes=3, per_class=8)

    def spec(root: Path) -> dict:
        return tiny_spec(data, str(root), run={"shard_size": 4},
                         explainer={"name": "smoothgrad", "params": {"n_samples": 24, "samples_per_pass": 8}})

    return base, spec


def own_ray_env() -> dict[str, str]:
    """The environment of a CLI process that starts a Ray of its own."""
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}


@pytest.fixture(scope="module")
def reference(workload) -> Path:
    """The workload's run root, run uninterrupted by the CLI: what every interrupted run must end up equal to."""
    base, spec = workload
    root = base / "reference"
    (base / "reference.yaml").write_text(yaml.safe_dump(spec(root)))
    subprocess.run(RUN + [str(base / "reference.yaml")], env=own_ray_env(), check=True, capture_output=True,
                   timeout=600)
    return root


@pytest.mark.slow
def test_driver_sigkill_then_resume_equals_uninterrupted(workload, reference):
    base, spec = workload
    crashed = base / "crashed"
    env = own_ray_env()
    (base / "crashed.yaml").write_text(yaml.safe_dump(spec(crashed)))
    proc = subprocess.Popen(RUN + [str(base / "crashed.yaml")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(markers(crashed)) < 3 and proc.poll() is None:
        time.sleep(0.2)
    import psutil

    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, as a crash or OOM kill would
    proc.wait()
    for child in ray_processes:  # the local Ray it started outlives it; a real crash's dies with the node
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    done_before = len(markers(crashed))
    assert 3 <= done_before < 12, f"the kill should land halfway through the 12 attribution units ({done_before})"

    subprocess.run(RUN + [str(base / "crashed.yaml")], env=env, check=True, capture_output=True, timeout=600)
    info = yaml.safe_load((crashed / "run.json").read_text())
    assert info["units_computed"]["attributions"] == 12 - done_before
    attrs = pq.read_table(str(crashed / "attributions")).to_pandas()
    assert len(attrs) == 24 * 2 and not attrs.duplicated(["image_id", "model"]).any()
    assert_same_tables(reference, crashed)


@pytest.mark.slow
def test_killed_actor_is_replaced_and_results_are_unchanged(workload, reference, ray_local):
    from ray_consensus.runner import execute

    base, spec = workload
    root = base / "actor-killed"
    result = {}
    runner = threading.Thread(target=lambda: result.update(execute(parse_spec(spec(root)), progress=False).to_dict()))
    runner.start()
    import psutil

    killed = None
    while killed is None and runner.is_alive():
        # Ray names each actor's worker process after its class and method: "ray::Slot.explain".
        actors = [p for p in psutil.process_iter(["pid", "cmdline"])
                  if any("ray::Slot" in part for part in (p.info["cmdline"] or []))]
        if actors and len(markers(root)) >= 1:
            killed = actors[0].info["pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=600)
    assert killed is not None, "no attribution actor was seen alive"
    assert result.get("status") == "complete"
    attrs = pq.read_table(str(root / "attributions")).to_pandas()
    assert len(attrs) == 48 and not attrs.duplicated(["image_id", "model"]).any()
    assert_same_tables(reference, root)


def test_overlapping_runs_are_refused_until_the_lease_expires(tmp_path):
    store = LocalStore(str(tmp_path))
    with Lease(store, ttl_s=30):
        other = Lease(store, ttl_s=30)
        with pytest.raises(LeaseHeld, match=r"in use by run \w+ on host .* lease expires at"):
            other.acquire()
    # released: the next run gets it
    with Lease(store, ttl_s=30):
        pass
    # a crashed run's lease (never released) expires; on another host only by time
    crashed = Lease(store, ttl_s=0.5)
    crashed.holder["host"] = "elsewhere"
    crashed._write()
    with pytest.raises(LeaseHeld, match="host elsewhere"):
        Lease(store).acquire()
    time.sleep(0.6)
    lease = Lease(store)
    lease.acquire()
    lease.release()
    assert not (tmp_path / "_lease.json").exists()
    # ... and on this host as soon as its process is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = Lease(store, ttl_s=300)
    crashed.holder["pid"] = dead.pid
    crashed._write()
    with Lease(store):
        pass


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ray-consensus-pwned",))


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    Path("/tmp/ray-consensus-pwned").unlink(missing_ok=True)
    payload = pickle.dumps({"fc.weight": Boom()})
    with pytest.raises(SpecError, match="refused to load"):
        load_state_dict_bytes(payload, "evil.pt")
    assert not Path("/tmp/ray-consensus-pwned").exists()
    # a plain tensor state dict in the same format loads
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(load_state_dict_bytes(path.read_bytes(), "ok.pt")["w"], torch.ones(2))


@pytest.mark.parametrize("rel", ["../outside.json", "a/../../outside.json", "/etc/passwd", "a\\..\\b"])
def test_store_paths_cannot_escape_the_run_root(tmp_path, rel):
    store = LocalStore(str(tmp_path / "root"))
    with pytest.raises(ValueError, match="escapes the run root"):
        store.write_bytes(rel, b"x")
    assert not (tmp_path / "outside.json").exists()


def test_model_ids_cannot_make_paths(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=1, masks=False)
    s = tiny_spec(data, str(tmp_path / "run"))
    s["committee"][0]["id"] = "../../evil"
    with pytest.raises(SpecError, match="use only letters, digits"):
        parse_spec(s)
