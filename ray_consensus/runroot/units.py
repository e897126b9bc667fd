"""Where each unit of work lives in the run root, and how completion is recorded.

A unit (the attributions of one model for one shard, the inputs of one shard, one reduced
shard) is a folder of Parquet files plus an empty marker object
`_done-<fingerprint>.<size>.<size>…`: the sizes in bytes of the files it wrote (`UNIT_FILES`,
`-` for one it did not write). The marker is written last, so a unit is complete exactly when
its marker with the current fingerprint exists and its files have the sizes it records; a
crashed write leaves no marker and the unit is redone, overwriting the same file names (no
duplicate rows), and so is a unit whose file was truncated, replaced or deleted after its marker
was written. A marker without sizes (`_done-<fingerprint>`, written before 0.3.0) vouches for
no sizes and is trusted as it is. Markers start with '_' so pandas, pyarrow, DuckDB and Spark
skip them when reading the folders.

Listing the run root once tells what is done and whether it is whole: no marker or data file
has to be opened (the listing carries the data files' sizes: S3's pages do, a local walk stats
them). What the size check does not catch is a file changed in place to the same size. A
`UnitPath` is a unit folder's name (`<kind>/shard=<NNNNN>`, `attributions/model=<id>/shard=<NNNNN>`),
formatted and parsed here alone, beside the file names a unit writes (`UNIT_FILES`). A `Unit`
record names a unit's folder, the fingerprint it must carry and the marker it has; which
fingerprint that is, is the plan's business (`plan.py`); `fingerprint` is the hash it uses.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any, Callable, NamedTuple

import pyarrow as pa

from ray_consensus.storage.store import Store

DATA_FILE = "part-0.parquet"
MEMBER_ERRORS_FILE = "attribution.parquet"  # a reduced shard's errors/: its members' non-finite maps
MARKER = "_done-"

ATTRIBUTIONS = "attributions"  # the kind of a member's units: attributions/model=<id>/shard=<NNNNN>
IMAGES = "tables/images"       # the kind of a shard's rows of tables/images (a Hive-partitioned table)
_MEMBER = f"{ATTRIBUTIONS}/model="
_SHARD = "/shard="


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (what a stored unit was computed from)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_digits(shard: int) -> str:
    """The shard's part of a unit's folder name: 5 digits (`-0001`: the manifest's rejects in errors/)."""
    return f"{shard:05d}"


def listing_prefix(kind: str, model_id: str | None = None) -> str:
    """What every folder of a kind (of a member's attributions: `model_id`) starts with, `shard_digits`
    following: `<kind>/shard=`, `attributions/model=<id>/shard=`."""
    return f"{_MEMBER}{model_id}{_SHARD}" if kind == ATTRIBUTIONS else f"{kind}{_SHARD}"


class UnitPath(NamedTuple):
    """The folder of one shard's files of one kind (README, "What a run writes"): `<kind>/shard=<NNNNN>`,
    a member's attributions `attributions/model=<id>/shard=<NNNNN>`. `parse` slices strings (no regular
    expression), and what runs once per listed unit (`listed_models`, `listed_shards`, `unit_files`, the
    plan's folders: `listing_prefix` + `shard_digits`) slices or concatenates without building one: a
    listing holds 300,000 folders and more at scale."""

    kind: str                    # one of SHARD_KINDS, or ATTRIBUTIONS
    shard: int
    model_id: str | None = None  # the member, for ATTRIBUTIONS

    @property
    def folder(self) -> str:
        return listing_prefix(self.kind, self.model_id) + shard_digits(self.shard)

    def file(self, name: str = DATA_FILE) -> str:
        """A file of the folder (default: its data file)."""
        return f"{self.folder}/{name}"

    @staticmethod
    def parse(folder: str) -> UnitPath | None:
        """The unit path of a folder name (None: not one of `folder`'s form)."""
        head, sep, digits = folder.rpartition(_SHARD)
        if not sep or not (digits[1:] if digits[:1] == "-" else digits).isdigit():
            return None
        if head.startswith(_MEMBER):
            return UnitPath(ATTRIBUTIONS, int(digits), head[len(_MEMBER):])
        return UnitPath(head, int(digits))


# The files a unit may write, by the kind of its folder, as (kind, file name) in the shard's folders, in the
# order of the sizes its marker records; an attribution unit writes the data file of its own folder.
# `write_unit` refuses a file not listed here.
UNIT_FILES = {
    "inputs": (("errors", DATA_FILE), ("inputs", DATA_FILE)),
    "consensus": (("aggregates", DATA_FILE), ("consensus", DATA_FILE), ("errors", MEMBER_ERRORS_FILE),
                  ("scores", DATA_FILE), ("subcommittees", DATA_FILE), (IMAGES, DATA_FILE)),
}
# The folder kinds holding a shard's files (besides attributions/model=<id>/), and the file names sized.
SHARD_KINDS = sorted({kind for files in UNIT_FILES.values() for kind, _ in files})
_SIZED = tuple(sorted({name for files in UNIT_FILES.values() for _, name in files}))


def unit_files(folder: str) -> tuple[str, ...] | None:
    """The files the unit of `folder` may write, in its marker's order (None: not a unit's folder)."""
    if folder.startswith(_MEMBER):  # once per listed marker: no UnitPath built
        return (f"{folder}/{DATA_FILE}",)
    path = UnitPath.parse(folder)
    files = None if path is None else UNIT_FILES.get(path.kind)
    return None if files is None else tuple(path._replace(kind=kind).file(name) for kind, name in files)


class Listing(dict):
    """{unit folder: its marker's suffix (`<fingerprint>[.<sizes>]`)} of every unit with a marker, and
    `damaged`: {unit folder: what is wrong} of those whose files are not the ones their marker vouches for."""

    damaged: dict[str, str]

    def __init__(self, *args):
        super().__init__(*args)
        self.damaged = {}


def completed(store: Store) -> Listing:
    """The run root's units with a marker (`Listing`)."""
    return _markers(store.files_under(_unit_prefixes(store), MARKER, _SIZED))


def completed_later(store: Store) -> Callable[[], Listing]:
    """`completed`, listed while the caller works: returns a function that waits for the listing (on
    S3 in threads, for a big local run root in a process of its own)."""
    files = store.files_under_later(_unit_prefixes(store), MARKER, _SIZED)
    return lambda: _markers(files())


def _unit_prefixes(store: Store) -> list[str]:
    """The folders holding markers and units' files: each shard kind's, attributions/ one member at a time."""
    return SHARD_KINDS + store.list_dirs(ATTRIBUTIONS)


def _markers(files: list[str]) -> Listing:
    """Marker paths and `rel<TAB>size` data files -> the `Listing`."""
    done, sizes = Listing(), {}
    for rel in files:
        path, tab, size = rel.partition("\t")
        if tab:
            sizes[path] = size
        else:
            folder, _, name = rel.rpartition("/")
            done[folder] = name[len(MARKER):]
    for folder, suffix in done.items():
        fp, dot, recorded = suffix.partition(".")
        if dot:  # a marker without sizes (before 0.3.0) vouches for none: trusted as it is
            problem = _damage(folder, recorded.split("."), sizes)
            if problem:
                done.damaged[folder] = problem
    return done


def _damage(folder: str, recorded: list[str], sizes: dict[str, str]) -> str | None:
    """What differs between a unit's files and the sizes its marker records (None: nothing)."""
    files = unit_files(folder)
    if files is None or len(files) != len(recorded):
        return f"its marker records {len(recorded)} files, the unit has {len(files or ())}"
    for rel, want in zip(files, recorded):
        if want != "-" and sizes.get(rel) != want:
            got = sizes.get(rel)
            return f"{rel} is missing" if got is None else f"{rel} has {got} bytes, its marker says {want}"
    return None


def marker_suffix(fp: str, folder: str, sizes: dict[str, int]) -> str:
    """What follows `_done-` in the marker of a unit written with files of these sizes."""
    return ".".join([fp] + [str(sizes[rel]) if rel in sizes else "-" for rel in unit_files(folder)])


class Unit(NamedTuple):
    """One unit of the run root: its folder, the fingerprint it must carry now, its marker's suffix
    (None: no marker) and whether its files are those the marker vouches for. A named tuple: a plan
    builds 312,560 of them for 80 members x a million images, in about half the time frozen
    dataclasses took (1.1 s against 2.1 s here)."""

    folder: str
    fingerprint: str
    stored: str | None = None
    intact: bool = True

    @property
    def done(self) -> bool:
        return self.intact and self.stored is not None and self.stored.partition(".")[0] == self.fingerprint

    def write(self, store: Store, tables: dict[str, pa.Table]) -> None:
        """Write the unit's files (relative path -> pyarrow table) whole, replacing the marker it had."""
        write_unit(store, self.folder, self.fingerprint, tables, self.stored)


def write_unit(store: Store, folder: str, fp: str, tables: dict[str, pa.Table], stale: str | None = None) -> None:
    """Write a unit whole: drop the marker it had (`stale`: its suffix), write the files, then the
    marker with the fingerprint `fp` and the files' sizes."""
    files = unit_files(folder) or ()
    unknown = [rel for rel in tables if rel not in files]
    if unknown:
        raise ValueError(f"unit {folder} writes {unknown[0]}, which units.UNIT_FILES does not list")
    if stale is not None:
        store.delete(f"{folder}/{MARKER}{stale}")
    sizes = {rel: store.write_parquet(rel, table) for rel, table in tables.items()}
    store.write_bytes(f"{folder}/{MARKER}{marker_suffix(fp, folder, sizes)}", b"")


def shard_folders(store: Store, shard: int) -> list[str]:
    """Every folder holding files of shard `shard`: each member's attributions, then each kind's."""
    members = [folder[len(_MEMBER):] for folder in store.list_dirs(ATTRIBUTIONS) if folder.startswith(_MEMBER)]
    return [UnitPath(ATTRIBUTIONS, shard, m).folder for m in members] + \
        [UnitPath(kind, shard).folder for kind in SHARD_KINDS]


def remove_shards(store: Store, shards: list[int]) -> None:
    """Delete every folder of shards that left the plan (their images left the data set), so that reading
    a kind's folder (attributions/, scores/, …) returns each image of the data set once."""
    for s in shards:
        for folder in shard_folders(store, s):
            store.delete(folder)


def listed_models(done: dict[str, str]) -> set[str]:
    """The model ids of a listing's attribution units (`units_by_model`'s keys, without parsing shards:
    a listing holds a unit per member and shard, 300,000 and more at scale; a slice takes 0.06 s of them,
    a regular expression 0.38 s)."""
    start = len(_MEMBER)
    return {folder[start:folder.rindex(_SHARD)] for folder in done if folder.startswith(_MEMBER)}


def listed_shards(done: dict[str, str]) -> set[int]:
    """The shards of a listing's units (a slice per folder, as `listed_models`)."""
    return {int(d) for d in {folder.rpartition(_SHARD)[2] for folder in done} if d.isdigit()}


def units_by_model(done: dict[str, str]) -> dict[str, dict[int, str]]:
    """Attribution markers grouped: {model_id: {shard: marker suffix}}."""
    out: dict[str, dict[int, str]] = defaultdict(dict)
    for folder, fp in done.items():
        path = UnitPath.parse(folder)
        if path is not None and path.model_id is not None:
            out[path.model_id][path.shard] = fp
    return out
