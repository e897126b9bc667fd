"""The plan: every unit a run needs, the fingerprint each must carry, and which are already done.

A unit is a folder of the run root written whole, with a marker `_done-<fingerprint>` (see
`units`). Its fingerprint hashes exactly what its content is computed from, so comparing it
with the stored marker decides whether the unit is recomputed. The rule (also in the README):

    inputs of shard s        the shard's images (image_id, uri, label, mask_uri, version: what the image
                             file and its mask are, from the listing), run.image_size, run.map_size,
                             dataset.mask_foreground; for explainers with superpixels (LIME) the
                             explainer's parameters
    attributions (m, s)      member m's id, arch, weights and kwargs, and a checkpoint's content (its
                             SHA-256, or its ETag on S3); the explainer's name and every parameter;
                             method.target, method.seed, run.map_dtype; resources.autocast unless it
                             is none (float32); and the inputs fingerprint of s
    reduce unit of s         each member's attribution fingerprint, the method options but
                             method.bootstrap and method.permutations (table options), the
                             robustness sub-committees, and the reduce unit's contract version

Not in any fingerprint: how the work is executed, which changes the maps at most by float
rounding (resources.batch_size and committee[].batch_size, actors, GPUs, CPUs, channels_last;
SmoothGrad's noise is drawn per image, so batching does not change it), where the results go
(storage), and what the report shows (run.gallery). run.shard_size is fixed per run root by
its manifest. `tests/test_plan.py` states the rule change by change.

A run root whose manifest.parquet has no `version` column (written before versions were kept) holds
units fingerprinted without the images' versions and checkpoints' contents: a unit whose marker
carries that older fingerprint is taken as computed from the content seen now, and `Plan.adopt`
rewrites its marker with the current one (so from then on a change of content is noticed).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from ray_consensus.dataset.manifest import Manifest, assign_shards
from ray_consensus.runroot.contract import ImageRef, read_stored_manifest
from ray_consensus.runroot.record import PlanSummary
from ray_consensus.runroot.units import (
    ATTRIBUTIONS,
    MARKER,
    Listing,
    Unit,
    UnitPath,
    completed_later,
    listed_models,
    listed_shards,
    listing_prefix,
    shard_digits,
)
from ray_consensus.spec.config import RunSpec
from ray_consensus.storage.datafiles import content_version
from ray_consensus.storage.store import Store

# The manifest columns each image contributes to its shard's inputs fingerprint; run roots written
# before versions were kept fingerprinted the first four.
CONTENT_COLUMNS = ("image_id", "uri", "label", "mask_uri", "version")
UNVERSIONED_COLUMNS = CONTENT_COLUMNS[:4]


@dataclass
class ShardPlan:
    """The units of one shard."""

    shard: int
    inputs: Unit
    attributions: dict[str, Unit]   # model_id -> unit, in committee order
    reduce: Unit

    @functools.cached_property
    def models_to_compute(self) -> list[str]:
        return [m for m, u in self.attributions.items() if not u.done]

    @property
    def needs_decode(self) -> bool:
        return not self.inputs.done or bool(self.models_to_compute)


@dataclass
class Plan:
    manifest: pd.DataFrame             # image_id, uri, label, mask_uri, shard; sorted by shard, image_id
    shards: dict[int, ShardPlan]       # in shard order
    subsets: list                      # robustness sub-committees: (k, trial, member indices)
    _rows: dict[int, tuple[int, int]]  # shard -> its row range in `manifest`
    adopted: list = field(default_factory=list)  # (folder, old marker suffix, new one): see the docstring
    gone: list = field(default_factory=list)     # shards the run root holds that left the plan (`units.remove_shards`)
    others: list = field(default_factory=list)   # members with attributions in the run root, not in the committee

    def adopt(self, store: Store) -> None:
        """Rewrite the markers of the units taken over from a run root written before versions were kept
        (their marker carries the fingerprint without versions) with the current fingerprint: the new
        marker first, then the old one goes."""
        for folder, old, new in self.adopted:
            store.write_bytes(f"{folder}/{MARKER}{new}", b"")
            store.delete(f"{folder}/{MARKER}{old}")

    @property
    def shard_ids(self) -> list[int]:
        return list(self.shards)

    def n_images(self, shard: int) -> int:
        start, stop = self._rows[shard]
        return stop - start

    def images(self, shard: int) -> list[ImageRef]:
        start, stop = self._rows[shard]
        rows = self.manifest.iloc[start:stop]
        return [ImageRef(i, u, int(lab), None if pd.isna(mk) else mk)
                for i, u, lab, mk in zip(rows["image_id"], rows["uri"], rows["label"], rows["mask_uri"])]

    def to_attribute(self) -> list[ShardPlan]:
        """Shards with inputs or attribution units to compute."""
        return [p for p in self.shards.values() if p.needs_decode]

    def to_reduce(self) -> list[ShardPlan]:
        return [p for p in self.shards.values() if not p.reduce.done]

    def summary(self, spec: RunSpec, manifest: Manifest) -> PlanSummary:
        """Counts for run.json and `validate`: images, shards, units to compute, passes."""
        fwd, bwd = spec.explainer.params.passes_per_image()
        todo = [(p.shard, len(p.models_to_compute)) for p in self.shards.values()]
        todo_images = sum(self.n_images(s) * k for s, k in todo)
        return PlanSummary(
            images=int(len(self.manifest)), shards=len(self.shards), models=len(spec.committee),
            classes=manifest.num_classes, manifest_errors=int(len(manifest.errors)),
            attribution_units=len(self.shards) * len(spec.committee),
            attribution_units_to_compute=sum(k for _, k in todo),
            reduce_units_to_compute=len(self.to_reduce()),
            damaged_units=sum(not u.intact for p in self.shards.values()
                              for u in (p.inputs, p.reduce, *p.attributions.values())),
            shards_to_remove=len(self.gone),
            members_not_in_committee=self.others,
            forward_passes=todo_images * (fwd + 1), backward_passes=todo_images * bwd,
        )


def robustness_sizes(spec: RunSpec) -> list[int]:
    """Sub-committee sizes of the robustness table: the spec's, else up to 5 sizes from 3 to K-1."""
    k = len(spec.committee)
    if spec.method.robustness_sizes:
        return list(spec.method.robustness_sizes)
    return sorted({s for s in np.linspace(3, k - 1, num=min(5, max(k - 3, 0))).round().astype(int)} if k > 3
                  else set())


