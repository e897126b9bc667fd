"""The attribution pipeline on Ray Data, shard by shard:

    ShardTask ─► DecodeShard (CPU tasks) ─► DecodedShard ─► ExplainShard[model A] ─► ExplainShard[model B] ─► … ─► ShardDone

Rows between the stages (one row per shard, `{"payload": pickled record}`):

* `ShardTask`: the shard, its images (`contract.ImageRef`), its inputs unit and the attribution
  units still to compute.
* `DecodedShard`: the task, the images that decoded, their pixels on the shared grid and their
  superpixels. `DecodeShard` writes the shard's `inputs/` and `errors/` unit (when stale).
* `ShardDone` (the last stage's row): what the driver needs, without the pixels: the shard is
  fully written, so its reduce can start.

Each committee member has its own actor pool; an actor loads its model once, explains the
shard's images in batches and writes the (model, shard) attribution unit whole.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass

import numpy as np

from ray_consensus.config import RunSpec
from ray_consensus.contract import ImageRef, attributions_file, encode_attributions, encode_inputs, errors_table, \
    file_of
from ray_consensus.plan import Unit
from ray_consensus.storage import Store, read_uri_bytes
from ray_consensus.units import fingerprint


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
class ShardDone:
    """A shard whose units are all written."""

    shard: int
    n_images: int
    n_errors: int
    models: list[str]


@dataclass
class StageContext:
    spec: RunSpec
    num_classes: int
    store: Store
    segmentation: dict | None = None  # `superpixels.segment` settings when the explainer needs them (`segmentation_of`)
    # Set by `size_stages` for the pools of one run:
    actor_cpus: float = 1.0      # CPUs of each attribution actor
    light_cpus: float = 1.0      # CPUs of each decode or reduce task
    torch_threads: int = 1       # torch threads of a CPU actor


def segmentation_of(spec: RunSpec) -> dict | None:
    """The explainer's superpixel settings, or None when it needs no superpixels. Decided on the
    driver: decode workers then never import torch."""
    params = spec.explainer.params
    return params.segment_settings() if params.needs_segments else None


def _payloads(records: list) -> dict:
    return {"payload": np.array([pickle.dumps(r) for r in records], dtype=object)}


def _records(batch: dict) -> list:
    return [pickle.loads(p) for p in batch["payload"]]


def done_row(shard: DecodedShard) -> ShardDone:
    return ShardDone(shard.task.shard, len(shard.images), len(shard.task.images) - len(shard.images),
                     sorted(shard.task.attributions))


# ---------------------------------------------------------------- decode (CPU)

def decode_shards(batch: dict, ctx: StageContext, last: bool) -> dict:
    """Ray Data task stage: ShardTask rows -> DecodedShard rows (ShardDone rows when no model stage
    follows: only inputs units to write)."""
    stage = DecodeShard(ctx)
    shards = [stage.decode(task) for task in _records(batch)]
    return _payloads([done_row(s) for s in shards] if last else shards)


class DecodeShard:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def decode(self, task: ShardTask) -> DecodedShard:
        from ray_consensus.data import DecodeError, decode_image, decode_mask, image_size_of
        from ray_consensus.superpixels import segment

        spec, seg_params = self.ctx.spec, self.ctx.segmentation
        size, map_size = spec.run.image_size, spec.run.map_size
        good, images, masks, segments, errors = [], [], [], [], []
        for item in task.images:
            try:
                data = read_uri_bytes(item.uri, spec.storage)
                image = decode_image(data, size)
            except (FileNotFoundError, DecodeError) as e:
                errors.append(_error(item, "decode", e, "image"))
                continue
            mask = None
            if item.mask_uri is not None:  # the data set has masks: every image should have one
                try:
                    if not item.mask_uri:
                        raise DecodeError("no mask file for this image")
                    mask = decode_mask(read_uri_bytes(item.mask_uri, spec.storage), image_size_of(data),
                                       map_size, spec.dataset.mask_foreground)
                except (FileNotFoundError, DecodeError) as e:
                    errors.append(_error(item, "mask", e, "mask"))
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


def _error(item: ImageRef, stage: str, e: Exception, what: str) -> dict:
    reason = f"{what} file not found" if isinstance(e, FileNotFoundError) else str(e)
    return {"image_id": item.image_id, "uri": item.uri, "stage": stage, "reason": reason}


def on_grid(segments: np.ndarray, map_size: int) -> np.ndarray:
    """(S, S) superpixel ids -> (M, M) by nearest sampling of cell centres (ids stay ids)."""
    s = segments.shape[0]
    idx = ((np.arange(map_size) + 0.5) * s / map_size).astype(int)
    return segments[np.ix_(idx, idx)].astype(np.int32)


# ---------------------------------------------------------------- explain (one pool per model)

def image_seeds(seed: int, model_id: str, images: list[ImageRef]) -> np.ndarray:
    """One seed per (member, image) for stochastic explainers: a recomputed unit draws the same noise,
    whatever the batch, the actor or the run (on one kind of device)."""
    return np.array([int(fingerprint(seed, model_id, i.image_id), 16) % 2**63 for i in images], dtype=np.int64)


class ExplainShard:
    """Holds one committee member on the actor's device; explains whole shards."""

    def __init__(self, ctx: StageContext, model_id: str, last: bool):
        if ctx.spec.resources.num_gpus == 0:
            # A CPU actor shares its cores with decode and reduce tasks and Ray's own processes: OpenMP
            # threads that spin while they wait take CPU from those (5% of the actor's CPU time in
            # benchmark figure 1). Read once, when torch loads OpenMP; a value set by the user wins.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        from ray_consensus.committee import Preprocess, create_member_model, member_data_config
        from ray_consensus.explainers import create_explainer

        self.ctx, self.model_id, self.last = ctx, model_id, last
        spec = ctx.spec
        member = spec.member(model_id)
        self.device = torch.device("cuda" if spec.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        model = create_member_model(member, ctx.num_classes, spec.storage)
        self.preprocess = Preprocess(member_data_config(model)).to(self.device)
        if spec.resources.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients w.r.t. inputs only
        self.explainer = create_explainer(spec.explainer.params)
        self.batch_size = member.batch_size or spec.resources.batch_size
        if self.device.type == "cpu":  # Ray sets one thread for a fractional CPU; use the actor's share
            torch.set_num_threads(ctx.torch_threads)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.resources.autocast)
        if self.device.type == "cuda":  # torch lets cuDNN use TF32 by default; "none" means float32 throughout
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = \
                spec.resources.autocast == "tf32"

    def __call__(self, batch: dict) -> dict:
        shards = _records(batch)
        for shard in shards:
            if self.model_id in shard.task.attributions:
                self.explain_shard(shard)
        return _payloads([done_row(s) for s in shards]) if self.last else batch

    def explain_shard(self, shard: DecodedShard) -> None:
        import torch

        seeds = image_seeds(self.ctx.spec.method.seed, self.model_id, shard.images)
        labels = np.array([i.label for i in shard.images], dtype=np.int64)
        maps, extras, preds = [], {}, []
        for start in range(0, len(shard.images), self.batch_size):
            stop = start + self.batch_size
            x = torch.from_numpy(shard.pixels[start:stop]).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            seg = None if shard.segments is None else torch.from_numpy(shard.segments[start:stop]).to(self.device).long()
            out, pred = self.explain_batch(x, torch.from_numpy(labels[start:stop]).to(self.device), seg,
                                           torch.from_numpy(seeds[start:stop]))
            maps.append(out.pop("map"))
            for k, v in out.items():  # per-image vectors, NaN-padded per batch (e.g. superpixel weights)
                extras.setdefault(k, []).extend(row[~np.isnan(row)] for row in v.reshape(len(v), -1))
            preds.append(pred)
        m = self.ctx.spec.run.map_size
        table = encode_attributions(shard.images, np.concatenate(preds) if preds else np.zeros(0, np.int64),
                                    np.concatenate(maps) if maps else np.zeros((0, m, m), np.float32), extras,
                                    self.ctx.spec.run.map_dtype)
        unit = shard.task.attributions[self.model_id]
        unit.write(self.ctx.store, {attributions_file(self.model_id, shard.task.shard): table})

    def explain_batch(self, x, labels, seg, seeds):
        import torch

        from ray_consensus.committee import resample_maps

        with self.autocast_ctx():
            with torch.no_grad():
                pred = self.model(self.preprocess(x)).argmax(dim=1)
            target = pred if self.ctx.spec.method.target == "prediction" else labels
            out = self.explainer.explain(self.model, self.preprocess, x, target, seg, seeds)
        out["map"] = resample_maps(out["map"].float(), self.ctx.spec.run.map_size)
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}, pred.cpu().numpy()

    def autocast_ctx(self):
        import contextlib

        import torch

        if self.autocast is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast)


