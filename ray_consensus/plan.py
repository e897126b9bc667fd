"""The plan: every unit a run needs, the fingerprint each must carry, and which are already done.

A unit is a folder of the run root written whole, with a marker `_done-<fingerprint>` (see
`units`). Its fingerprint hashes exactly what its content is computed from, so comparing it
with the stored marker decides whether the unit is recomputed. The rule (also in the README):

    inputs of shard s        the shard's images (image_id, uri, label, mask_uri), run.image_size,
                             run.map_size, dataset.mask_foreground; for explainers with superpixels
                             (LIME) the explainer's parameters
    attributions (m, s)      member m's id, arch, weights and kwargs; the explainer's name and every
                             parameter; method.target, method.seed, run.map_dtype; resources.autocast
                             unless it is none (float32); and the inputs fingerprint of s
    reduce unit of s         each member's attribution fingerprint, the method options but
                             method.bootstrap and method.permutations (table options), the
                             robustness sub-committees, and the reduce unit's contract version

Not in any fingerprint: how the work is executed, which changes the maps at most by float
rounding (resources.batch_size and committee[].batch_size, actors, GPUs, CPUs, channels_last;
SmoothGrad's noise is drawn per image, so batching does not change it), where the results go
(storage), and what the report shows (run.gallery). run.shard_size is fixed per run root by
its manifest. `tests/test_plan.py` states the rule change by change.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from ray_consensus.config import RunSpec
from ray_consensus.contract import ImageRef, read_stored_manifest
from ray_consensus.data import Manifest, assign_shards
from ray_consensus.storage import Store
from ray_consensus.units import Unit, attributions_dir, completed_later, shard_dir


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

    def summary(self, spec: RunSpec, manifest: Manifest) -> dict:
        """Counts for run.json and `validate`: images, shards, units to compute, passes."""
        fwd, bwd = spec.explainer.params.passes_per_image()
        todo = [(p.shard, len(p.models_to_compute)) for p in self.shards.values()]
        todo_images = sum(self.n_images(s) * k for s, k in todo)
        return {
            "images": int(len(self.manifest)), "shards": len(self.shards), "models": len(spec.committee),
            "classes": manifest.num_classes, "manifest_errors": int(len(manifest.errors)),
            "attribution_units": len(self.shards) * len(spec.committee),
            "attribution_units_to_compute": sum(k for _, k in todo),
            "reduce_units_to_compute": len(self.to_reduce()),
            "forward_passes": todo_images * (fwd + 1), "backward_passes": todo_images * bwd,
        }


def robustness_sizes(spec: RunSpec) -> list[int]:
    """Sub-committee sizes of the robustness table: the spec's, else up to 5 sizes from 3 to K-1."""
    k = len(spec.committee)
    if spec.method.robustness_sizes:
        return [int(s) for s in spec.method.robustness_sizes]
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

    def __call__(self, part_json: str) -> str:
        h = hashlib.sha256(self.prefix)
        h.update(part_json.encode())
        h.update(self.suffix)
        return h.hexdigest()[:16]


def inputs_recipe(spec: RunSpec) -> _Recipe:
    params = spec.explainer.params
    return _Recipe("inputs", _Recipe._HOLE, spec.run.image_size, spec.run.map_size, spec.dataset.mask_foreground,
                   params.as_dict() if params.needs_segments else None)


def attribution_recipe(spec: RunSpec, member) -> _Recipe:
    precision = [spec.resources.autocast] if spec.resources.autocast != "none" else []
    return _Recipe("attr", member.id, member.arch, member.weights, member.kwargs, spec.explainer.name,
                   spec.explainer.params.as_dict(), spec.method.target, spec.method.seed, spec.run.map_dtype,
                   _Recipe._HOLE, *precision)


# The method options a reduced shard depends on (bootstrap and permutations are table options).
REDUCE_OPTIONS = ("target", "voted", "normalise", "vote", "similarity", "leave_one_out", "robustness_sizes",
                  "robustness_trials", "seed")
# Bumped when a reduce unit gains or changes files: 2 added aggregates/ and tables/images/ (0.2.0).
REDUCE_CONTRACT = 2


def reduce_recipe(spec: RunSpec, subsets: list) -> _Recipe:
    method = {key: getattr(spec.method, key) for key in REDUCE_OPTIONS}
    return _Recipe("reduce", _Recipe._HOLE, method, [(k, t, list(map(int, idx))) for k, t, idx in subsets],
                   {"contract": REDUCE_CONTRACT})


