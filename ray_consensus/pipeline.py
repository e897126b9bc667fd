"""The attribution pipeline on Ray Data, shard by shard:

    shard tasks ─► DecodeShard (CPU tasks) ─► ExplainShard[model A] ─► ExplainShard[model B] ─► … ─► driver

Each row is one shard. DecodeShard reads and decodes its images onto the shared grid
(plus masks and superpixels), records bad inputs, and writes the shard's `inputs/` and
`errors/` unit. Each committee member has its own actor pool; an actor loads its model
once, explains the shard's images in batches and writes the (model, shard) attribution
unit whole. Rows carry the decoded shard from one pool to the next; the last stage emits
a small summary instead, so the driver learns that a shard's units are all written (and
can start its reduce) without receiving its pixels.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ray_consensus.config import RunSpec, fingerprint
from ray_consensus.storage import Store
from ray_consensus.units import DATA_FILE, attributions_dir, shard_dir, write_unit


@dataclass
class ShardTask:
    """What to do for one shard (JSON in the dataset row)."""

    shard: int
    images: list[dict]               # image_id, uri, label, mask_uri
    inputs_fp: str                   # fingerprint of the shard's inputs unit
    write_inputs: bool               # inputs/errors unit missing or stale
    models: dict[str, str]           # model_id -> attribution fingerprint, for units still to compute
    previous: dict[str, str]         # unit folder -> stale fingerprint to replace


@dataclass
class StageContext:
    spec: RunSpec
    num_classes: int
    store: Store
    segmentation: dict | None = None  # superpixel settings when the explainer needs them (`segmentation_of`)
    # Set by `size_stages` for the pools of one run:
    actor_cpus: float = 1.0      # CPUs of each attribution actor
    light_cpus: float = 1.0      # CPUs of each decode or reduce task
    torch_threads: int = 1       # torch threads of a CPU actor


# ---------------------------------------------------------------- decode (CPU)

def decode_shards(batch: dict, ctx: StageContext, last: bool) -> dict:
    """Ray Data task stage: shard tasks (JSON) -> decoded shards (pickled payloads), or their
    summaries when no model stage follows (only inputs units to write)."""
    stage = DecodeShard(ctx)
    shards = [stage.decode(ShardTask(**json.loads(t))) for t in batch["task"]]
    if last:
        return summarise(shards)
    return {"payload": np.array([pickle.dumps(s) for s in shards], dtype=object)}


def summarise(shards: list[dict]) -> dict:
    """What the driver needs per shard: progress, and that the shard's units are all written."""
    return {"shard": np.array([s["task"].shard for s in shards], np.int64),
            "n_images": np.array([len(s["images"]) for s in shards], np.int64),
            "n_errors": np.array([len(s["task"].images) - len(s["images"]) for s in shards], np.int64),
            "models": np.array([",".join(sorted(s["task"].models)) for s in shards], dtype=object)}


def segmentation_of(spec: RunSpec) -> dict | None:
    """The explainer's superpixel settings (method, n_segments, compactness, seed), or None when it
    needs no superpixels. Decided on the driver: decode workers then never import torch."""
    from ray_consensus.explainers import EXPLAINERS
    from ray_consensus.superpixels import segment_settings

    explainer = EXPLAINERS[spec.explainer.name]
    if not explainer.needs_segments:
        return None
    return segment_settings({**explainer.defaults, **spec.explainer.params})


