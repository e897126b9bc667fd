"""The unit-folder format (`units.UnitPath`): one type formats and parses it, and what runs once per listed
unit (`listed_models`, `listed_shards`, `unit_files`, the plan's folders) slices strings without building one."""

from __future__ import annotations

import pytest

from ray_consensus.runroot import units
from ray_consensus.runroot.units import (
    ATTRIBUTIONS,
    IMAGES,
    MEMBER_ERRORS_FILE,
    UnitPath,
    listed_models,
    listed_shards,
    listing_prefix,
    shard_digits,
    unit_files,
    units_by_model,
)

FOLDERS = {  # the on-disk names (README, "What a run writes"): these exact strings
    UnitPath("inputs", 3): "inputs/shard=00003",
    UnitPath("consensus", 12345): "consensus/shard=12345",
    UnitPath(IMAGES, 7): "tables/images/shard=00007",
    UnitPath("errors", -1): "errors/shard=-0001",  # the rows rejected while listing
    UnitPath(ATTRIBUTIONS, 2, "resnet-18.a1"): "attributions/model=resnet-18.a1/shard=00002",
}


@pytest.mark.parametrize("path, folder", FOLDERS.items())
def test_a_unit_path_formats_its_folder_and_parses_back(path, folder):
    assert path.folder == folder
    assert UnitPath.parse(folder) == path
    assert listing_prefix(path.kind, path.model_id) + shard_digits(path.shard) == folder
    assert path.file() == f"{folder}/part-0.parquet"


@pytest.mark.parametrize("folder", ["inputs", "attributions/model=a", "consensus/shard=00001/part-0.parquet",
                                    "errors/manifest", "consensus/shard=", "consensus/shard=1a"])
def test_a_folder_of_another_form_is_no_unit_path(folder):
    assert UnitPath.parse(folder) is None


def test_a_units_files_are_named_beside_the_unit_path():
    assert unit_files("attributions/model=a/shard=00004") == ("attributions/model=a/shard=00004/part-0.parquet",)
    assert unit_files("inputs/shard=00004") == ("errors/shard=00004/part-0.parquet",
                                                 "inputs/shard=00004/part-0.parquet")
    assert unit_files("consensus/shard=00004") == (
        "aggregates/shard=00004/part-0.parquet", "consensus/shard=00004/part-0.parquet",
        f"errors/shard=00004/{MEMBER_ERRORS_FILE}", "scores/shard=00004/part-0.parquet",
        "subcommittees/shard=00004/part-0.parquet", "tables/images/shard=00004/part-0.parquet")
    assert unit_files("scores/shard=00004") is None  # written by the reduce unit, no unit of its own


def test_a_listing_is_read_by_slicing_without_a_unit_path_per_unit(monkeypatch):
    listing = {folder: "fp" for folder in FOLDERS.values()} | {"attributions/model=b/shard=00002": "fq"}
    calls = []
    parse = UnitPath.parse
    monkeypatch.setattr(units.UnitPath, "parse", staticmethod(lambda folder: calls.append(folder) or parse(folder)))
    assert listed_models(listing) == {"resnet-18.a1", "b"}
    assert listed_shards(listing) == {2, 3, 7, 12345}  # not the manifest's -1
    for folder in listing:
        if folder.startswith("attributions/"):
            unit_files(folder)
    assert calls == []
    assert units_by_model(listing) == {"resnet-18.a1": {2: "fp"}, "b": {2: "fq"}}
    assert len(calls) == len(listing)  # the status's grouping parses each (the count above is no accident)
