"""What the manifest can be trusted with: content rewritten under the same path is noticed (images by
their listing's version, checkpoints by their content; local folders and the S3 server), class folders
define the classes (empty ones too) and a run root refuses another class list, `file://` data sets list
properly, image ids stay strings and labels must be integers, a file name that is not UTF-8 is a row of
errors/, and a manifest that is no table fails with one line."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from imagesets import make_image_folder, tiny_spec
from PIL import Image
from test_plan import mark_complete, to_compute
from typer.testing import CliRunner

import ray_consensus as rc
from ray_consensus.cli import app
from ray_consensus.dataset.manifest import read_manifest
from ray_consensus.errors import SpecError
from ray_consensus.planning.plan import make_plan
from ray_consensus.planning.preflight import preflight
from ray_consensus.runroot.contract import MANIFEST_ERRORS_FILE, write_manifest
from ray_consensus.runroot.record import RunRecord, UnitCounts
from ray_consensus.spec.config import DatasetSpec, parse_spec
from ray_consensus.storage.store import LocalStore


def save_checkpoint(path, seed: int, classes: int = 3) -> None:
    """Real resnet10t weights, another set per seed."""
    import timm
    import torch

    torch.manual_seed(seed)
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=classes).state_dict(), path)


def rotate_in_place(paths) -> None:
    """Rewrite each image under the same name with other content (turned by 180 degrees: same size)."""
    for p in paths:
        Image.fromarray(np.asarray(Image.open(p))[::-1, ::-1].copy()).save(p)


# 3 classes x 6 images in shards of 8: c0/* and c1/img000-001 are shard 0, the last two of c2 shard 2.
SHARD0 = [f"c0/img{i:03d}.png" for i in range(5)]
EVERY_REDUCE = {("reduce", s) for s in range(3)}
MEMBER_A = {("attr", "a", s) for s in range(3)} | EVERY_REDUCE
SHARD0_UNITS = {("inputs", 0), ("attr", "a", 0), ("attr", "b", 0), ("reduce", 0)}


# ---------------------------------------------------------------- content under the same path

def test_rewritten_images_and_checkpoint_recompute_exactly_their_units_locally(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=3, per_class=6)
    ckpt = tmp_path / "a.pt"
    save_checkpoint(ckpt, 1)
    spec = parse_spec(tiny_spec(data, str(tmp_path / "run"), models=(f"a=resnet10t@{ckpt}",
                                                                      "b=mobilenetv3_small_050@random")))
    store = LocalStore(spec.run.output)
    mark_complete(store, spec)
    assert to_compute(store, spec) == set()
    rotate_in_place([data / "images" / rel for rel in SHARD0])
    assert to_compute(store, spec) == SHARD0_UNITS
    mark_complete(store, spec)
    (data / "masks" / "c2" / "img005.png").write_bytes((data / "masks" / "c2" / "img004.png").read_bytes())
    assert to_compute(store, spec) == {("inputs", 2), ("attr", "a", 2), ("attr", "b", 2), ("reduce", 2)}
    mark_complete(store, spec)
    save_checkpoint(ckpt, 2)  # other weights, same path
    assert to_compute(store, spec) == MEMBER_A
    mark_complete(store, spec)
    os.utime(ckpt, ns=(1, 1))  # the same bytes with another mtime: the content decides, nothing to redo
    assert to_compute(store, spec) == set()


def test_rewritten_images_and_checkpoint_recompute_exactly_their_units_on_s3(tmp_path, s3_server, s3_bucket,
                                                                            monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    data = make_image_folder(tmp_path / "ds", n_classes=3, per_class=6)
    save_checkpoint(tmp_path / "a.pt", 1)
    client, bucket = s3_server.client(), s3_bucket.removeprefix("s3://")
    for p in sorted(data.rglob("*.png")):
        client.upload_file(str(p), bucket, f"ds/{p.relative_to(data).as_posix()}")
    client.upload_file(str(tmp_path / "a.pt"), bucket, "ckpt/a.pt")
    raw = tiny_spec(data, str(tmp_path / "run"), models=(f"a=resnet10t@{s3_bucket}/ckpt/a.pt",
                                                         "b=mobilenetv3_small_050@random"))
    raw["dataset"] = {"path": f"{s3_bucket}/ds/images", "masks": f"{s3_bucket}/ds/masks"}
    spec = parse_spec(raw)
    store = LocalStore(spec.run.output)
    mark_complete(store, spec)
    client.upload_file(str(data / "images" / "c1" / "img003.png"), bucket, "ds/images/c1/img003.png")
    assert to_compute(store, spec) == set()  # the same bytes again: the same ETag
    rotate_in_place([data / "images" / rel for rel in SHARD0])
    for rel in SHARD0:
        client.upload_file(str(data / "images" / rel), bucket, f"ds/images/{rel}")
    assert to_compute(store, spec) == SHARD0_UNITS
    mark_complete(store, spec)
    save_checkpoint(tmp_path / "a.pt", 2)
    client.upload_file(str(tmp_path / "a.pt"), bucket, "ckpt/a.pt")
    assert to_compute(store, spec) == MEMBER_A
    # a table manifest on S3: each folder its URIs name is listed for the ETags
    client.put_object(Bucket=bucket, Key="ds/m.csv",
                      Body=b"uri,label\nimages/c0/img000.png,0\nimages/c1/img000.png,1\n")
    table = read_manifest(DatasetSpec(path=f"{s3_bucket}/ds/m.csv")).table
    etag = client.head_object(Bucket=bucket, Key="ds/images/c0/img000.png")["ETag"].strip('"')
    assert table["version"].tolist()[0] == etag and table["version"].str.len().min() == 32


def test_a_table_manifest_versions_its_rows_from_their_folders_or_its_own_column(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=2)
    rows = pd.DataFrame({"uri": ["images/c0/img000.png", "images/c1/img001.png"], "label": [0, 1],
                         "mask_uri": ["masks/c0/img000.png", None]})
    rows.to_csv(data / "m.csv", index=False)
    before = read_manifest(DatasetSpec(path=str(data / "m.csv"))).table.set_index("image_id")["version"]
    assert before["images/c0/img000"].count("|mask:") == 1 and "|mask:" not in before["images/c1/img001"]
    rotate_in_place([data / "masks" / "c0" / "img000.png"])
    after = read_manifest(DatasetSpec(path=str(data / "m.csv"))).table.set_index("image_id")["version"]
    assert after["images/c0/img000"] != before["images/c0/img000"]
    assert after["images/c1/img001"] == before["images/c1/img001"]
    rows.assign(version=["sha-1", "sha-2"]).to_csv(data / "v.csv", index=False)
    given = read_manifest(DatasetSpec(path=str(data / "v.csv"))).table
    assert given["version"].tolist() == ["sha-1", "sha-2"]


def test_a_run_root_without_versions_is_adopted_once_then_notices_changes(legacy_root, s3_server):
    """tests/legacy/run (0.1.0) kept no versions: its units are taken as computed from what the data set
    holds now, their markers rewritten with the versioned fingerprints; a later rewrite is noticed."""
    root, spec = legacy_root
    store = LocalStore(str(root))
    manifest = read_manifest(spec.dataset, spec.storage)
    plan = make_plan(spec, store, manifest)
    assert all(p.inputs.done and not p.models_to_compute for p in plan.shards.values())
    assert len(plan.adopted) == 2 * 3  # 2 shards x (inputs + 2 members); reduce units moved on anyway
    plan.adopt(store)
    write_manifest(store, plan.manifest, manifest.errors)
    again = make_plan(spec, store, manifest)
    assert not again.adopted and all(p.inputs.done and not p.models_to_compute for p in again.shards.values())
    bucket, key = spec.dataset.path.removeprefix("s3://").split("/", 1)
    image = f"{key}/c1/img000.png"
    body = s3_server.client().get_object(Bucket=bucket, Key=image)["Body"].read()
    flipped = Image.fromarray(np.asarray(Image.open(io.BytesIO(body)))[::-1].copy())
    flipped.save(root / "flipped.png")
    s3_server.client().upload_file(str(root / "flipped.png"), bucket, image)
    changed = make_plan(spec, store, read_manifest(spec.dataset, spec.storage))
    assert [p.shard for p in changed.shards.values() if not p.inputs.done] == [1]


@pytest.mark.slow
def test_a_rerun_after_rewrites_recomputes_exactly_the_changed_units_and_their_results_change(tmp_path,
                                                                                              ray_local):
    from ray_consensus.runner import execute

    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=3)  # shards of 4: c0/* + c1/img000, the rest
    ckpt = tmp_path / "a.pt"
    save_checkpoint(ckpt, 1, classes=2)
    spec = parse_spec(tiny_spec(data, str(tmp_path / "run"), models=(f"a=resnet10t@{ckpt}",
                                                                      "b=mobilenetv3_small_050@random"),
                                run={"shard_size": 4}))
    first = execute(spec, progress=False, report=False)
    assert first.units_computed == UnitCounts(attributions=4, reduce=2)
    before = pq.read_table(str(tmp_path / "run" / "attributions")).to_pandas().set_index(["model", "image_id"])

    save_checkpoint(ckpt, 2, classes=2)
    rotate_in_place([data / "images" / "c0" / f"img{i:03d}.png" for i in range(3)])
    second = execute(spec, progress=False, report=False)
    # member a everywhere (its weights), member b in shard 0 only (its images), every shard re-reduced
    assert second.units_computed == UnitCounts(attributions=3, reduce=2)
    after = pq.read_table(str(tmp_path / "run" / "attributions")).to_pandas().set_index(["model", "image_id"])

    def same(model: str, image_id: str) -> bool:
        return np.array_equal(np.asarray(before.loc[(model, image_id), "attribution"]),
                              np.asarray(after.loc[(model, image_id), "attribution"]))

    assert not any(same("a", i) for i in ("c0/img000", "c1/img000", "c1/img002"))  # new weights
    assert not same("b", "c0/img000") and same("b", "c1/img000") and same("b", "c1/img002")
    stored = pd.read_parquet(tmp_path / "run" / "manifest.parquet").set_index("image_id")
    assert stored["version"].str.contains(r"\|mask:").all()  # each image's version includes its mask's
    assert second.class_names == ["c0", "c1"]  # in run.json, for the next run's check


# ---------------------------------------------------------------- the class folders

def test_empty_class_folders_keep_their_index(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=3, per_class=2, masks=False)
    for p in (data / "images" / "c1").iterdir():
        p.unlink()
    manifest = read_manifest(DatasetSpec(path=str(data / "images"), num_classes=10))
    assert manifest.class_names == ["c0", "c1", "c2"]
    labels = dict(zip(manifest.table["image_id"], manifest.table["label"]))
    assert labels == {"c0/img000": 0, "c0/img001": 0, "c2/img000": 2, "c2/img001": 2}


def test_a_run_root_refuses_another_class_list_with_one_line(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=3, per_class=2, masks=False)
    spec = parse_spec(tiny_spec(data, str(tmp_path / "run")))
    store = LocalStore(spec.run.output)
    # the run.json a finished run leaves: its class names (and the plan's class count)
    RunRecord(status="complete", spec_data=spec.to_public_dict(), plan=rc.validate(spec),
              class_names=["c0", "c1", "c2"]).save(store)
    for p in (data / "images" / "c1").iterdir():  # a class emptied: its folder still counts
        p.unlink()
    assert preflight(spec, check_weights=False, list_units=False).manifest.num_classes == 3
    shutil.rmtree(data / "images" / "c1")  # a class gone: c2's images would become class 1
    with pytest.raises(SpecError, match=r"class folders differ .*\(gone c1\).*use a new run.output") as err:
        preflight(spec, check_weights=False, list_units=False)
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["validate", "--dataset", str(data / "images"), "--model", "a=resnet10t@random",
                                      "--output", spec.run.output])
    assert result.exit_code == 2 and "gone c1" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- file:// data sets

def test_file_uri_data_sets_list_like_their_paths(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=3, per_class=2)
    plain = read_manifest(DatasetSpec(path=str(data / "images"), masks=str(data / "masks")))
    uri = read_manifest(DatasetSpec(path=f"file://{data / 'images'}", masks=f"file://{data / 'masks'}"))
    assert uri.class_names == ["c0", "c1", "c2"]
    pd.testing.assert_frame_equal(uri.table, plain.table)
    assert (uri.table["mask_uri"] != "").all()
    result = CliRunner().invoke(app, ["validate", "--dataset", f"file://{data / 'images'}", "--model",
                                      "a=resnet10t@random", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "6 images (3 classes" in result.stdout
    with pytest.raises(SpecError, match="unsupported URI scheme"):
        read_manifest(DatasetSpec(path="gs://bucket/images"))


# ---------------------------------------------------------------- ids stay strings, labels integers

def test_table_ids_stay_strings_and_labels_must_be_integers(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=4, masks=False)
    uris = [f"images/c{c}/img{i:03d}.png" for c in range(2) for i in range(4)]
    rows = pd.DataFrame({"image_id": ["007", "7", "0012", "12", "a", "b", "c", "d"], "uri": uris,
                         "label": ["0", "1", "1.0", "1.7", "0.2", "True", "", "cat"]})
    rows.to_csv(data / "m.csv", index=False)
    manifest = read_manifest(DatasetSpec(path=str(data / "m.csv")))
    assert manifest.table["image_id"].tolist() == ["0012", "007", "7"]
    assert manifest.table["label"].tolist() == [1, 0, 1]
    reasons = dict(zip(manifest.errors["image_id"], manifest.errors["reason"]))
    assert reasons == {"12": "label '1.7' is not an integer class index",
                       "a": "label '0.2' is not an integer class index",
                       "b": "label 'True' is not an integer class index", "c": "no label",
                       "d": "label 'cat' is not an integer class index"}
    assert set(manifest.errors["stage"]) == {"manifest"}
    # the same in Parquet, where the labels keep their types: floats and booleans are rejected
    typed = pd.DataFrame({"image_id": ["007", "7"], "uri": uris[:2], "label": [1.7, 2.0]})
    typed.to_parquet(data / "m.parquet")
    manifest = read_manifest(DatasetSpec(path=str(data / "m.parquet")))
    assert manifest.table["image_id"].tolist() == ["7"] and manifest.table["label"].tolist() == [2]
    pd.DataFrame({"uri": uris[:2], "label": [True, False]}).to_parquet(data / "b.parquet")
    with pytest.raises(SpecError, match="must hold integer class indices"):
        read_manifest(DatasetSpec(path=str(data / "b.parquet")))


# ---------------------------------------------------------------- names that are not UTF-8

def test_a_file_name_that_is_not_utf8_is_a_row_of_errors(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=2, masks=False)
    bad = os.fsencode(data / "images" / "c0") + b"/caf\xe9.png"  # Latin-1, not UTF-8
    with open(bad, "wb") as f:
        f.write((data / "images" / "c0" / "img000.png").read_bytes())
    manifest = read_manifest(DatasetSpec(path=str(data / "images")))
    assert len(manifest.table) == 4
    assert manifest.errors[["image_id", "stage"]].values.tolist() == [["c0/caf\\xe9", "manifest"]]
    assert "not valid UTF-8" in manifest.errors["reason"].iloc[0]
    store = LocalStore(str(tmp_path / "run"))
    write_manifest(store, manifest.table.assign(shard=0), manifest.errors)  # what a run stores
    assert pq.read_table(store.uri(MANIFEST_ERRORS_FILE)).column("uri").to_pylist()[0].endswith("caf\\xe9.png")
    result = CliRunner().invoke(app, ["validate", "--dataset", str(data / "images"), "--model",
                                      "a=resnet10t@random", "--output", str(tmp_path / "run2")])
    assert result.exit_code == 0, result.output
    assert "4 images (2 classes, 1 rejected)" in result.stdout


# ---------------------------------------------------------------- manifests that are no table

@pytest.mark.parametrize("name,content,message", [
    ("empty.csv", b"", "is empty"),
    ("corrupt.parquet", b"PAR1 not really parquet PAR1", "not a readable Parquet file"),
    ("text.csv", b"uri,label\n\xff\xfe,1\n", "not UTF-8 text"),
    ("huge.csv", b"uri,label\na.png,0\nb.png,1e20\n", "has label 100000000000000000000; labels are class indices"),
])
def test_a_manifest_that_is_no_usable_table_fails_with_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    result = CliRunner().invoke(app, ["validate", "--dataset", str(tmp_path / name), "--model", "a=resnet10t@random",
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_a_label_beyond_num_classes_is_reported_as_written(tmp_path):
    (tmp_path / "m.csv").write_text("uri,label\na.png,0\nb.png,1e20\n")
    manifest = read_manifest(DatasetSpec(path=str(tmp_path / "m.csv"), num_classes=3))
    assert manifest.errors["reason"].tolist() == ["label 100000000000000000000 outside the class range 0..2"]
