"""The plan's invalidation rule, change by change: which units a changed spec recomputes.

A run root is marked complete for a base spec (markers written by hand, no Ray), then each
change below is planned against it and the units it would recompute are compared with the
rule the README states ("Resume, growth and scheduled reprocessing").
"""

from __future__ import annotations

import copy

import pytest
from imagesets import make_image_folder, tiny_spec

from ray_consensus.dataset.manifest import read_manifest
from ray_consensus.planning.plan import attribution_recipe, inputs_recipe, make_plan
from ray_consensus.runroot.contract import write_manifest
from ray_consensus.runroot.units import MARKER, fingerprint
from ray_consensus.spec.config import parse_spec
from ray_consensus.storage.store import LocalStore

MODELS = ("a=resnet10t@random", "b=mobilenetv3_small_050@random")


def mark_complete(store, spec) -> None:
    """Markers for every unit of `spec`'s plan and its manifest, as a finished run leaves them (a stale
    marker replaced)."""
    manifest = read_manifest(spec.dataset, spec.storage)
    plan = make_plan(spec, store, manifest)
    write_manifest(store, plan.manifest, manifest.errors)
    for p in plan.shards.values():
        for unit in (p.inputs, p.reduce, *p.attributions.values()):
            if unit.stored not in (None, unit.fingerprint):
                store.delete(f"{unit.folder}/{MARKER}{unit.stored}")
            store.write_bytes(f"{unit.folder}/{MARKER}{unit.fingerprint}", b"")


def to_compute(store, spec) -> set[tuple]:
    """("inputs", shard) / ("attr", model, shard) / ("reduce", shard) of every unit not done."""
    plan = make_plan(spec, store, read_manifest(spec.dataset, spec.storage))
    out = set()
    for p in plan.shards.values():
        out |= {("inputs", p.shard)} if not p.inputs.done else set()
        out |= {("attr", m, p.shard) for m in p.models_to_compute}
        out |= {("reduce", p.shard)} if not p.reduce.done else set()
    return out


SHARDS = (0, 1, 2)  # 3 classes x 6 images in shards of 8 (tiny_spec)


def every(kind: str, models=("a", "b")) -> set[tuple]:
    if kind == "attr":
        return {("attr", m, s) for m in models for s in SHARDS}
    return {(kind, s) for s in SHARDS}


def _set(*path_value):
    def change(data: dict) -> None:
        for path, value in zip(path_value[::2], path_value[1::2]):
            node = data
            *head, last = path.split(".")
            for key in head:
                node = node.setdefault(key, {})
            node[last] = value
    return change


def _add_member(data):
    data["committee"].append({"id": "c", "arch": "resnet10t", "weights": "random"})


def _other_weights(data):
    data["committee"][1]["weights"] = "/ckpt/b-v2.safetensors"


def _member_batch(data):
    data["committee"][0]["batch_size"] = 2


