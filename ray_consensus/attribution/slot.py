"""The slots: Ray actors that explain whole shards, each holding one committee member at a time.

    a decoded window ──┬─► Slot 1: member a, then member c, …  (each slot holds one member at a time
                       └─► Slot 2: member b, then member d, …   on its GPU or CPU share)
                                   ─► attributions/model=…/shard=…, one UnitWritten each

The schedule (`schedule.py`) fixes how many slots run and how much each holds. A slot that
switches members loads the next member's weights in the same process: no process per member.
A slot reads the decoded window's blocks (`decode_stage`), unpickles only the shards it was
given, and writes each (member, shard) unit whole, telling the driver as each one is written.
"""

from __future__ import annotations

import os
import pickle
import socket
import time

import numpy as np

from ray_consensus.attribution.records import DecodedShard, StageContext, UnitWritten
from ray_consensus.runroot.contract import ImageRef, attributions_file, encode_attributions
from ray_consensus.runroot.units import fingerprint


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
        (member, shard) unit whole; a generator (Ray streams it): one UnitWritten as each unit is written."""
        import ray

        member, wanted = self.load(model_id), set(shards)
        for ref in blocks:
            table = ray.get(ref)
            for shard_id, payload in zip(table.column("shard").to_pylist(), table.column("payload")):
                if shard_id in wanted:
                    shard = pickle.loads(payload.as_py())
                    self.explain_shard(member, shard)
                    yield UnitWritten(model_id, shard_id, len(shard.images),
                                      len(shard.task.images) - len(shard.images))

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