def subcommittees(n_models: int, sizes: list[int], trials: int, seed: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """Random sub-committees for re-running the consensus with fewer members (the robustness table).

    Args:
        n_models: size K of the full committee (members are indices 0..K-1).
        sizes: sub-committee sizes k; those outside 2 <= k <= K are skipped.
        trials: draws per size.
        seed: base seed. Each size gets its own generator seeded with (seed, k), so the
            draws for one size do not change when other sizes are added or removed.

    Returns:
        (k, trial, members) for each kept size in order and each trial 0..trials-1;
        ``members`` is a sorted int64 array of k distinct member indices.
    """
    committees = []
    for k in sizes:
        if not 2 <= k <= n_models:
            continue
        rng = np.random.default_rng((seed, k))
        for trial in range(trials):
            members = np.sort(rng.choice(n_models, size=k, replace=False)).astype(np.int64)
            committees.append((k, trial, members))
    return committees


# ---------------------------------------------------------------- fingerprint recipes

class _Recipe:
    """fingerprint(*parts) with one part filled in per unit: the JSON around a placeholder is built
    once, so a million units cost a hash each (the same hash as `units.fingerprint(*parts)`)."""

    _HOLE = "\x00hole\x00"

    def __init__(self, *parts):
        text = json.dumps(parts, sort_keys=True, default=str)
        self.prefix, self.suffix = (p.encode() for p in text.split(json.dumps(self._HOLE)))

    def __call__(self, *part_json: str | bytes | memoryview) -> str:
        """The hash with the JSON of the hole's part (given in pieces, joined) in its place."""
        h = hashlib.sha256(self.prefix)
        for piece in part_json:
            h.update(piece.encode() if isinstance(piece, str) else piece)
        h.update(self.suffix)
        return h.hexdigest()[:16]


def inputs_recipe(spec: RunSpec) -> _Recipe:
    params = spec.explainer.params
    return _Recipe("inputs", _Recipe._HOLE, spec.run.image_size, spec.run.map_size, spec.dataset.mask_foreground,
                   params.as_dict() if params.needs_segments else None)


def attribution_recipe(spec: RunSpec, member, weights_content: str = "") -> _Recipe:
    """`weights_content`: what the member's checkpoint holds (`weights_content`; '' for none)."""
    precision = [spec.resources.autocast] if spec.resources.autocast != "none" else []
    content = [{"weights_content": weights_content}] if weights_content else []
    return _Recipe("attr", member.id, member.arch, member.weights, member.kwargs, spec.explainer.name,
                   spec.explainer.params.as_dict(), spec.method.target, spec.method.seed, spec.run.map_dtype,
                   _Recipe._HOLE, *precision, *content)


def weights_content(spec: RunSpec, member) -> str:
    """What a member's checkpoint holds (`storage.content_version`); '' for pretrained and random weights
    (timm's hub names its weights; random ones are seeded from the member)."""
    return "" if member.weights in ("pretrained", "random") else content_version(member.weights, spec.storage)


# The method options a reduced shard depends on (bootstrap and permutations are table options).
REDUCE_OPTIONS = ("target", "voted", "normalise", "vote", "similarity", "leave_one_out", "robustness_sizes",
                  "robustness_trials", "seed")
# Bumped when a reduce unit gains or changes files: 2 added aggregates/ and tables/images/ (0.2.0); 3 votes
# on finite maps only (errors/shard=N/attribution.parquet, n_nonfinite, n_predicted) and scores the
# consensus as stored (float32).
REDUCE_CONTRACT = 3


def reduce_recipe(spec: RunSpec, subsets: list) -> _Recipe:
    method = {key: getattr(spec.method, key) for key in REDUCE_OPTIONS}
    return _Recipe("reduce", _Recipe._HOLE, method, [(k, t, list(map(int, idx))) for k, t, idx in subsets],
                   {"contract": REDUCE_CONTRACT})


class _ShardText:
    """The JSON the inputs recipe hashes for each image of the table: `json.dumps` of the row of
    `astype(str)` values of `columns` (image_id, uri, label, mask_uri, version; missing values stay
    NaN), built by pyarrow's string kernels into one buffer, each row followed by ", ", so that a
    shard's rows (start..stop, contiguous) are one slice of it: a million rows in about a second,
    and no Python string per row."""

    # What json.dumps (ensure_ascii) writes otherwise than as the character itself: all but printable
    # ASCII, and the quote and backslash (json.encoder's ESCAPE_ASCII).
    _ESCAPED = r'[^\x20-\x7e]|["\\]'

    def __init__(self, table: pd.DataFrame, columns=CONTENT_COLUMNS):
        import pyarrow.compute as pc

        tokens = [self._tokens(table[col]) for col in columns]
        rows = pc.binary_join_element_wise(_text("["), pc.binary_join_element_wise(*tokens, _text(", ")),
                                           _text("], "), _text(""))
        _, offsets, data = rows.buffers()
        self._offsets = np.frombuffer(offsets, np.int64)[rows.offset:rows.offset + len(rows) + 1]
        self._data = memoryview(data) if data is not None else memoryview(b"")

    def __call__(self, start: int, stop: int) -> memoryview:
        """Rows start..stop-1 as the JSON items of a list, joined by ", " (without the brackets)."""
        return self._data[self._offsets[start]:max(self._offsets[stop] - 2, self._offsets[start])]

    @classmethod
    def _tokens(cls, column: pd.Series):
        """Each value's JSON token: the string's JSON, or NaN where the value is missing."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if pd.api.types.is_integer_dtype(column.dtype):
            text = pa.array(column.to_numpy()).cast(pa.large_string())  # digits: nothing to escape
        else:
            text = cls._escaped(column)
        return pc.fill_null(pc.binary_join_element_wise(_text('"'), text, _text('"'), _text("")), _text("NaN"))

    @classmethod
    def _escaped(cls, column: pd.Series):
        """The column's values as astype(str) writes them (missing values null), each as JSON writes
        it between its quotes: the few that JSON escapes through json.dumps, the rest as they are."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not (pd.api.types.is_string_dtype(column.dtype) or column.dtype == object):
            column = column.astype(str)
        try:
            text = pa.array(column, type=pa.large_string(), from_pandas=True)
        except (pa.ArrowTypeError, pa.ArrowInvalid):  # objects other than strings: as astype(str) writes them
            text = pa.array(column.astype(str), type=pa.large_string(), from_pandas=True)
        if isinstance(text, pa.ChunkedArray):  # a pandas column backed by pyarrow
            text = text.combine_chunks()
        escaped = pc.fill_null(pc.match_substring_regex(text, cls._ESCAPED), False)
        if pc.any(escaped).as_py():
            where = pa.array(np.flatnonzero(escaped.to_numpy(zero_copy_only=False)))
            items = [json.dumps(v)[1:-1] for v in text.take(where).to_pylist()]
            text = pc.replace_with_mask(text, escaped, pa.array(items, pa.large_string()))
        return text


def _text(value: str):
    """A pyarrow large_string scalar (the type `_ShardText` builds its columns in)."""
    import pyarrow as pa

    return pa.scalar(value, pa.large_string())


# ---------------------------------------------------------------- the plan

def make_plan(spec: RunSpec, store: Store, manifest: Manifest, force: bool = False,
              listing: Callable[[], Listing] | None = None) -> Plan:
    """The plan of `spec` over the data set's manifest and what the run root holds (`force`: as if it
    held nothing; `listing`: the run root's complete units, `units.completed_later` started earlier,
    else listed here while the fingerprints are hashed). Images keep the shard the run root's manifest
    gave them; new ones fill new shards. A unit whose files are not those its marker vouches for
    (`Listing.damaged`) is to compute; shards the run root holds outside the plan are `Plan.gone`."""
    listing = Listing if force else listing or completed_later(store)
    previous, versioned = _stored_manifest(store)
    table = assign_shards(manifest.table, previous, spec.run.shard_size)
    shard_col = table["shard"].to_numpy()
    ids = np.unique(shard_col)
    starts = np.searchsorted(shard_col, ids, side="left")
    stops = np.searchsorted(shard_col, ids, side="right")
    rows = {int(s): (int(a), int(b)) for s, a, b in zip(ids, starts, stops)}
    subsets = subcommittees(len(spec.committee), robustness_sizes(spec), spec.method.robustness_trials,
                               spec.method.seed)

    weights = [weights_content(spec, m) for m in spec.committee]
    fingerprints = _fingerprints(spec, table, rows, subsets, CONTENT_COLUMNS, weights)
    # A run root written before versions were kept: its units carry the fingerprints without them.
    unversioned = (_fingerprints(spec, table, rows, subsets, UNVERSIONED_COLUMNS, [""] * len(weights))
                   if previous is not None and not versioned and not force else None)

    done = listing()
    damaged = done.damaged
    shards = {}
    prefixes = [(m.id, listing_prefix(ATTRIBUTIONS, m.id)) for m in spec.committee]
    for s, (ifp, attr, rfp) in fingerprints.items():
        suffix = shard_digits(s)  # a member's folder is its prefix + this: no UnitPath built 300,000 times
        units = {model_id: Unit(prefix + suffix, fp, done.get(prefix + suffix), prefix + suffix not in damaged)
                 for (model_id, prefix), fp in zip(prefixes, attr)}
        inputs_dir, reduce_dir = UnitPath("inputs", s).folder, UnitPath("consensus", s).folder
        shards[s] = ShardPlan(s, Unit(inputs_dir, ifp, done.get(inputs_dir), inputs_dir not in damaged), units,
                              Unit(reduce_dir, rfp, done.get(reduce_dir), reduce_dir not in damaged))
    adopted = _adopt(shards, unversioned) if unversioned is not None else []
    return Plan(table, shards, subsets, rows, adopted, gone=_gone(previous, done, rows),
                others=_other_members(done, spec))


def _other_members(done: Listing, spec: RunSpec) -> list[str]:
    """Members whose attribution units the run root holds but the committee no longer names: kept (a
    member dropped for one run computes nothing when it comes back), and read back by `attributions/`."""
    return sorted(listed_models(done) - {m.id for m in spec.committee})


def _gone(previous: pd.DataFrame | None, done: Listing, rows: dict) -> list[int]:
    """Shards the run root holds (in its manifest, or with a unit's marker) that are not in the plan: every
    image of theirs left the data set (new images fill new shards after the last one in the plan)."""
    held = set() if previous is None else {int(s) for s in np.unique(previous["shard"].to_numpy())}
    held |= listed_shards(done)
    return sorted(held - set(rows))


def _stored_manifest(store: Store) -> tuple[pd.DataFrame | None, bool]:
    """The run root's (image_id, shard) rows (None before the first run) and whether it kept versions."""
    import pyarrow as pa

    try:
        return read_stored_manifest(store, columns=["image_id", "shard", "version"]), True
    except pa.ArrowInvalid:  # no `version` column: written before versions were kept
        return read_stored_manifest(store, columns=["image_id", "shard"]), False


def _fingerprints(spec: RunSpec, table: pd.DataFrame, rows: dict[int, tuple[int, int]], subsets: list,
                  columns: tuple[str, ...], weights: list[str]) -> dict[int, tuple[str, list[str], str]]:
    """shard -> (inputs fingerprint, one attribution fingerprint per member, reduce fingerprint), the
    images hashed by `columns`, the members' checkpoints by `weights` (their content)."""
    contents = _ShardText(table, columns)
    inputs_fp = inputs_recipe(spec)
    attr_recipes = [attribution_recipe(spec, m, w) for m, w in zip(spec.committee, weights)]
    reduce_fp = reduce_recipe(spec, subsets)
    member_json = [json.dumps(m.id) for m in spec.committee]
    fingerprints = {}
    for s, (start, stop) in rows.items():
        ifp = inputs_fp(b"[", contents(start, stop), b"]")
        ifp_json = json.dumps(ifp)
        attr = [recipe(ifp_json) for recipe in attr_recipes]
        pairs = ", ".join(f'[{mj}, "{fp}"]' for mj, fp in zip(member_json, attr))
        fingerprints[s] = ifp, attr, reduce_fp(f"[{pairs}]")
    return fingerprints


def _adopt(shards: dict[int, ShardPlan], unversioned: dict) -> list[tuple[str, str, str]]:
    """Units whose marker carries their fingerprint without versions count as done (see the module's
    docstring); returns (folder, its marker's suffix, the suffix with the current fingerprint) for
    `Plan.adopt`."""
    adopted = []

    def take(unit: Unit, old: str) -> Unit:
        if unit.intact and unit.stored is not None and unit.stored.partition(".")[0] == old != unit.fingerprint:
            suffix = unit.fingerprint + unit.stored[len(old):]  # the sizes the marker records stay
            adopted.append((unit.folder, unit.stored, suffix))
            return unit._replace(stored=suffix)
        return unit

    for s, p in shards.items():
        ifp, attr, rfp = unversioned[s]
        p.inputs, p.reduce = take(p.inputs, ifp), take(p.reduce, rfp)
        p.attributions = {m: take(u, fp) for (m, u), fp in zip(p.attributions.items(), attr)}
    return adopted