CASES = [
    # change                                       units recomputed
    ("nothing", lambda d: None, set()),
    ("a member added", _add_member, every("attr", ("c",)) | every("reduce")),
    ("a member's weights", _other_weights, every("attr", ("b",)) | every("reduce")),
    ("an explainer parameter", _set("explainer.params.n_samples", 5), every("attr") | every("reduce")),
    ("the explainer", _set("explainer", {"name": "saliency"}), every("attr") | every("reduce")),
    ("method.target", _set("method.target", "prediction"), every("attr") | every("reduce")),
    ("method.seed", _set("method.seed", 1), every("attr") | every("reduce")),
    ("a method option (vote)", _set("method.vote", "median"), every("reduce")),
    ("a method option (voted)", _set("method.voted", "all_correct"), every("reduce")),
    ("robustness sub-committees", _set("method.robustness_trials", 3), every("reduce")),
    ("method.bootstrap (a table option)", _set("method.bootstrap", 7), set()),
    ("method.permutations (a table option)", _set("method.permutations", 99), set()),
    ("run.map_size", _set("run.map_size", 8), every("inputs") | every("attr") | every("reduce")),
    ("run.image_size", _set("run.image_size", 40), every("inputs") | every("attr") | every("reduce")),
    ("dataset.mask_foreground", _set("dataset.mask_foreground", "nonzero_not_255"),
     every("inputs") | every("attr") | every("reduce")),
    ("run.map_dtype", _set("run.map_dtype", "float16"), every("attr") | every("reduce")),
    ("resources.autocast bf16", _set("resources.autocast", "bf16"), every("attr") | every("reduce")),
    ("resources.autocast tf32", _set("resources.autocast", "tf32"), every("attr") | every("reduce")),
    ("resources.batch_size", _set("resources.batch_size", 3), set()),
    ("committee[].batch_size", _member_batch, set()),
    ("actors, GPUs, CPUs, channels_last", _set("resources.actors_per_model", 2, "resources.num_gpus", 1,
                                                "resources.num_cpus", 2, "resources.channels_last", True), set()),
    ("run.gallery", _set("run.gallery", 1), set()),
    ("storage settings", _set("storage.region", "eu-west-1"), set()),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    data = make_image_folder(root / "ds", n_classes=3, per_class=6)
    return root, data, tiny_spec(data, str(root / "run"), models=MODELS)


@pytest.mark.parametrize("name,change,expected", CASES, ids=[c[0] for c in CASES])
def test_each_spec_change_recomputes_exactly_the_units_it_affects(base, tmp_path, name, change, expected):
    _, _, data = base
    store = LocalStore(str(tmp_path / "run"))
    mark_complete(store, parse_spec(data))
    changed = copy.deepcopy(data)
    change(changed)
    assert to_compute(store, parse_spec(changed)) == expected


def test_new_images_compute_only_their_new_shard_and_a_removed_image_its_own(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=3, per_class=6)
    spec = parse_spec(tiny_spec(data, str(tmp_path / "run"), models=MODELS))
    store = LocalStore(spec.run.output)
    mark_complete(store, spec)
    make_image_folder(data, n_classes=3, per_class=2, start=6)  # 6 new images: one new shard after the last
    assert to_compute(store, spec) == {("inputs", 3), ("attr", "a", 3), ("attr", "b", 3), ("reduce", 3)}
    mark_complete(store, spec)
    (data / "images" / "c0" / "img000.png").unlink()  # shard 0 loses an image
    assert to_compute(store, spec) == {("inputs", 0), ("attr", "a", 0), ("attr", "b", 0), ("reduce", 0)}


def test_fingerprints_are_the_plain_hash_of_the_recipe_parts(base):
    """The plan builds each hash around a precomputed JSON template; it must equal the hash of the
    parts themselves (what run roots written before the template carry)."""
    root, _, data = base
    spec = parse_spec(data)
    store = LocalStore(str(root / "fresh"))
    manifest = read_manifest(spec.dataset)
    plan = make_plan(spec, store, manifest)
    shard = plan.shards[1]
    rows = plan.manifest[plan.manifest["shard"] == 1]
    content = rows[["image_id", "uri", "label", "mask_uri", "version"]].astype(str).to_numpy().tolist()
    assert all(v for *_, v in content)  # every image carries its file's version
    r = spec.run
    ifp = fingerprint("inputs", content, r.image_size, r.map_size, spec.dataset.mask_foreground, None)
    assert shard.inputs.fingerprint == ifp
    m = spec.committee[0]
    assert shard.attributions["a"].fingerprint == fingerprint(
        "attr", m.id, m.arch, m.weights, m.kwargs, spec.explainer.name, spec.explainer.params.as_dict(),
        spec.method.target, spec.method.seed, r.map_dtype, ifp)
    assert inputs_recipe(spec) and attribution_recipe(spec, m)  # the recipes the plan used


def test_shard_text_is_json_dumps_of_the_rows_whatever_the_values_hold():
    """The inputs fingerprint hashes json.dumps of each image's row of astype(str) values: the
    buffer the plan builds with pyarrow must hold exactly that, for strings that need escaping
    (quotes, backslashes, non-ASCII, control characters, the '", "' that separates items), missing
    values (NaN), integers, and objects that are not strings."""
    import json

    import numpy as np
    import pandas as pd

    from ray_consensus.planning.plan import CONTENT_COLUMNS, _ShardText

    frame = pd.DataFrame({"image_id": pd.Series(["a", 'q"uo\\te', "ünï", 'x", "y', "e\\", "t\tab\x01", "🙂"],
                                                dtype="str"),
                          "uri": ["/u/a", "/u/b", None, "/u/é", '", "', "/u/\x7f", "/u/🙂"],
                          "label": [0, 1, 2, 3, 4, -5, 123456789],
                          "mask_uri": [None, None, "", np.nan, "/m/x", 7, None],
                          "version": ["1-2", "", "3-4|mask:5-6", '"e"', "é", "\n", "x"]})

    def dumps(f: pd.DataFrame, start: int, stop: int) -> str:
        rows = f[list(CONTENT_COLUMNS)].astype(str).to_numpy().tolist()
        return ", ".join(json.dumps(row) for row in rows[start:stop])

    for f in (frame, frame.fillna("x"), frame.fillna("x").astype({"mask_uri": str})):
        text = _ShardText(f)
        for start, stop in [(0, 1), (1, 4), (0, len(f)), (6, 7)]:
            assert bytes(text(start, stop)).decode() == dumps(f, start, stop), (start, stop)


def test_big_run_roots_are_listed_in_a_child_process_with_the_same_result(tmp_path, monkeypatch):
    """From LocalStore.BACKGROUND_PREFIXES folders on, `completed_later` (the plan's listing) lists in a
    child process (`listing.py`); the units it finds are those the in-process walk (`completed`) finds:
    markers only, files being written (.tmp-) never, nested folders included."""
    from ray_consensus.runroot.units import completed, completed_later
    from ray_consensus.storage import listing

    store = LocalStore(str(tmp_path / "run"))
    expected = {}
    for k in range(LocalStore.BACKGROUND_PREFIXES + 2):
        for s in range(3):
            folder = f"attributions/model=m{k:02d}/shard={s:05d}"
            store.write_bytes(f"{folder}/{MARKER}fp{k}-{s}", b"")
            store.write_bytes(f"{folder}/part-0.parquet", b"x")
            expected[folder] = f"fp{k}-{s}"
    store.write_bytes(f"inputs/shard=00000/{MARKER}in", b"")
    expected["inputs/shard=00000"] = "in"
    (tmp_path / "run" / "inputs" / "shard=00000" / ".tmp-abc").write_bytes(b"")

    started = []
    real = listing.walk_later
    monkeypatch.setattr("ray_consensus.storage.store.walk_later",
                        lambda *a, **k: started.append(a) or real(*a, **k))
    assert completed_later(store)() == expected
    assert len(started) == 1  # the child process did the listing
    assert completed(store) == expected and len(started) == 1  # the in-process walk, no child
    assert store.files_under(["inputs"]) == [f"inputs/shard=00000/{MARKER}in"]