# ---------------------------------------------------------------- the chain

def actor_cpus(spec: RunSpec, n_models: int, cluster: dict) -> float:
    """CPUs per attribution actor.

    Every member's pool must be alive at once (the shards stream through all of them), so the
    pools must fit the cluster together; otherwise the pipeline waits for actors that cannot be
    placed. Unset `num_cpus` shares the CPUs out on CPU-only clusters. What does not fit now is
    reported, not refused: an autoscaling cluster adds the nodes.
    """
    r = spec.resources
    actors = n_models * r.actors_per_model
    total_cpus, total_gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if r.num_gpus > 0 and actors * r.num_gpus > total_gpus:
        _warn(f"{actors} actors x {r.num_gpus:g} GPU need {actors * r.num_gpus:g} GPUs, the cluster has "
              f"{total_gpus:g} now: waiting for the autoscaler (or lower resources.num_gpus to share GPUs)")
    if r.num_cpus is not None:
        if actors * r.num_cpus > total_cpus:
            _warn(f"{actors} actors x {r.num_cpus:g} CPU need {actors * r.num_cpus:g} CPUs, the cluster has "
                  f"{total_cpus:g} now: waiting for the autoscaler (or leave resources.num_cpus unset)")
        return r.num_cpus
    if r.num_gpus > 0 or total_cpus == 0:
        return 1.0
    # Keep a share for the decode tasks; round down so the sum never exceeds the cluster.
    return max(0.01, min(1.0, int(total_cpus * 0.9 / (actors + 1) * 100) / 100))