def _shard_contents(table: pd.DataFrame) -> list[str]:
    """Each row's (image_id, uri, label, mask_uri) as the JSON list of strings the inputs recipe hashes:
    exactly `json.dumps` of the row of `astype(str)` values (missing values stay NaN), built a column
    at a time (a million rows in about a second)."""
    text = table[["image_id", "uri", "label", "mask_uri"]].astype(str)
    tokens = []
    for col in text.columns:
        inner, quoted = _json_strings(text[col].to_numpy(dtype=object))
        tokens.append((inner, quoted))
    (a, qa), (b, qb), (c, qc), (d, qd) = tokens
    if qa and qb and qc and qd:
        return [f'["{w}", "{x}", "{y}", "{z}"]' for w, x, y, z in zip(a, b, c, d)]
    if qa and qb and qc:
        return [f'["{w}", "{x}", "{y}", {z}]' for w, x, y, z in zip(a, b, c, d)]
    a, b, c, d = ([f'"{v}"' for v in items] if quoted else items for items, quoted in tokens)
    return [f"[{w}, {x}, {y}, {z}]" for w, x, y, z in zip(a, b, c, d)]


def _json_strings(values: np.ndarray) -> tuple[list[str], bool]:
    """JSON of each value of an object array of strings and missing (NaN) values, as json.dumps writes
    them in a list: (items, quoted), where `quoted` says the items are the strings' JSON without their
    quotes (a column without missing values), else each item is its whole JSON token. One json.dumps
    of all the strings, split at the '", "' between them (a quote inside a string is always escaped,
    so that sequence only ever separates two strings)."""
    missing = pd.isna(values)  # after astype(str), whatever is not missing is a string
    strings = values[~missing].tolist()
    inner = json.dumps(strings)[2:-2].split('", "') if strings else []
    if not missing.any():
        return inner, True
    full = np.empty(len(values), dtype=object)
    full[missing] = "NaN" if pd.isna(values[missing]).all() else [json.dumps(v) for v in values[missing]]
    full[~missing] = [f'"{x}"' for x in inner]
    return full.tolist(), False


# ---------------------------------------------------------------- the plan

def make_plan(spec: RunSpec, store: Store, manifest: Manifest, force: bool = False,
              listing: Callable[[], dict[str, str]] | None = None) -> Plan:
    """The plan of `spec` over the data set's manifest and what the run root holds (`force`: as if it
    held nothing; `listing`: the run root's complete units, `units.completed_later` started earlier,
    else listed here while the fingerprints are hashed). Images keep the shard the run root's manifest
    gave them; new ones fill new shards."""
    listing = (lambda: {}) if force else listing or completed_later(store)
    previous = read_stored_manifest(store, columns=["image_id", "shard"])
    table = assign_shards(manifest.table, previous, spec.run.shard_size)
    shard_col = table["shard"].to_numpy()
    ids = np.unique(shard_col)
    starts = np.searchsorted(shard_col, ids, side="left")
    stops = np.searchsorted(shard_col, ids, side="right")
    rows = {int(s): (int(a), int(b)) for s, a, b in zip(ids, starts, stops)}
    subsets = subcommittees(len(spec.committee), robustness_sizes(spec), spec.method.robustness_trials,
                               spec.method.seed)

    contents = _shard_contents(table)
    inputs_fp, attr_recipes = inputs_recipe(spec), [attribution_recipe(spec, m) for m in spec.committee]
    reduce_fp = reduce_recipe(spec, subsets)
    member_json = [json.dumps(m.id) for m in spec.committee]
    fingerprints = {}
    for s, (start, stop) in rows.items():
        ifp = inputs_fp("[" + ", ".join(contents[start:stop]) + "]")
        ifp_json = json.dumps(ifp)
        attr = [recipe(ifp_json) for recipe in attr_recipes]
        pairs = ", ".join(f'[{mj}, "{fp}"]' for mj, fp in zip(member_json, attr))
        fingerprints[s] = ifp, attr, reduce_fp(f"[{pairs}]")

    done = listing()
    shards = {}
    prefixes = [(m.id, attributions_dir(m.id, 0)[:-5]) for m in spec.committee]
    for s, (ifp, attr, rfp) in fingerprints.items():
        suffix = f"{s:05d}"  # attributions_dir(model_id, s), without formatting it 300,000 times
        units = {model_id: Unit(prefix + suffix, fp, done.get(prefix + suffix))
                 for (model_id, prefix), fp in zip(prefixes, attr)}
        inputs_dir, reduce_dir = shard_dir("inputs", s), shard_dir("consensus", s)
        shards[s] = ShardPlan(s, Unit(inputs_dir, ifp, done.get(inputs_dir)), units,
                              Unit(reduce_dir, rfp, done.get(reduce_dir)))
    return Plan(table, shards, subsets, rows)