class DecodeShard:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def decode(self, task: ShardTask) -> dict:
        from ray_consensus.data import DecodeError, decode_image, decode_mask, image_size_of
        from ray_consensus.storage import read_uri_bytes

        spec, seg_params = self.ctx.spec, self.ctx.segmentation
        size, map_size = spec.run.image_size, spec.run.map_size
        good, images, masks, segments, errors = [], [], [], [], []
        for item in task.images:
            def fail(stage, reason):
                errors.append({"image_id": item["image_id"], "uri": item["uri"], "stage": stage, "reason": reason})
            try:
                data = read_uri_bytes(item["uri"], spec.storage)
                image = decode_image(data, size)
            except FileNotFoundError:
                fail("decode", "image file not found")
                continue
            except DecodeError as e:
                fail("decode", str(e))
                continue
            mask = None
            if item.get("mask_uri") is not None:  # the data set has masks: every image should have one
                try:
                    if not item["mask_uri"]:
                        raise DecodeError("no mask file for this image")
                    mask = decode_mask(read_uri_bytes(item["mask_uri"], spec.storage), image_size_of(data),
                                       map_size, spec.dataset.mask_foreground)
                except FileNotFoundError:
                    fail("mask", "mask file not found")
                except DecodeError as e:
                    fail("mask", str(e))
            good.append(item)
            images.append(image)
            masks.append(mask)
            if seg_params is not None:
                from ray_consensus.superpixels import segment

                segments.append(segment(image, **seg_params))
        stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        seg = np.stack(segments) if segments else None
        if task.write_inputs:
            self.write_inputs(task, good, masks, seg, errors)
        return {"task": task, "images": good, "pixels": stacked, "segments": seg}

    def write_inputs(self, task, good, masks, seg, errors) -> None:
        map_size = self.ctx.spec.run.map_size
        inputs = pa.table({
            "image_id": pa.array([g["image_id"] for g in good], pa.string()),
            "label": pa.array([int(g["label"]) for g in good], pa.int64()),
            "mask": pa.array([None if m is None else m.ravel() for m in masks], pa.list_(pa.uint8())),
            "superpixels": pa.array([None] * len(good) if seg is None else
                                    [_on_grid(s, map_size).ravel() for s in seg], pa.list_(pa.int32())),
        })
        errs = pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA) if errors else ERRORS_SCHEMA.empty_table()
        folder = shard_dir("inputs", task.shard)
        write_unit(self.ctx.store, folder, task.inputs_fp,
                   {f"{folder}/{DATA_FILE}": inputs, f"{shard_dir('errors', task.shard)}/{DATA_FILE}": errs},
                   task.previous.get(folder))


def _on_grid(segments: np.ndarray, map_size: int) -> np.ndarray:
    """(S, S) superpixel ids -> (M, M) by nearest sampling of cell centres (ids stay ids)."""
    s = segments.shape[0]
    idx = ((np.arange(map_size) + 0.5) * s / map_size).astype(int)
    return segments[np.ix_(idx, idx)].astype(np.int32)


ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string())])