def actor_torch_threads(spec: RunSpec, n_models: int, cluster: dict) -> int:
    """Torch threads of a CPU actor: its whole-CPU share of the cluster (Ray itself would give a
    fractional-CPU actor one thread)."""
    return max(1, int(cluster.get("CPU", 1) // max(1, n_models * spec.resources.actors_per_model)))


def size_stages(ctx: StageContext, n_models: int, cluster: dict) -> None:
    """Size the run's stages for `n_models` member pools on this cluster (sets ctx's CPUs and threads).

    Decode and reduce tasks get half an actor's CPUs (at most 1/2) on CPU-only clusters: small
    enough to run beside the actors, and unequal to theirs so that Ray Data does not fuse the
    decode stage into the first member's actors (decode then overlaps explanation, as it does on
    GPU clusters). Decoding is one thread: 1 CPU where the actors hold GPUs.
    """
    spec = ctx.spec
    ctx.actor_cpus = actor_cpus(spec, n_models, cluster)
    ctx.torch_threads = actor_torch_threads(spec, n_models, cluster)
    ctx.light_cpus = (min(1.0, ctx.actor_cpus) if spec.resources.num_gpus > 0
                      else max(0.01, min(0.5, ctx.actor_cpus / 2)))


def _warn(msg: str) -> None:
    print(f"[ray-consensus] warning: {msg}", file=sys.stderr, flush=True)


def quiet_ray_data(show_bars: bool) -> None:
    """Our own per-shard lines are the progress; Ray Data's bars only on a terminal."""
    import logging

    from ray.data import DataContext

    data_ctx = DataContext.get_current()
    data_ctx.enable_progress_bars = show_bars
    data_ctx.print_on_execution_start = False
    data_ctx.issue_detectors_config.detectors = []  # its memory hints misread the models' one-off load
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_attributions(ctx: StageContext, tasks: list[ShardTask], on_shard=None) -> float:
    """Stream the tasks through decode and every model's pool (sized by `size_stages`); `on_shard(ShardDone)`
    is called for each shard as soon as all its units are written. Returns wall seconds."""
    import ray

    spec = ctx.spec
    t0 = time.time()
    quiet_ray_data(show_bars=on_shard is not None and sys.stderr.isatty())
    ds = ray.data.from_items([{"payload": pickle.dumps(t)} for t in tasks], override_num_blocks=max(1, len(tasks)))
    needed = [m.id for m in spec.committee if any(m.id in t.attributions for t in tasks)]
    ds = ds.map_batches(decode_shards, fn_args=(ctx, not needed), batch_size=1, num_cpus=ctx.light_cpus)
    for i, model_id in enumerate(needed):
        ds = ds.map_batches(ExplainShard, fn_constructor_args=(ctx, model_id, i == len(needed) - 1), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=spec.resources.actors_per_model),
                            num_gpus=spec.resources.num_gpus, num_cpus=ctx.actor_cpus)
    # No prefetching: with it, Ray Data hands over each shard's summary only once the next shard is done.
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
        for done in _records(batch):
            if on_shard:
                on_shard(done)
    return time.time() - t0
