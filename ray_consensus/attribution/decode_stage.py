"""The decode stage (CPU): a window of shards decoded once by Ray Data, for every member's slot.

    ShardTask ─► Ray Data: DecodeShard (CPU tasks) ─► a window of decoded shards in the object store

`DecodeShard` reads and decodes a shard's images onto the shared grid (with their superpixels when
the explainer needs them) and writes the shard's `inputs/` and `errors/` unit (when not done).
A decoded window is a list of Arrow blocks with columns `shard` (int64) and `payload`
(the pickled `DecodedShard`), so a slot unpickles only the shards it explains.
"""

from __future__ import annotations

import pickle

import numpy as np

from ray_consensus.attribution.records import DecodedShard, ShardTask, StageContext
from ray_consensus.runroot.contract import ImageRef, encode_inputs, errors_table, file_of
from ray_consensus.spec.config import RunSpec


def segmentation_of(spec: RunSpec) -> dict | None:
    """The explainer's superpixel settings, or None when it needs no superpixels. Decided on the
    driver: decode workers then never import torch."""
    params = spec.explainer.params
    return params.segment_settings() if params.needs_segments else None


def decode_shards(batch: dict, ctx: StageContext) -> dict:
    """Ray Data task stage: rows of pickled ShardTasks -> rows of (shard, pickled DecodedShard)."""
    stage = DecodeShard(ctx)
    shards = [stage.decode(pickle.loads(p)) for p in batch["payload"]]
    return {"shard": np.array([s.task.shard for s in shards], np.int64),
            "payload": np.array([pickle.dumps(s) for s in shards], dtype=object)}


class DecodeShard:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def decode(self, task: ShardTask) -> DecodedShard:
        from ray_consensus.dataset.decode import decode_image, decode_mask, image_size_of, read_input
        from ray_consensus.dataset.superpixels import segment
        from ray_consensus.errors import DecodeError

        spec, seg_params = self.ctx.spec, self.ctx.segmentation
        size, map_size = spec.run.image_size, spec.run.map_size
        good, images, masks, segments, errors = [], [], [], [], []
        for item in task.images:
            try:
                data = read_input(item.uri, spec.storage, "image")
                image = decode_image(data, size)
            except DecodeError as e:
                errors.append(_error(item, "decode", e))
                continue
            mask = None
            if item.mask_uri is not None:  # the data set has masks: every image should have one
                try:
                    mask = decode_mask(read_input(item.mask_uri, spec.storage, "mask"), image_size_of(data),
                                       map_size, spec.dataset.mask_foreground)
                except DecodeError as e:
                    errors.append(_error(item, "mask", e))
            good.append(item)
            images.append(image)
            masks.append(mask)
            if seg_params is not None:
                segments.append(segment(image, **seg_params))
        stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        seg = np.stack(segments) if segments else None
        if not task.inputs.done:
            grid = None if seg is None else np.stack([on_grid(s, map_size) for s in seg])
            task.inputs.write(self.ctx.store, {file_of("inputs", task.shard): encode_inputs(good, masks, grid),
                                               file_of("errors", task.shard): errors_table(errors)})
        return DecodedShard(task, good, stacked, seg)


def _error(item: ImageRef, stage: str, e: Exception) -> dict:
    return {"image_id": item.image_id, "uri": item.uri, "stage": stage, "reason": str(e)}


def on_grid(segments: np.ndarray, map_size: int) -> np.ndarray:
    """(S, S) superpixel ids -> (M, M) by nearest sampling of cell centres (ids stay ids)."""
    s = segments.shape[0]
    idx = ((np.arange(map_size) + 0.5) * s / map_size).astype(int)
    return segments[np.ix_(idx, idx)].astype(np.int32)


def decode_window(ctx: StageContext, tasks: list[ShardTask]) -> list:
    """Decode a window's shards with Ray Data; returns the decoded blocks' object refs (driver-owned,
    so a block lost with its node is decoded again from its lineage)."""
    import ray

    ds = ray.data.from_items([{"payload": pickle.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    return ds.map_batches(decode_shards, fn_args=(ctx,), batch_size=1, num_cpus=ctx.schedule.light_cpus,
                          compute=ray.data.TaskPoolStrategy(size=min(len(tasks), ctx.schedule.decode_tasks))
                          ).to_arrow_refs()