# ---------------------------------------------------------------- explain (one pool per model)

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
        from ray_consensus.explainers import EXPLAINERS

        self.ctx, self.model_id, self.last = ctx, model_id, last
        spec = ctx.spec
        member = spec.member(model_id)
        self.device = torch.device("cuda" if spec.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        model = create_member_model(member, ctx.num_classes,
                                    read_bytes=lambda uri: _read(uri, spec))
        self.preprocess = Preprocess(member_data_config(model)).to(self.device)
        if spec.resources.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients w.r.t. inputs only
        self.explainer = EXPLAINERS[spec.explainer.name](**spec.explainer.params)
        self.batch_size = member.batch_size or spec.resources.batch_size
        if self.device.type == "cpu":  # Ray sets one thread for a fractional CPU; use the actor's share
            torch.set_num_threads(ctx.torch_threads)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.resources.autocast)
        if self.device.type == "cuda":  # torch lets cuDNN use TF32 by default; "none" means float32 throughout
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = \
                spec.resources.autocast == "tf32"

    def __call__(self, batch: dict) -> dict:
        shards = [pickle.loads(payload) for payload in batch["payload"]]
        for shard in shards:
            if self.model_id in shard["task"].models:
                self.explain_shard(shard, shard["task"])
        return summarise(shards) if self.last else batch

    def explain_shard(self, shard: dict, task: ShardTask) -> None:
        import torch

        spec = self.ctx.spec
        fp = task.models[self.model_id]
        # Seeded per unit: a unit recomputed by any actor, in any run, gives the same maps on the same kind of
        # device (CPU and CUDA generators draw different noise from one seed; deterministic explainers agree).
        torch.manual_seed(int(fingerprint(spec.method.seed, self.model_id, task.shard), 16) % 2**31)
        pixels, segments, images = shard["pixels"], shard["segments"], shard["images"]
        maps, extras, preds = [], {}, []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            x = torch.from_numpy(pixels[start:stop]).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            labels = torch.tensor([int(i["label"]) for i in images[start:stop]], device=self.device)
            seg = None if segments is None else torch.from_numpy(segments[start:stop]).to(self.device).long()
            out, pred = self.explain_batch(x, labels, seg)
            maps.append(out.pop("map"))
            for k, v in out.items():
                extras.setdefault(k, []).append(v)
            preds.append(pred)
        self.write(task, fp, images, maps, extras, preds)

    def explain_batch(self, x, labels, seg):
        import torch

        from ray_consensus.committee import resample_maps

        with self.autocast_ctx():
            with torch.no_grad():
                pred = self.model(self.preprocess(x)).argmax(dim=1)
            target = pred if self.ctx.spec.method.target == "prediction" else labels
            out = self.explainer.explain(self.model, self.preprocess, x, target, seg)
        out["map"] = resample_maps(out["map"].float(), self.ctx.spec.run.map_size)
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}, pred.cpu().numpy()

    def autocast_ctx(self):
        import contextlib

        import torch

        if self.autocast is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast)

    def write(self, task, fp, images, maps, extras, preds) -> None:
        spec = self.ctx.spec
        m = spec.run.map_size
        labels = np.array([int(i["label"]) for i in images], dtype=np.int64)
        pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        flat = (np.concatenate(maps) if maps else np.zeros((0, m, m), np.float32)).reshape(len(images), m * m)
        columns = {
            "image_id": pa.array([i["image_id"] for i in images], pa.string()),
            "label": pa.array(labels),
            "pred": pa.array(pred.astype(np.int64)),
            "correct": pa.array(pred == labels),
            "height": pa.array(np.full(len(images), m, np.int64)),
            "width": pa.array(np.full(len(images), m, np.int64)),
        }
        if spec.run.map_dtype == "float16":
            # Raw maps sit far below float16's normal range (gradients ~1e-7): store each map scaled
            # to max |m| = 1 with its scale beside it, so attribution_scale * attribution is the map.
            scale = np.abs(flat).max(axis=1)
            scale[scale == 0] = 1.0
            columns["attribution"] = _list_column((flat / scale[:, None]).astype(np.float16))
            columns["attribution_scale"] = pa.array(scale.astype(np.float32))
        else:
            columns["attribution"] = _list_column(flat.astype(np.float32))
        for key, parts in extras.items():  # per-image vectors, NaN-padded per batch (e.g. superpixel weights)
            rows = [row[~np.isnan(row)] for part in parts for row in part.reshape(len(part), -1)]
            columns[key] = pa.array([r.astype(np.float32) for r in rows], pa.list_(pa.float32()))
        folder = attributions_dir(self.model_id, task.shard)
        write_unit(self.ctx.store, folder, fp, {f"{folder}/{DATA_FILE}": pa.table(columns)},
                   task.previous.get(folder))


def _list_column(values: np.ndarray) -> pa.Array:
    """(N, P) -> list<value> column without a Python loop."""
    n, p = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * p + 1, p, dtype=np.int32)),
                                    pa.array(values.ravel()))


def _read(uri: str, spec: RunSpec) -> bytes:
    from ray_consensus.storage import read_uri_bytes

    return read_uri_bytes(uri, spec.storage)


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
    """Stream the tasks through decode and every model's pool (sized by `size_stages`); `on_shard(row)`
    is called with each shard's summary as soon as all its units are written. Returns wall seconds."""
    import dataclasses

    import ray

    spec = ctx.spec
    t0 = time.time()
    quiet_ray_data(show_bars=on_shard is not None and sys.stderr.isatty())
    items = [{"task": json.dumps(dataclasses.asdict(t))} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    needed = [m.id for m in spec.committee if any(m.id in t.models for t in tasks)]
    ds = ds.map_batches(decode_shards, fn_args=(ctx, not needed), batch_size=1, num_cpus=ctx.light_cpus)
    for i, model_id in enumerate(needed):
        ds = ds.map_batches(ExplainShard, fn_constructor_args=(ctx, model_id, i == len(needed) - 1), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=spec.resources.actors_per_model),
                            num_gpus=spec.resources.num_gpus, num_cpus=ctx.actor_cpus)
    # No prefetching: with it, Ray Data hands over each shard's summary only once the next shard is done.
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
        for i in range(len(batch["shard"])):
            if on_shard:
                on_shard({k: v[i] for k, v in batch.items()})
    return time.time() - t0
