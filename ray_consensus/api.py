"""The Python API: run a spec, check it, and read a run root back.

    import ray_consensus as rc

    record = rc.run("spec.yaml")          # a YAML path, a dict or a RunSpec; resumes where it stopped
    plan = rc.validate("spec.yaml")       # the plan and schedule, in seconds, without Ray
    r = rc.open_run("runs/demo")          # a local folder or s3://bucket/prefix
    r.models                              # pandas: one row per member (and the consensus)
    r.consensus("cat_0003")               # (H, W) the image's consensus map
    r.maps("cat_0003")["resnet10t"]       # (H, W) one member's map

The CLI is a thin layer over these functions. Every error a user can fix is an
`errors.UserError` (one line). Importing this module imports neither torch, timm nor Ray (nor
pyarrow): each function imports what it needs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Union

from ray_consensus.errors import SpecError
from ray_consensus.spec.config import RunSpec, StorageSpec, load_spec_file, parse_spec

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from ray_consensus.planning.plan import Plan
    from ray_consensus.runroot.record import PlanSummary, RunRecord
    from ray_consensus.runroot.status import RunStatus
    from ray_consensus.storage.store import Store

SpecLike = Union[str, os.PathLike, dict, RunSpec]


def load_spec(spec: SpecLike) -> RunSpec:
    """A spec given as a YAML file's path, as data (a dict, as the YAML parses) or as a RunSpec, checked."""
    if isinstance(spec, RunSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    if isinstance(spec, (str, os.PathLike)):
        return parse_spec(load_spec_file(spec))
    raise SpecError(f"a spec is a YAML file's path, a dict or a RunSpec, not {type(spec).__name__}")


def run(spec: SpecLike, force: bool = False, progress: bool = True, report: bool = True) -> RunRecord:
    """Compute attributions, consensus, scores, tables and the report into the spec's run.output
    (resuming: complete units are not recomputed; `force`: every unit is). Returns the run's record
    (run.json). Starts or joins Ray."""
    from ray_consensus.runner import execute

    return execute(load_spec(spec), force=force, progress=progress, report=report)


def validate(spec: SpecLike) -> PlanSummary:
    """Check a spec (timm names, weights, the data set, the run root) and plan it without Ray: the plan's
    counts, with the schedule `run` would use as far as it is known without a cluster. Writes nothing."""
    from ray_consensus.planning.plan import make_plan
    from ray_consensus.planning.preflight import preflight

    spec = load_spec(spec)
    store, manifest, listing = preflight(spec)
    plan = make_plan(spec, store, manifest, False, listing)
    return dataclasses.replace(plan.summary(spec, manifest), schedule=planned_schedule(spec, plan))


def planned_schedule(spec: RunSpec, plan: Plan) -> str:
    """The schedule `run` would use, for the capacity known without a cluster."""
    from ray_consensus.planning.schedule import Capacity, make_schedule

    attribute = plan.to_attribute()
    members = {m for p in attribute for m in p.models_to_compute}
    if not members:
        return "nothing to attribute"
    if spec.resources.num_gpus > 0 and spec.resources.max_gpus is None:
        return (f"{len(members)} members on GPU slots of {spec.resources.num_gpus:g} GPU each: how many run at once "
                f"depends on the cluster's GPUs, read when the run starts (set resources.max_gpus to see it here)")
    return make_schedule(spec, len(members), Capacity.of_spec_or_machine(spec), len(attribute)).describe()


def open_run(root: str | os.PathLike, storage: StorageSpec | dict | None = None) -> RunResults:
    """A run root read back (`RunResults`). S3 settings: `storage` (a StorageSpec or its fields as a
    dict), else the run's stored spec's, else the AWS variables (as for run.json itself). Raises
    SpecError (one line) when the root holds no run."""
    from ray_consensus.runroot.record import RunRecord
    from ray_consensus.storage.store import open_store

    if isinstance(storage, dict):
        storage = _storage_of(storage)
    uri = os.fspath(root)
    store = open_store(uri, storage)
    record = RunRecord.load(store)
    if storage is None and record.spec.storage != StorageSpec():
        store = open_store(uri, record.spec.storage)
    return RunResults(store, record)


def _storage_of(data: dict) -> StorageSpec:
    """Storage settings from their fields, with the spec's one-line errors."""
    from ray_consensus.spec.fields import build

    return build(StorageSpec, data, "storage")


class RunResults:
    """A run root's stored results: each table property reads the stored table as a pandas frame when
    asked (columns as README's "What a run writes" lists them); `consensus` and `maps` read one image's
    shard only. `record` is the run's run.json."""

    def __init__(self, store: Store, record: RunRecord):
        self.store, self.record = store, record
        self._shards = None  # image_id -> shard, from the stored manifest on first use

    def __repr__(self) -> str:
        return (f"RunResults({self.root!r}: {self.record.status}, {self.record.plan.images} images, "
                f"{self.record.plan.models} members)")

    @property
    def root(self) -> str:
        return self.store.root

    @property
    def status(self) -> RunStatus:
        """Done, missing and damaged units per member and shard (`ray-consensus status`)."""
        from ray_consensus.runroot.status import run_status

        return run_status(self.store)

    # ------------------------------------------------------------ tables

    @property
    def models(self) -> pd.DataFrame:
        """tables/models.parquet: one row per member and one for the consensus."""
        return self._table("tables/models.parquet")

    @property
    def correlations(self) -> pd.DataFrame:
        """tables/correlations.parquet: consensus score against accuracy, with intervals."""
        return self._table("tables/correlations.parquet")

    @property
    def robustness(self) -> pd.DataFrame:
        """tables/robustness.parquet: the ranking under random sub-committees."""
        return self._table("tables/robustness.parquet")

    @property
    def images(self) -> pd.DataFrame:
        """tables/images/: one row per image (with its `shard`)."""
        from ray_consensus.runroot.units import IMAGES

        return self._table(IMAGES, folder=True)

    @property
    def scores(self) -> pd.DataFrame:
        """scores/: one row per (member, image) (with its `shard`)."""
        return self._table("scores", folder=True)

    @property
    def errors(self) -> pd.DataFrame:
        """errors/: the inputs rejected and the (member, image) pairs whose map was not finite (`shard` -1:
        rejected while listing)."""
        return self._table("errors", folder=True)

    def _table(self, rel: str, folder: bool = False) -> pd.DataFrame:
        # A folder's shards are its first level: no recursive listing before pyarrow lists it to read it.
        if not (self.store.list_dirs(rel) if folder else self.store.exists(rel)):
            raise SpecError(f"{self.store.uri(rel)} not found (run.json says {self.record.status!r}): "
                            f"`ray-consensus status {self.root}` shows what is missing")
        return self.store.read_parquet(rel).to_pandas()

    # ------------------------------------------------------------ report and masks

    def write_report(self) -> str:
        """(Re)write report/index.html from the stored run (a finished one); returns its URI."""
        from ray_consensus.report.collect import write_report

        return write_report(self.store)

    def export_masks(self, out: str, rule: str = "top", fraction: float = 0.2, threshold: float = 0.5,
                     progress=None) -> dict:
        """Pseudo segmentation masks from the consensus of every voted image, written under `out` (local or
        s3://), in each image's own pixel grid; returns the summary (rule, counts, mean IoU against the
        ground-truth masks where the data set has them). `rule`: top (keep `fraction` of the map's cells)
        | threshold (`threshold` times the map's maximum) | otsu; `progress`: a callable given a line now
        and then."""
        from ray_consensus.report.pseudo_masks import MaskRule, export_masks

        return export_masks(self.root, out, MaskRule(rule, fraction, threshold), progress)

    # ------------------------------------------------------------ maps

    def consensus(self, image_id: str) -> np.ndarray:
        """(H, W) float32 the image's consensus map (the vote of the members' normalised maps; NaN where no
        member had a finite map)."""
        import numpy as np

        from ray_consensus.runroot.contract import file_of, read_consensus

        shard = self._shard_of(image_id)
        self._require(file_of("consensus", shard), f"image {image_id!r} (shard {shard}) is not reduced yet")
        rows = read_consensus(self.store, shard, columns=["image_id", "height", "width", "consensus"])
        row = rows[rows["image_id"] == image_id].iloc[0]
        return np.asarray(row["consensus"], np.float32).reshape(int(row["height"]), int(row["width"]))

    def maps(self, image_id: str) -> dict[str, np.ndarray]:
        """Member id -> (H, W) float64 its map of the image as computed (not normalised; NaN where the map
        or the logits were not finite), for the committee's members in order."""
        from ray_consensus.runroot.contract import attributions_file, read_maps

        shard, side = self._shard_of(image_id), self.record.spec.run.map_size
        out = {}
        for member in self.record.spec.committee:
            self._require(attributions_file(member.id, shard), f"member {member.id} has no map of {image_id!r} "
                                                               f"yet (shard {shard})")
            out[member.id] = read_maps(self.store, member.id, shard, side * side)[image_id].reshape(side, side)
        return out

    def _shard_of(self, image_id: str) -> int:
        from ray_consensus.runroot.contract import read_stored_manifest

        if self._shards is None:
            manifest = read_stored_manifest(self.store, columns=["image_id", "shard"])
            if manifest is None:
                raise SpecError(f"no manifest at {self.root} (run.json says {self.record.status!r})")
            self._shards = manifest.set_index("image_id")["shard"]
        if image_id not in self._shards.index:
            raise SpecError(f"image {image_id!r} is not in the run's manifest ({self.store.uri('manifest.parquet')})")
        return int(self._shards.loc[image_id])

    def _require(self, rel: str, what: str) -> None:
        if not self.store.exists(rel):
            raise SpecError(f"{what}: {self.store.uri(rel)} not found; `ray-consensus status {self.root}` shows "
                            f"what is missing")
