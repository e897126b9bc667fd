"""The attribution stage on Ray: windows of shards decoded once by Ray Data, explained by slots.

    ShardTask ─► Ray Data: DecodeShard (CPU tasks) ─► a window of decoded shards in the object store
                                                             │
                           Slot 1: member a, then member c, … ┤  (each slot holds one member at a time
                           Slot 2: member b, then member d, … ┘   on its GPU or CPU share)
                                                             ▼
                                  attributions/model=…/shard=…  ─► ShardDone ─► the shard's reduce

The schedule (`schedule.py`) fixes how many slots run and how much each holds. The driver's
`Dispatcher` decodes the shards a window at a time (the next window while the slots work on
the current one; two windows at most are held), and hands each idle slot a work item: one
member over the window's shards, preferring the member the slot already holds. Where every
member has slots of its own, the first window holds one shard per slot, so that explaining
starts once those are decoded, not the whole window. A slot that switches members loads the
next member's weights in the same process: no process per member.
A shard is done when every member's unit of it is written; the driver then starts its reduce.

Records between the stages:

* `ShardTask`: the shard, its images (`contract.ImageRef`), its inputs unit and the attribution
  units still to compute.
* `DecodedShard`: the task, the images that decoded, their pixels on the shared grid and their
  superpixels. `DecodeShard` writes the shard's `inputs/` and `errors/` unit (when not done).
  A decoded window is a list of Arrow blocks with columns `shard` (int64) and `payload`
  (the pickled `DecodedShard`), so a slot unpickles only the shards it explains.
* `ShardDone`: what the driver learns of a shard whose units are all written.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ray_consensus.errors import ClusterError
from ray_consensus.planning.schedule import Schedule
from ray_consensus.runroot.contract import (
    ImageRef,
    attributions_file,
    encode_attributions,
    encode_inputs,
    errors_table,
    file_of,
)
from ray_consensus.runroot.units import Unit, fingerprint
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
class ShardDone:
    """A shard whose units are all written: its images and the inputs that could not be used (None when
    only its inputs unit was written: no slot saw it), the members computed for it in this run."""

    shard: int
    n_images: int | None
    n_errors: int | None
    models: list[str]


@dataclass
class StageContext:
    spec: RunSpec
    num_classes: int
    store: Store
    schedule: Schedule
    segmentation: dict | None = None  # `superpixels.segment` settings when the explainer needs them (`segmentation_of`)


def segmentation_of(spec: RunSpec) -> dict | None:
    """The explainer's superpixel settings, or None when it needs no superpixels. Decided on the
    driver: decode workers then never import torch."""
    params = spec.explainer.params
    return params.segment_settings() if params.needs_segments else None


# ---------------------------------------------------------------- decode (CPU)

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


# ---------------------------------------------------------------- explain: slots

def image_seeds(seed: int, model_id: str, images: list[ImageRef]) -> np.ndarray:
    """One seed per (member, image) for stochastic explainers: a recomputed unit draws the same noise,
    whatever the batch, the slot or the run (on one kind of device)."""
    return np.array([int(fingerprint(seed, model_id, i.image_id), 16) % 2**63 for i in images], dtype=np.int64)


class LoadedMember:
    """A member's model and preprocessing on a slot's device, with its explainer and batch size."""

    def __init__(self, ctx: StageContext, model_id: str, device):
        import torch

        from ray_consensus.explainers import create_explainer
        from ray_consensus.models.committee import Preprocess, create_member_model, member_data_config

        spec = ctx.spec
        member = spec.member(model_id)
        self.model_id = model_id
        model = create_member_model(member, ctx.num_classes, spec.storage)
        self.preprocess = Preprocess(member_data_config(model)).to(device)
        if spec.resources.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients w.r.t. inputs only
        self.explainer = create_explainer(spec.explainer.params)
        self.batch_size = member.batch_size or spec.resources.batch_size


class Slot:
    """A Ray actor that holds at most one committee member at a time on its device and explains whole
    shards with it; switching members loads the next member's weights in the same process."""

    def __init__(self, ctx: StageContext):
        if ctx.schedule.slot_gpus == 0:
            # A CPU slot shares its cores with decode and reduce tasks and Ray's own processes: OpenMP
            # threads that spin while they wait take CPU from those (5% of the slot's CPU time in
            # benchmark figure 1). Read once, when torch loads OpenMP; a value set by the user wins.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import timm  # noqa: F401  (imported once per process, not in the first member's load time)
        import torch

        import ray_consensus.explainers  # noqa: F401

        self.ctx = ctx
        spec = ctx.spec
        self.device = torch.device("cuda" if ctx.schedule.slot_gpus > 0 and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":  # Ray sets one thread for a fractional CPU; use the slot's share
            torch.set_num_threads(ctx.schedule.torch_threads)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.resources.autocast)
        if self.device.type == "cuda":  # torch lets cuDNN use TF32 by default; "none" means float32 throughout
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = \
                spec.resources.autocast == "tf32"
        self.member: LoadedMember | None = None
        self.loads: list[tuple[str, float]] = []  # (member, seconds) of every load, for the run's timings

    def ready(self) -> str:
        """Answers once the slot is placed and started: the node it runs on."""
        return socket.gethostname()

    def load(self, model_id: str) -> LoadedMember:
        if self.member is None or self.member.model_id != model_id:
            import torch

            self.member = None  # one model per device at a time: free the last one first
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            self.member = LoadedMember(self.ctx, model_id, self.device)
            self.loads.append((model_id, round(time.perf_counter() - t0, 3)))
        return self.member

    def explain(self, model_id: str, shards: list[int], blocks: list):
        """Explain `shards` (found in the decoded window's `blocks`) with member `model_id`, writing each
        (member, shard) unit whole; a generator (Ray streams it): one ShardDone as each unit is written."""
        import ray

        member, wanted = self.load(model_id), set(shards)
        for ref in blocks:
            table = ray.get(ref)
            for shard_id, payload in zip(table.column("shard").to_pylist(), table.column("payload")):
                if shard_id in wanted:
                    shard = pickle.loads(payload.as_py())
                    self.explain_shard(member, shard)
                    yield ShardDone(shard_id, len(shard.images), len(shard.task.images) - len(shard.images),
                                    [model_id])

    def take_loads(self) -> list[tuple[str, float]]:
        out, self.loads = self.loads, []
        return out

    def explain_shard(self, member: LoadedMember, shard: DecodedShard) -> None:
        import torch

        seeds = image_seeds(self.ctx.spec.method.seed, member.model_id, shard.images)
        labels = np.array([i.label for i in shard.images], dtype=np.int64)
        maps, extras, preds = [], {}, []
        for start in range(0, len(shard.images), member.batch_size):
            stop = start + member.batch_size
            x = torch.from_numpy(shard.pixels[start:stop]).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            seg = None if shard.segments is None else \
                torch.from_numpy(shard.segments[start:stop]).to(self.device).long()
            out, pred = self.explain_batch(member, x, torch.from_numpy(labels[start:stop]).to(self.device), seg,
                                           torch.from_numpy(seeds[start:stop]))
            maps.append(out.pop("map"))
            for k, v in out.items():  # per-image vectors, NaN-padded per batch (e.g. superpixel weights)
                extras.setdefault(k, []).extend(row[~np.isnan(row)] for row in v.reshape(len(v), -1))
            preds.append(pred)
        m = self.ctx.spec.run.map_size
        table = encode_attributions(shard.images, np.concatenate(preds) if preds else np.zeros(0, np.int64),
                                    np.concatenate(maps) if maps else np.zeros((0, m, m), np.float32), extras,
                                    self.ctx.spec.run.map_dtype)
        unit = shard.task.attributions[member.model_id]
        unit.write(self.ctx.store, {attributions_file(member.model_id, shard.task.shard): table})

    def explain_batch(self, member: LoadedMember, x, labels, seg, seeds):
        import contextlib

        import torch

        from ray_consensus.models.committee import resample_maps

        precision = torch.autocast("cuda", dtype=self.autocast) if self.autocast is not None and \
            self.device.type == "cuda" else contextlib.nullcontext()
        by_label = self.ctx.spec.method.target == "label"
        with precision:
            logits = None
            if not by_label or not member.explainer.returns_logits:
                with torch.no_grad():
                    logits = member.model(member.preprocess(x))
            out = member.explainer.explain(member.model, member.preprocess, x,
                                           labels if by_label else logits.argmax(dim=1), seg, seeds)
        returned = out.pop("logits", None)
        logits = returned if logits is None else logits
        out["map"] = resample_maps(out["map"].float(), self.ctx.spec.run.map_size)
        out = {k: v.detach().float().cpu().numpy() for k, v in out.items()}
        return out, finite_only(logits.detach().float().cpu().numpy(), out["map"])


