"""The demo's committee: small timm models of different families trained from scratch on the
demo's training split, on CPU, so that their accuracies on the explained image set differ.

Each member is cached under ``<cache>/models/<id>-<key>.safetensors`` with a JSON sidecar;
the key (`images.cache_key`) hashes the recipe, the data set's fingerprint and the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from ray_consensus.demo.images import RECIPE_VERSION, cache_key, labelled_files
from ray_consensus.storage.atomic import atomic_write


@dataclass(frozen=True)
class MemberRecipe:
    """How one committee member is built and trained.

    ``kwargs`` are extra ``timm.create_model`` arguments (e.g. a ViT's ``img_size``);
    ``input_size`` is the square side the model is trained and evaluated at; ``steps`` are
    optimiser steps of ``batch_size`` images with AdamW at peak rate ``lr`` (one-cycle).
    """

    id: str
    arch: str
    input_size: int
    steps: int
    lr: float = 2e-3
    batch_size: int = 64
    kwargs: dict = field(default_factory=dict)


# Thirteen members of thirteen architecture families (residual, ConvNeXt, RegNet, MobileNetV3,
# LeViT, ViT, LCNet, GhostNet, MnasNet, MobileViT, DLA, PiT, MobileNetV2), chosen among timm's
# small architectures for their training time at 64 px on a CPU (100-250 ms a step of 64 images);
# input sizes and training lengths differ so that accuracies spread (short runs stay weak).
DEMO_COMMITTEE: tuple[MemberRecipe, ...] = (
    MemberRecipe("resnet10t", "resnet10t", 64, steps=150),
    MemberRecipe("convnext_atto", "convnext_atto", 64, steps=120),
    MemberRecipe("regnetx_002", "regnetx_002", 64, steps=150),
    MemberRecipe("mobilenetv3_small_050", "mobilenetv3_small_050", 96, steps=150),
    MemberRecipe("levit_128s", "levit_128s", 64, steps=150, kwargs={"img_size": 64}),
    MemberRecipe(
        "vit_tiny_p8",
        "vit_tiny_patch16_224",
        56,
        steps=120,
        lr=1e-3,
        kwargs={"img_size": 56, "patch_size": 8, "depth": 6},
    ),
    MemberRecipe("lcnet_050_short", "lcnet_050", 64, steps=60),
    MemberRecipe("ghostnet_050", "ghostnet_050", 64, steps=100),
    MemberRecipe("mnasnet_small", "mnasnet_small", 64, steps=100),
    MemberRecipe("mobilevit_xxs", "mobilevit_xxs", 64, steps=100),
    MemberRecipe("dla46_c", "dla46_c", 64, steps=80),
    MemberRecipe("pit_ti", "pit_ti_224", 64, steps=100, lr=1e-3, kwargs={"img_size": 64}),
    MemberRecipe("mobilenetv2_050_short", "mobilenetv2_050", 64, steps=40),
)


def model_kwargs(recipe: MemberRecipe) -> dict:
    """``timm.create_model`` keyword arguments (besides ``num_classes``) for a member.

    The overlay makes ``timm.data.resolve_data_config(model=model)`` report the size the
    member was trained at, with ``crop_pct = 1`` so the eval transform keeps the whole image.
    """
    overlay = {"input_size": [3, recipe.input_size, recipe.input_size], "crop_pct": 1.0}
    return {**recipe.kwargs, "pretrained_cfg_overlay": overlay}


def train_committee(
    dataset_root: Path,
    cache_dir: Path,
    seed: int = 0,
    progress: bool = True,
    recipes: Sequence[MemberRecipe] = DEMO_COMMITTEE,
) -> list[dict]:
    """Train (or load from cache) one timm model per recipe on ``dataset_root/train``.

    Each member is written to ``cache_dir/models/<id>-<key>.safetensors`` with a JSON
    sidecar (arch, kwargs, classes, input size, steps, accuracy on ``images/``). The key
    hashes the recipe, the data set fingerprint, ``seed`` and :data:`RECIPE_VERSION`, so a
    member whose files exist is not trained again.

    Training runs on CPU, one member per core at a time in worker processes of one torch thread
    each (small models use a second thread poorly: one process of two threads kept 1.2 of 2 cores
    busy); one member, one core, or fewer than 200 steps in all train in this process with torch's
    thread setting. About 4 minutes on 2 idle cores for :data:`DEMO_COMMITTEE`.

    Returns:
        One dict per member: ``{"id", "arch", "weights" (absolute path), "kwargs"
        (create_model kwargs), "num_classes"}``.
    """
    dataset_root = Path(dataset_root).resolve()
    description = json.loads((dataset_root / "dataset.json").read_text())
    num_classes = len(description["classes"])
    models_dir = Path(cache_dir).resolve() / "models"
    committee, missing = [], []
    for recipe in recipes:
        key = cache_key(
            {"recipe": dataclasses.asdict(recipe), "data": description["fingerprint"], "seed": seed}
        )
        weights = models_dir / f"{recipe.id}-{key}.safetensors"
        if not weights.with_suffix(".json").exists():
            missing.append((recipe, weights))
        committee.append(
            {
                "id": recipe.id,
                "arch": recipe.arch,
                "weights": str(weights),
                "kwargs": model_kwargs(recipe),
                "num_classes": num_classes,
            }
        )
    # A worker process costs seconds to start (torch, timm): worth it for a committee's worth of steps.
    workers = min(len(missing), os.cpu_count() or 1) if sum(r.steps for r, _ in missing) >= 200 else 1
    jobs = [(recipe, dataset_root, num_classes, seed, weights, description) for recipe, weights in missing]
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for line in pool.map(_train_and_save, jobs):
                if progress:
                    print(line, flush=True)
    else:
        for job in jobs:
            line = _train_and_save(job)
            if progress:
                print(line, flush=True)
    return committee


def _train_and_save(job: tuple) -> str:
    """Train one member and write its files; returns its progress line."""
    recipe, dataset_root, num_classes, seed, weights, description = job
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model = _train(recipe, dataset_root, num_classes, seed)
    accuracy = _accuracy(model, dataset_root, "images")
    _save_member(model, weights, recipe, num_classes, description, accuracy)
    return (f"[demo] {recipe.id:<22} {recipe.arch:<22} in={recipe.input_size:<3d} steps={recipe.steps:<4d} "
            f"acc={accuracy:.3f}  {time.perf_counter() - started:5.1f}s")


def _create_member(recipe: MemberRecipe, num_classes: int) -> torch.nn.Module:
    """A freshly initialised ``torch.nn.Module`` for ``recipe`` (no pretrained weights)."""
    return timm.create_model(
        recipe.arch, pretrained=False, num_classes=num_classes, **model_kwargs(recipe)
    )


def _load_split(
    model: torch.nn.Module, root: Path, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``split`` through the model's timm eval transform.

    Returns ``(x, y)``: float32 ``(N, 3, S, S)`` normalised as timm resolves for ``model``,
    and int64 ``(N,)`` labels.
    """
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    paths, labels = labelled_files(root, split)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    return x, torch.tensor(labels, dtype=torch.int64)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 1/8 of the side (reflect-padded).

    ``x``: float32 ``(B, 3, S, S)``; returns the same shape.
    """
    size = x.shape[-1]
    pad = max(1, size // 8)
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (x.shape[0], 2)).tolist()
    crops = [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)]
    return torch.stack(crops)


def _train(recipe: MemberRecipe, root: Path, num_classes: int, seed: int) -> torch.nn.Module:
    """Train a fresh member on ``root/train``; returns the model in eval mode.

    Seeds torch's global RNG (weight init, batch order, augmentation, any dropout), so callers
    run it inside ``torch.random.fork_rng``.
    """
    torch.manual_seed(int(cache_key({"id": recipe.id, "seed": seed}), 16) % 2**31)
    model = _create_member(recipe, num_classes)
    x, y = _load_split(model, root, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=recipe.steps, pct_start=0.15
    )
    model.train()
    order = torch.randperm(len(y))
    cursor = 0
    for _ in range(recipe.steps):
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(y)), 0
        batch = order[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        logits = model(_augment(x[batch]))
        loss = F.cross_entropy(logits, y[batch], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def _accuracy(model: torch.nn.Module, root: Path, split: str) -> float:
    """Top-1 accuracy of ``model`` on ``root/<split>``, a float in [0, 1]."""
    with torch.inference_mode():
        x, y = _load_split(model, root, split)
        predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])
    return float((predictions == y).float().mean())


def _save_member(
    model: torch.nn.Module,
    weights: Path,
    recipe: MemberRecipe,
    num_classes: int,
    description: dict,
    accuracy: float,
) -> None:
    """Write the safetensors file, then the sidecar (its presence marks the member complete)."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda path: save_file(tensors, str(path)))
    sidecar = {
        "id": recipe.id,
        "arch": recipe.arch,
        "kwargs": model_kwargs(recipe),
        "num_classes": num_classes,
        "classes": description["classes"],
        "input_size": [3, recipe.input_size, recipe.input_size],
        "steps": recipe.steps,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "dataset_fingerprint": description["fingerprint"],
        "test_accuracy": accuracy,
        "recipe_version": RECIPE_VERSION,
    }
    text = json.dumps(sidecar, indent=2) + "\n"
    atomic_write(weights.with_suffix(".json"), lambda path: Path(path).write_text(text))
