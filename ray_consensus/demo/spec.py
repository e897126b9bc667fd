"""The demo run: its data set and committee, built once into a cache, and the run spec over them.

:func:`ensure_demo` builds both once into a cache folder keyed by every recipe parameter, so a
second call returns at once; :func:`demo_spec` is what `ray-consensus demo` runs (the demo's
fingerprints, and so whether a demo run root resumes computing nothing, depend on it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from ray_consensus.demo.committee import DEMO_COMMITTEE, MemberRecipe, train_committee
from ray_consensus.demo.images import DatasetSpec, build_dataset, cache_key
from ray_consensus.models.names import default_cache_dir

# The demo's images are 64 px: a 64 px crop and a 32 px map grid keep every detail, and fewer
# samples than the paper's defaults keep a cold demo within minutes on 2 CPU cores.
DEMO_EXPLAINER_PARAMS = {"smoothgrad": {"n_samples": 16}, "integrated_gradients": {"n_steps": 16},
                         "lime": {"n_samples": 300, "n_segments": 30}}


def demo_spec(root: Path, committee: list[dict], output: str, explainer: str) -> dict:
    """Spec data for the demo run over the demo's data set and trained committee."""
    return {
        "dataset": {"path": str(root / "images"), "masks": str(root / "masks")},
        "committee": [{"id": m["id"], "arch": m["arch"], "weights": m["weights"], "kwargs": m["kwargs"]}
                      for m in committee],
        "explainer": {"name": explainer, "params": DEMO_EXPLAINER_PARAMS.get(explainer, {})},
        "run": {"output": output, "image_size": 64, "map_size": 32, "shard_size": 64},
        "resources": {"batch_size": 32},
    }


def ensure_demo(
    cache_dir: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    spec: DatasetSpec = DatasetSpec(),
    recipes: Sequence[MemberRecipe] = DEMO_COMMITTEE,
) -> tuple[Path, list[dict]]:
    """Build (or reuse) the demo data set and committee under ``cache_dir``.

    The data set lives in ``cache_dir/data-<key>``, ``key`` hashing ``spec``, ``seed`` and
    :data:`RECIPE_VERSION`; it is built in a temporary sibling and renamed into place, so
    an interrupted build is never reused.

    Returns:
        ``(dataset_root, committee)``: the folder holding ``images/``, ``masks/``, ``train/``
        and ``dataset.json``, and :func:`train_committee`'s member dicts.
    """
    cache_dir = Path(cache_dir or default_cache_dir()).resolve()
    root = cache_dir / f"data-{cache_key({'spec': dataclasses.asdict(spec), 'seed': seed})}"
    if not (root / "dataset.json").exists():
        started = time.perf_counter()
        partial = root.with_name(root.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        build_dataset(partial, seed=seed, **dataclasses.asdict(spec))
        try:
            os.replace(partial, root)
        except OSError:  # another process renamed its identical copy into place first
            shutil.rmtree(partial)
        if progress:
            description = json.loads((root / "dataset.json").read_text())
            print(
                f"[demo] data set: {len(description['classes'])} classes, {description['counts']} "
                f"images at {spec.image_size}px in {time.perf_counter() - started:.1f}s -> {root}",
                flush=True,
            )
    return root, train_committee(root, cache_dir, seed=seed, progress=progress, recipes=recipes)
