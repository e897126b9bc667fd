"""Benchmark helpers for data sets of a million images: synthetic per-shard aggregates (figure 10) and
a million-image run root with its markers (figure 11). Each step runs in a process of its own so that
its peak memory is its own:

    python benchmarks/scale.py aggregates ROOT IMAGES MEMBERS     # write synthetic aggregates/ and subcommittees/
    python benchmarks/scale.py tables ROOT IMAGES MEMBERS         # time write_tables; prints JSON
    python benchmarks/scale.py million ROOT MEMBERS               # a 1,000,000-image manifest, a spec, markers
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARD = 256


def spec_data(root: Path, members: int, dataset: str = "unused") -> dict:
    return {"dataset": {"path": dataset, "num_classes": 1000},
            "run": {"output": str(root / "run"), "shard_size": SHARD},
            "committee": [{"id": f"m{i:02d}", "arch": "resnet18"} for i in range(members)]}


def aggregates(root: Path, images: int, members: int, store=None) -> None:
    """Per shard, the real reducer's aggregates and sub-committee sums of synthetic scores: member k's
    consensus score ~ N(0.5 + 0.01 k, 0.2), correct with probability 0.5 + 0.01 k, masks' AP ~ U(0, 1).
    Written to `store` (default: the local run root under `root`)."""
    from ray_consensus.planning.plan import robustness_sizes, subcommittees
    from ray_consensus.results.reduce import shard_aggregates
    from ray_consensus.runroot.contract import encode_aggregates, encode_subcommittees, file_of
    from ray_consensus.spec.config import parse_spec
    from ray_consensus.storage.store import LocalStore

    spec = parse_spec(spec_data(root, members))
    store = store or LocalStore(spec.run.output)
    ids = [m.id for m in spec.committee]
    subsets = subcommittees(members, robustness_sizes(spec), spec.method.robustness_trials, spec.method.seed)
    rng = np.random.default_rng(0)
    quality = 0.01 * np.arange(members)[:, None]
    for s, start in enumerate(range(0, images, SHARD)):
        n = min(SHARD, images - start)
        score = 0.5 + quality + rng.normal(scale=0.2, size=(members, n))
        correct = rng.random((members, n)) < 0.5 + quality
        align = {m: rng.random((members, n)) for m in ("ap", "roc_auc", "pointing_game")}
        store.write_parquet(file_of("aggregates", s), encode_aggregates(shard_aggregates(
            ids, correct, np.ones(n, bool), score, align, {m: v[0] for m, v in align.items()})))
        store.write_parquet(file_of("subcommittees", s), encode_subcommittees(
            [{"k": k, "trial": t, "model_id": ids[j], "score_sum": float(score[j].sum()), "n_voted": n}
             for k, t, idx in subsets for j in idx]))


def tables(root: Path, images: int, members: int) -> None:
    from ray_consensus.results.tables import write_tables
    from ray_consensus.spec.config import parse_spec
    from ray_consensus.storage.store import LocalStore

    spec = parse_spec(spec_data(root, members))
    shards = list(range(-(-images // SHARD)))
    t0 = time.perf_counter()
    write_tables(spec, LocalStore(spec.run.output), shards)
    print(json.dumps({"seconds": time.perf_counter() - t0, "shards": len(shards), "peak_rss_bytes": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident memory: VmHWM (getrusage's maxrss would carry the parent's peak across
    fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def million(root: Path, members: int) -> None:
    """A manifest of 1,000,000 images (1000 classes), a spec with the first `members` members of
    jobs/paper-committee.yaml, and a run root holding the manifest and the markers of a finished run of
    all of them but the last (a member added: its 3,907 units are the plan's work)."""
    import pandas as pd

    from ray_consensus.dataset.manifest import read_manifest
    from ray_consensus.planning.plan import make_plan
    from ray_consensus.runroot.contract import write_manifest
    from ray_consensus.runroot.units import MARKER
    from ray_consensus.spec.config import parse_spec
    from ray_consensus.storage.store import LocalStore

    n = 1_000_000
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 1000, n)
    ids = [f"n{c:08d}/ILSVRC2012_val_{i:08d}" for i, c in enumerate(classes)]
    pd.DataFrame({"uri": [f"/data/imagenet/{i}.JPEG" for i in ids], "label": classes, "image_id": ids}
                 ).to_parquet(root / "manifest.parquet")
    data = yaml.safe_load((REPO / "jobs" / "paper-committee.yaml").read_text())
    data["committee"] = data["committee"][:members]
    data["dataset"]["path"] = str(root / "manifest.parquet")
    data["run"]["output"] = str(root / "run")
    data.pop("storage")
    (root / "spec.yaml").write_text(yaml.safe_dump(data))
    spec = parse_spec(data)
    # Where each pretrained member's weights would be cached (empty files: `validate` reads none), so that
    # its check finds them offline (HF_HOME=root/hf, TORCH_HOME=root/torch, HF_HUB_OFFLINE=1).
    from hubcache import placeholder_weights

    placeholder_weights(spec.committee, root / "hf", root / "torch")
    store = LocalStore(spec.run.output)
    manifest = read_manifest(spec.dataset)
    plan = make_plan(spec, store, manifest)
    write_manifest(store, plan.manifest, manifest.errors)
    last = spec.committee[-1].id
    markers = [os.path.join(store.root, unit.folder, MARKER + unit.fingerprint) for p in plan.shards.values()
               for unit in [p.inputs, p.reduce] + [u for m, u in p.attributions.items() if m != last]]
    # Creating 316,467 folders is kernel time: two processes take about half as long as one.
    workers = max(1, min(4, os.cpu_count() or 1))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_touch, [markers[i::workers] for i in range(workers)])


def _touch(paths: list[str]) -> None:
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()


if __name__ == "__main__":
    step, root, *rest = sys.argv[1:]
    {"aggregates": aggregates, "tables": tables, "million": million}[step](Path(root), *map(int, rest))