def finite_only(logits: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """A batch's predictions from its logits (B, C), -1 where they are not finite; `maps` (B, M, M) of
    images whose logits or map are not finite are set all NaN, in place (the stored mark the reducer
    leaves out of the vote and records in errors/; a NaN weight in a member poisons every image)."""
    finite = np.isfinite(logits).all(axis=1)
    pred = np.where(finite, logits.argmax(axis=1), -1).astype(np.int64)
    maps[~finite | ~np.isfinite(maps).reshape(len(maps), -1).all(axis=1)] = np.nan
    return pred


# ---------------------------------------------------------------- the driver's dispatcher

@dataclass
class Window:
    """A run of consecutive shards decoded together; its blocks are freed once every item is done."""

    index: int
    tasks: list[ShardTask]
    blocks: list | None = None                                 # decoded blocks (object refs), once decoded
    todo: deque = field(default_factory=deque)                 # (model_id, shards) items not yet handed out
    running: int = 0
    left: dict[int, set] = field(default_factory=dict)         # shard -> members still to write

    @property
    def finished(self) -> bool:
        return self.blocks is not None and not self.todo and not self.running


def split_windows(tasks: list, size: int, first: int | None = None) -> list[list]:
    """The tasks in windows of `size`; with `first`, the first window holds only that many, so that the
    slots start on the first shards decoded rather than on a whole window's. Only where every work item
    has a slot of its own: a slot then keeps its member across windows and a small first window costs
    no member load."""
    head = min(size, first) if first else size
    return [tasks[:head]] + [tasks[i:i + size] for i in range(head, len(tasks), size)] if tasks else []


class Dispatcher:
    """Keeps every placed slot busy with (member, shards of a window) items until all are done."""

    def __init__(self, ctx: StageContext, tasks: list[ShardTask], on_shard=None, progress=None, on_images=None):
        import ray

        self.ctx, self.on_shard, self.progress = ctx, on_shard, progress or (lambda msg: None)
        self.on_images = on_images or (lambda n: None)
        s = ctx.schedule
        order = [m.id for m in ctx.spec.committee]
        first = ctx.spec.resources.actors_per_model if s.items <= s.slots else None  # one shard per slot
        self.windows = deque(Window(i, part) for i, part in
                             enumerate(split_windows(tasks, s.window_shards or len(tasks), first)))
        self.n_windows = len(self.windows)
        for w in self.windows:
            for t in w.tasks:
                w.left[t.shard] = set(t.attributions)
            for model_id in order:
                shards = [t.shard for t in w.tasks if model_id in t.attributions]
                parts = max(1, min(ctx.spec.resources.actors_per_model, len(shards)))
                w.todo.extend((model_id, shards[i::parts]) for i in range(parts) if shards[i::parts])
        # Slots take Ray's prestarted workers (no runtime env of their own): a slot at nice 0 instead of
        # Ray's 15 was measured no faster (the same batch, and whole runs alternated; benchmarks/README.md).
        slot = ray.remote(Slot).options(num_cpus=s.slot_cpus, num_gpus=s.slot_gpus, max_restarts=-1,
                                        max_task_retries=3)
        self.slots = [slot.remote(ctx) for _ in range(s.slots)]
        self.starting = {a.ready.remote(): a for a in self.slots}
        self.idle: list = []
        self.holding: dict = {}                 # slot -> the member it holds
        self.running: dict = {}                 # item (a streaming generator) -> (slot, window, model_id, start)
        self.decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.decoding: dict[int, concurrent.futures.Future] = {}
        self.loads: list[tuple[str, float]] = []

    def run(self) -> None:
        import ray

        t0, placed = time.time(), False
        try:
            while self.windows:
                self.decode_ahead()
                self.dispatch()
                refs = list(self.running) + list(self.starting)
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.2) if refs else ([], [])
                for ref in ready:
                    if ref in self.starting:
                        self.idle.append(self.starting.pop(ref))
                        placed = True
                    else:
                        self.advance(ref)
                while self.windows and self.windows[0].finished:
                    self.windows.popleft()  # its decoded blocks go with it
                if not placed and time.time() - t0 > self.ctx.spec.resources.slot_wait_s:
                    raise ClusterError(self.unplaced_message(time.time() - t0))
            for slot in self.slots:
                self.loads += ray.get(slot.take_loads.remote())
        finally:
            self.decoder.shutdown(wait=False, cancel_futures=True)
            for slot in self.slots:
                ray.kill(slot)

    def decode_ahead(self) -> None:
        """Decode the first two windows (the one the slots work on and the next); collect finished decodes."""
        for w in list(self.windows)[:2]:
            if w.blocks is None and w.index not in self.decoding:
                self.decoding[w.index] = self.decoder.submit(decode_window, self.ctx, w.tasks)
            future = self.decoding.get(w.index)
            if future is not None and future.done():
                w.blocks = future.result()
                del self.decoding[w.index]
                for t in w.tasks:
                    if not t.attributions:  # only its inputs unit to write: written while decoding
                        self.shard_done(w, ShardDone(t.shard, None, None, []), None)

    def dispatch(self) -> None:
        """Give each idle slot an item of the oldest decoded window, preferring the member it holds."""
        while self.idle:
            choice = self.pick(self.idle[0])
            if choice is None:
                return
            slot = self.idle.pop(0)
            w, (model_id, shards) = choice
            w.running += 1
            self.holding[slot] = model_id
            item = slot.explain.options(num_returns="streaming").remote(model_id, shards, w.blocks)
            self.running[item] = (slot, w, model_id, time.time())

    def pick(self, slot):
        decoded = [w for w in self.windows if w.blocks is not None and w.todo]
        if not decoded:
            return None
        held = self.holding.get(slot)
        for w in decoded:
            for i, item in enumerate(w.todo):
                if item[0] == held:
                    del w.todo[i]
                    return w, item
        return decoded[0], decoded[0].todo.popleft()

    def advance(self, item) -> None:
        """An item has a shard ready, or has ended."""
        import ray

        slot, w, model_id, started = self.running[item]
        try:
            self.shard_done(w, ray.get(next(item)), model_id)
        except StopIteration:
            del self.running[item]
            w.running -= 1
            self.idle.append(slot)
            self.progress(f"member {model_id}: window {w.index + 1}/{self.n_windows} done in "
                          f"{time.time() - started:.1f} s")

    def shard_done(self, w: Window, done: ShardDone, model_id: str | None) -> None:
        if model_id is not None:  # a member's unit of the shard: its images, failed ones included
            self.on_images(done.n_images + done.n_errors)
        left = w.left[done.shard]
        left.discard(model_id)
        if not left and self.on_shard:
            task = next(t for t in w.tasks if t.shard == done.shard)
            self.on_shard(ShardDone(done.shard, done.n_images, done.n_errors, sorted(task.attributions)))

    def unplaced_message(self, waited: float) -> str:
        s = self.ctx.schedule
        return (f"no attribution slot ({s.slot_gpus:g} GPU, {s.slot_cpus:g} CPU) could be placed in {waited:.0f} s: "
                f"the cluster ({s.capacity.gpus:g} GPUs, {s.capacity.cpus:g} CPUs from {s.capacity.source}) did "
                f"not provide them; check `ray status`, or lower resources.num_gpus / raise resources.slot_wait_s")


def run_attributions(ctx: StageContext, tasks: list[ShardTask], on_shard=None, progress=None,
                     on_images=None) -> dict:
    """Compute the tasks' units on the schedule's slots; `on_shard(ShardDone)` is called for each shard as
    soon as all its units are written, `progress(line)` as each member finishes a window, `on_images(n)`
    as each unit is written (n: its shard's images). Returns timings: wall seconds and every member load."""
    t0 = time.time()
    dispatcher = Dispatcher(ctx, tasks, on_shard, progress, on_images)  # the slots start first: they are the long pole
    quiet_ray_data()
    dispatcher.run()
    loads = [s for _, s in dispatcher.loads]
    return {"attributions_s": round(time.time() - t0, 3), "member_loads": len(loads),
            "member_load_s": round(sum(loads), 3)}


def quiet_ray_data() -> None:
    """Our own lines are the progress: no Ray Data bars, execution banners or warnings (its errors stay)."""
    import logging

    from ray.data import DataContext

    data_ctx = DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    data_ctx.issue_detectors_config.detectors = []  # its memory hints misread the models' one-off load
    logging.getLogger("ray.data").setLevel(logging.ERROR)
