"""What a run root vouches for: a unit whose files were damaged after its marker was written is found by
`status` and recomputed by the next run; run.json and `status` say how a run ended (a report that could
not be written, a driver that was killed); shards whose images all left the data set leave the run root,
so the README's reading recipe returns each image once."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from imagesets import make_image_folder, tiny_spec
from typer.testing import CliRunner

from ray_consensus.cli import app
from ray_consensus.runner import execute
from ray_consensus.runroot.record import UnitCounts
from ray_consensus.runroot.status import run_status
from ray_consensus.runroot.units import MARKER, Unit, completed, completed_later, write_unit
from ray_consensus.spec.config import parse_spec
from ray_consensus.storage.store import LocalStore, S3Store

REPO = Path(__file__).resolve().parents[1]
ATTR_A0 = "attributions/model=a/shard=00000"
REDUCE_FILES = ["aggregates", "consensus", "scores", "subcommittees", "tables/images"]


def _table(n: int) -> pa.Table:
    return pa.table({"image_id": [f"i{k}" for k in range(n)], "value": list(range(n))})


def _truncate(store, rel: str) -> None:
    data = store.read_bytes(rel)
    store.write_bytes(rel, data[: len(data) // 2])


def _damage_is_found(store) -> None:
    """Markers record their files' sizes: a truncated, a deleted and a replaced file are found from the
    listing; a marker without sizes (written before 0.3.0) is trusted as it is."""
    write_unit(store, ATTR_A0, "fa", {f"{ATTR_A0}/part-0.parquet": _table(20)})
    reduce_tables = {f"{kind}/shard=00001/part-0.parquet": _table(5) for kind in REDUCE_FILES}
    write_unit(store, "consensus/shard=00001", "fr", reduce_tables)
    listing = completed(store)
    assert listing.damaged == {}
    a0 = Unit(ATTR_A0, "fa", listing[ATTR_A0], ATTR_A0 not in listing.damaged)
    assert a0.done and listing[ATTR_A0].startswith("fa.")

    _truncate(store, f"{ATTR_A0}/part-0.parquet")
    _truncate(store, "scores/shard=00001/part-0.parquet")
    listing = completed(store)
    assert set(listing.damaged) == {ATTR_A0, "consensus/shard=00001"}
    assert "scores/shard=00001/part-0.parquet has" in listing.damaged["consensus/shard=00001"]
    assert not Unit(ATTR_A0, "fa", listing[ATTR_A0], ATTR_A0 not in listing.damaged).done

    # Rewriting a unit (what the next run does) replaces its marker: whole again, one marker.
    write_unit(store, ATTR_A0, "fa", {f"{ATTR_A0}/part-0.parquet": _table(20)}, listing[ATTR_A0])
    write_unit(store, "consensus/shard=00001", "fr", reduce_tables, listing["consensus/shard=00001"])
    assert completed(store).damaged == {}
    store.delete("tables/images/shard=00001/part-0.parquet")
    listing = completed(store)
    assert set(listing.damaged) == {"consensus/shard=00001"}
    assert "tables/images/shard=00001/part-0.parquet is missing" in listing.damaged["consensus/shard=00001"]
    assert [f for f in store.list(ATTR_A0) if MARKER in f] == [f"{ATTR_A0}/{MARKER}{listing[ATTR_A0]}"]

    legacy = "attributions/model=b/shard=00000"
    store.write_parquet(f"{legacy}/part-0.parquet", _table(20))
    store.write_bytes(f"{legacy}/{MARKER}fb", b"")
    _truncate(store, f"{legacy}/part-0.parquet")
    listing = completed(store)
    assert listing[legacy] == "fb" and legacy not in listing.damaged

    with pytest.raises(ValueError, match="UNIT_FILES does not list"):
        write_unit(store, "inputs/shard=00000", "fi", {"scores/shard=00000/part-0.parquet": _table(1)})


def test_a_damaged_unit_is_found_from_a_local_listing(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path / "run"))
    _damage_is_found(store)
    monkeypatch.setattr(LocalStore, "BACKGROUND_PREFIXES", 1)  # the plan's listing of a big root: a child process
    listed = completed_later(store)()
    assert listed == completed(store) and listed.damaged == completed(store).damaged != {}


def test_a_damaged_unit_is_found_from_an_s3_listing(s3_server, s3_bucket, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    _damage_is_found(S3Store(f"{s3_bucket}/run"))


# ---------------------------------------------------------------- end to end, on one run root

@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    """A finished run of 3 classes x 6 images (shards 0 and 1 of 8 images, shard 2 of 2) and its spec file."""
    base = tmp_path_factory.mktemp("trust")
    data = make_image_folder(base / "data", masks=False)
    spec_data = tiny_spec(data, str(base / "run"))
    (base / "spec.yaml").write_text(yaml.safe_dump(spec_data))
    spec = parse_spec(spec_data)
    assert execute(spec, progress=False).status == "complete"
    return base, spec


@pytest.mark.slow
def test_run_json_is_not_complete_when_the_report_cannot_be_written(finished, monkeypatch):
    """A full disk for the report only (the store's writes of report/ fail with ENOSPC)."""
    base, spec = finished
    real = LocalStore.write_bytes

    def disk_full_for_the_report(self, rel, data):
        if rel.startswith("report/"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.uri(rel))
        return real(self, rel, data)

    monkeypatch.setattr(LocalStore, "write_bytes", disk_full_for_the_report)
    result = CliRunner().invoke(app, ["run", str(base / "spec.yaml"), "--quiet"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "report" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    info = yaml.safe_load((base / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "No space left on device" in info["error"]
    assert run_status(str(base / "run")).status == "failed"
    monkeypatch.undo()
    assert execute(spec, progress=False).status == "complete"
    assert "error" not in yaml.safe_load((base / "run" / "run.json").read_text())


STALLED_DRIVER = """
import sys, time
import yaml
from ray_consensus import runner
from ray_consensus.spec.config import parse_spec

def stalled(*args, **kwargs):  # hold the driver mid-run, lease taken and run.json written
    print("stalled", flush=True)
    time.sleep(600)

runner.run_cluster = stalled
runner.execute(parse_spec(yaml.safe_load(open(sys.argv[1]))), progress=False)
"""


@pytest.mark.slow
def test_status_says_interrupted_when_the_driver_was_killed(finished):
    """A driver killed (SIGKILL) mid-run leaves run.json `running`; `status` says `interrupted`
    once the run's lease is gone (at once on the same host: its process is dead). The driver is a real
    `execute` held at its cluster step, so that it is killed at a known point."""
    base, _ = finished
    root = base / "run"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_DRIVER, str(base / "spec.yaml")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        assert line == ["stalled\n"], "the driver did not reach its cluster step"
        assert run_status(str(root)).status == "running"  # alive and holding its lease
    finally:
        proc.kill()
        proc.wait()
    assert yaml.safe_load((root / "run.json").read_text())["status"] == "running"
    assert run_status(str(root)).status == "interrupted"
    out = CliRunner().invoke(app, ["status", str(root)])
    assert out.exit_code == 0 and f"{root}: interrupted" in out.output


@pytest.mark.slow
def test_shards_whose_images_left_the_data_set_leave_the_run_root(finished):
    """Shard 1's 8 images leave the data set, then come back (they fill a new shard, 3): the
    README's recipe (pq.read_table of attributions/, scores/, consensus/, tables/images) returns each
    image once, and no folder of shard 1 is left under any kind."""
    base, spec = finished
    root, images = base / "run", base / "data" / "images"
    manifest = pd.read_parquet(root / "manifest.parquet")
    moved = manifest.loc[manifest["shard"] == 1, "image_id"].tolist()
    assert len(moved) == 8
    aside = base / "aside"
    for image_id in moved:
        (aside / image_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(next(images.glob(f"{image_id}.*"))), aside / image_id)
    shown = CliRunner().invoke(app, ["validate", str(base / "spec.yaml")])
    assert shown.exit_code == 0 and "to remove: 1 shards whose every image left the data set" in shown.output
    execute(spec, progress=False)
    assert not list(root.rglob("shard=00001")), "a folder of the shard that left the plan is still there"
    attr = pq.read_table(root / "attributions").to_pandas()
    assert len(attr) == 2 * 10 and not set(moved) & set(attr["image_id"])

    for image_id in moved:
        shutil.move(str(aside / image_id), images / f"{image_id}.png")
    execute(spec, progress=False)
    attr = pq.read_table(root / "attributions").to_pandas()             # + columns model, shard
    scores = pq.read_table(root / "scores").to_pandas()
    consensus = pq.read_table(root / "consensus").to_pandas()
    per_image = pq.read_table(root / "tables" / "images").to_pandas()
    assert len(attr) == 2 * 18 and not attr.duplicated(["model", "image_id"]).any()
    assert len(scores) == 2 * 18 and not scores.duplicated(["model_id", "image_id"]).any()
    assert len(consensus) == len(per_image) == 18
    assert consensus["image_id"].is_unique and per_image["image_id"].is_unique
    assert sorted(attr.loc[attr["image_id"].isin(moved), "shard"].astype(int).unique()) == [3]


@pytest.mark.slow
def test_a_truncated_unit_is_reported_by_status_and_recomputed(finished):
    """A truncated attribution file and a truncated scores/ file under kept markers (last: on a
    run root that trusts them, every later step that reads them fails)."""
    base, spec = finished
    root = base / "run"
    store = LocalStore(str(root))
    _truncate(store, f"{ATTR_A0}/part-0.parquet")
    _truncate(store, "scores/shard=00002/part-0.parquet")

    st = run_status(str(root))
    assert set(st.damaged) == {ATTR_A0, "consensus/shard=00002"}
    assert st.models["a"].missing == [0] and st.reduced.missing == [2]
    shown = CliRunner().invoke(app, ["validate", str(base / "spec.yaml")])
    assert shown.exit_code == 0 and "damaged: 2 stored units" in shown.output, shown.output

    info = execute(spec, progress=False)
    assert info.units_computed == UnitCounts(attributions=1, reduce=1)
    assert pq.read_table(root / ATTR_A0 / "part-0.parquet").num_rows == 8
    assert pq.read_table(root / "scores" / "shard=00002" / "part-0.parquet").num_rows == 2 * 2
    st = run_status(str(root))
    assert st.damaged == {} and st.status == "complete" and st.reduced.missing == []


@pytest.mark.slow
def test_validate_and_run_name_members_whose_attributions_outlive_the_committee(finished):
    """A member dropped from the committee: its attribution units stay (they would be reused), and `validate`
    says so, and that reading attributions/ still returns its rows; --json lists the member."""
    base, _ = finished
    data = yaml.safe_load((base / "spec.yaml").read_text())
    data["committee"] = [m for m in data["committee"] if m["id"] == "a"]
    data["method"]["robustness_sizes"] = []  # a committee of one has no sub-committees
    (base / "spec-a.yaml").write_text(yaml.safe_dump(data))
    shown = CliRunner().invoke(app, ["validate", str(base / "spec-a.yaml")])
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.output.splitlines() if line.startswith("kept:"))
    assert "attributions of b (not in the committee)" in line and "attributions/model=<id>/" in line
    as_json = CliRunner().invoke(app, ["validate", str(base / "spec-a.yaml"), "--json"])
    assert json.loads(as_json.output)["members_not_in_committee"] == ["b"]
    full = CliRunner().invoke(app, ["validate", str(base / "spec.yaml")])
    assert "kept:" not in full.output
