"""The records that pass between the attribution stage's parts, and the events the driver's run yields.

Between the stages:

* `ShardTask`: the shard, its images (`contract.ImageRef`), its inputs unit and the attribution
  units still to compute.
* `DecodedShard`: the task, the images that decoded, their pixels on the shared grid and their
  superpixels (`decode_stage.DecodeShard` makes it).
* `StageContext`: what every part needs (spec, class count, run-root store, schedule), pickled once
  into each decode task and slot.

Events of `dispatch.Dispatcher.run`, in the order they happen:

* `UnitWritten`: a slot wrote one member's unit of a shard.
* `WindowDone`: a member finished its work item of a window (its shards in that window).
* `ShardDone`: every unit of a shard is written; the shard's reduce can start.
* `AttributionsDone`: the last event: the stage's wall time and every member load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_consensus.planning.schedule import Schedule
from ray_consensus.runroot.contract import ImageRef
from ray_consensus.runroot.units import Unit
from ray_consensus.spec.config import RunSpec
from ray_consensus.storage.store import Store


@dataclass
class ShardTask:
    """What to do for one shard."""

    shard: int
    images: list[ImageRef]
    inputs: Unit                      # the shard's inputs/errors unit (written when not done)
    attributions: dict[str, Unit]     # model_id -> attribution unit still to compute


@dataclass
class DecodedShard:
    """A shard's usable images on the shared grid: pixels uint8 (N, S, S, 3), segments int32 (N, S, S)
    superpixel ids when the explainer needs them (else None)."""

    task: ShardTask
    images: list[ImageRef]
    pixels: np.ndarray
    segments: np.ndarray | None


@dataclass
class StageContext:
    spec: RunSpec
    num_classes: int
    store: Store
    schedule: Schedule
    segmentation: dict | None = None  # `superpixels.segment` settings when the explainer needs them (`segmentation_of`)


@dataclass(frozen=True)
class UnitWritten:
    """Member `model_id`'s unit of `shard` is written: `n_images` images explained, `n_errors` of the
    shard's inputs could not be used (together: the shard's manifest rows, the progress bar's count)."""

    model_id: str
    shard: int
    n_images: int
    n_errors: int


@dataclass(frozen=True)
class WindowDone:
    """Member `model_id` finished its work item of window `window` (1 to `n_windows`) in `seconds`
    (from the item's dispatch: its member load included)."""

    model_id: str
    window: int
    n_windows: int
    seconds: float


@dataclass(frozen=True)
class ShardDone:
    """A shard whose units are all written: its images and the inputs that could not be used (None when
    only its inputs unit was written: no slot saw it), the members computed for it in this run."""

    shard: int
    n_images: int | None
    n_errors: int | None
    models: list[str]


@dataclass(frozen=True)
class AttributionsDone:
    """Every unit is written: the stage's wall seconds (from the slots' request) and each member load
    as (model_id, seconds), in no particular order."""

    seconds: float
    loads: list[tuple[str, float]]


AttributionEvent = UnitWritten | WindowDone | ShardDone | AttributionsDone
