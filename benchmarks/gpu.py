"""ray-consensus on one GPU: the GPU path measured and checked, in one short run (about 6 minutes on an H100).

    python benchmarks/gpu.py [--only N ...] [--keep DIR] [--smoke]

Needs a CUDA device; prints `name: value` lines (ratios measured in this process) with `#` lines
behind them, like benchmarks/run.py:

1. lime_batched_vs_captum_per_image_gpu   our LIME (forward batch 256) vs captum `Lime` once per image,
                                          perturbations_per_eval=1, same masks; fp32 and bf16 autocast
2. smoothgrad_bare_loop_gpu               the bare batched SmoothGrad loop: fp32, bf16 autocast, channels_last
3. smoothgrad_end_to_end_vs_bare_loop_gpu PNG files -> execute() (1 member, num_gpus 1) -> Parquet vs the bare loop
4. committee_pipeline_vs_sequential_loop_gpu  4 members sharing the GPU (num_gpus 0.25) vs the per-image loop
5. gpu_vs_cpu_consensus_score_difference  the same integrated-gradients run with CPU and with GPU actors:
                                          how far scores differ; tf32 and bf16 against it; SmoothGrad (noise per device)
6. smoothgrad_20k_end_to_end_vs_bare_loop_bf16  20,000 images, resnet50, SmoothGrad 10 samples, bf16: execute() on
                                          one GPU slot vs the bare loop on the same images; the bare loop eager,
                                          with channels_last and with torch.compile
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import (
    alternate_threads,
    captum_lime,
    committee_lime_images,
    lime_masks,
    smoothgrad_batches,
    to_batch,
)
from run import PHOTO, Figure, image_set, load_member, note, say, scores, spec_for, timed_execute, timings_text

from ray_consensus.dataset.decode import decode_image
from ray_consensus.dataset.manifest import read_manifest
from ray_consensus.dataset.superpixels import segment
from ray_consensus.explainers import create_explainer
from ray_consensus.explainers.lime import Lime, fill_with_mean_colours
from ray_consensus.runner import execute
from ray_consensus.spec.config import DatasetSpec, MemberSpec, parse_member

DEV = "cuda"
SMOKE = False  # --smoke: tiny sizes on the CPU, to check this script where no GPU is


def size(full: int, smoke: int) -> int:
    return smoke if SMOKE else full


def gpus(n: float) -> float:
    """GPUs per actor; 0 in a smoke test (no GPU there)."""
    return 0.0 if SMOKE else n


def sync_time() -> float:
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def on_gpu(member: str, num_classes: int):
    model, pre = load_member(MemberSpec(**parse_member(member)), num_classes)
    return model.to(DEV), pre.to(DEV)


# ---------------------------------------------------------------- 1

def lime_gpu(work: Path) -> None:
    data = image_set(work, "lime-data", 4, masks=False)
    manifest = read_manifest(DatasetSpec(path=str(data / "images")))
    lime = Lime(n_samples=size(1000, 50), output="logit")
    p = lime.params
    rgb = np.stack([decode_image(Path(u).read_bytes(), 224) for u in manifest.table["uri"]])
    seg = torch.from_numpy(np.stack([segment(x, **p.segment_settings()) for x in rgb])).long().to(DEV)
    images = to_batch(rgb).to(DEV)
    target = torch.tensor(manifest.table["label"].to_numpy(np.int64), device=DEV)
    masks = lime_masks(images, seg, p.n_samples, p.p_keep, p.seed)
    fill = fill_with_mean_colours(images, seg, int(seg.max()) + 1)
    for arch in ("mobilenetv3_small_050", "resnet50")[:size(2, 1)]:
        model, pre = on_gpu(f"m={arch}@random", manifest.num_classes)
        lime.explain(model, pre, images[:1], target[:1], seg[:1])  # warm-up
        t0 = sync_time()
        ours = lime.explain(model, pre, images, target, seg)["superpixel_weights"].double()
        t_ours = sync_time() - t0
        with torch.autocast(DEV, dtype=torch.bfloat16):
            lime.explain(model, pre, images[:1], target[:1], seg[:1])
            t0 = sync_time()
            half = lime.explain(model, pre, images, target, seg)["superpixel_weights"].double()
            t_half = sync_time() - t0
        captum_lime(model, pre, images[:1], seg[:1], target[:1], masks[:1], fill[:1], p, 1)  # warm-up
        t0 = sync_time()
        theirs = captum_lime(model, pre, images, seg, target, masks, fill, p, 1)
        t_captum = sync_time() - t0
        diff = max(float((ours[i, :len(w)] - w).abs().max()) for i, w in enumerate(theirs))
        largest = max(float(w.abs().max()) for w in theirs)
        bf16_diff = float((half - ours).nan_to_num().abs().max())
        say(Figure(f"lime_batched_vs_captum_per_image_gpu_{arch}", t_captum / t_ours, ".1f").line())
        note(f"{len(images)} images 224 px, {arch} (random init), {p.n_samples} samples, SLIC {p.n_segments}: "
             f"ours fp32 "
             f"{t_ours:.2f} s (forward batch {lime.forward_batch(torch.device(DEV), pre.size)}), bf16 autocast "
             f"{t_half:.2f} s; captum per image (perturbations_per_eval=1) {t_captum:.2f} s; max |ours - captum| "
             f"{diff:.1e} (largest weight {largest:.1e}); bf16 vs fp32 weights max diff {bf16_diff:.1e}")


# ---------------------------------------------------------------- 2 and 3

def smoothgrad_gpu(work: Path) -> None:
    n = size(512, 8)
    data = image_set(work, "e2e-data", n, masks=False)
    spec = spec_for(data, work / "e2e-run", ["m=resnet50@random"], {"n_samples": 10},
                    run={"shard_size": 128}, resources={"num_gpus": gpus(1), "batch_size": 32})
    manifest = read_manifest(spec.dataset)
    pixels = np.stack([decode_image(Path(u).read_bytes(), spec.run.image_size) for u in manifest.table["uri"]])
    labels = manifest.table["label"].to_numpy(np.int64)
    model, pre = on_gpu("m=resnet50@random", manifest.num_classes)
    explainer = create_explainer(spec.explainer.params)
    rates = {}
    for name, dtype, layout in (("fp32", None, False), ("bf16", torch.bfloat16, False),
                                ("bf16+channels_last", torch.bfloat16, True)):
        m = model.to(memory_format=torch.channels_last) if layout else model
        steps = smoothgrad_batches(m, pre, explainer, pixels, labels, 32, DEV, dtype)
        steps[0]()
        t0 = sync_time()
        done = sum(step() for step in steps)
        rates[name] = done / (sync_time() - t0)
    model = model.to(memory_format=torch.contiguous_format)
    say(Figure("smoothgrad_bare_loop_gpu_bf16_vs_fp32", rates["bf16"] / rates["fp32"], ".2f").line())
    note(f"resnet50 (random init) at 224 px, SmoothGrad n_samples 10, batch 32, {n} images in memory: "
         + ", ".join(f"{k} {v:.3g} img/s" for k, v in rates.items()))

    info, used = timed_execute(spec)
    ratio = (n / used.wall_s) / rates["fp32"]
    say(Figure("smoothgrad_end_to_end_vs_bare_loop_gpu", ratio, ".2f").line())
    note(f"end to end (fp32): {n / used.wall_s:.0f} img/s = {n} PNG images / {used.wall_s:.1f} s wall of execute() "
         f"(actor start-up, CUDA init, decode on CPU tasks, Parquet, reduce included); run.json: {timings_text(info)}")
    fast = spec_for(data, work / "e2e-run-bf16", ["m=resnet50@random"], {"n_samples": 10}, run={"shard_size": 128},
                    resources={"num_gpus": gpus(1), "batch_size": 32, "autocast": "bf16", "channels_last": True})
    info, used = timed_execute(fast)
    note(f"end to end with resources.autocast bf16 + channels_last: {n / used.wall_s:.0f} img/s "
         f"({used.wall_s:.1f} s); run.json: {timings_text(info)}")


# ---------------------------------------------------------------- 4

def committee_gpu(work: Path) -> None:
    n = size(96, 8)
    data = image_set(work, "committee-data", n, masks=True)
    members = ["resnet50", "mobilenetv3_small_050", "convnext_atto", "regnetx_002"][:size(4, 2)]
    params = {"n_samples": size(1000, 20)}
    spec = spec_for(data, work / "committee-run", [f"{a}@random" for a in members], params,
                    explainer={"name": "lime"}, run={"shard_size": 32},
                    resources={"num_gpus": gpus(0.25), "batch_size": 32})
    manifest = read_manifest(spec.dataset)
    models = [on_gpu(f"{a}@random", manifest.num_classes) for a in members]
    steps = committee_lime_images(list(manifest.table["uri"]), list(manifest.table["label"]), models,
                                  Lime(**params).params, spec.run.image_size, spec.run.map_size, device=DEV)
    seq_rate = max(tp.per_s for tp in alternate_threads(steps, time_cap_s=size(30, 1)).values())
    info, used = timed_execute(spec)
    ratio = (n / used.wall_s) / seq_rate
    say(Figure("committee_pipeline_vs_sequential_loop_gpu", ratio, ".1f").line())
    note(f"{n} images, committee {', '.join(members)} (random init, 224 px), LIME {params['n_samples']} samples, "
         f"{len(members)} slots x {spec.resources.num_gpus:g} GPU: "
         f"pipeline {n / used.wall_s:.2f} img/s ({used.wall_s:.1f} s, start-up included; {timings_text(info)}); "
         f"sequential per-image loop with captum Lime (perturbations_per_eval=1) on the GPU {seq_rate:.3f} img/s")


# ---------------------------------------------------------------- 5

def gpu_vs_cpu(work: Path) -> None:
    data = image_set(work, "agree-data", size(32, 8), masks=True)
    members = ["a=resnet10t@random", "b=mobilenetv3_small_050@random"]
    runs = {}
    for explainer, params, device, resources in (
            ("integrated_gradients", {"n_steps": 16}, "cpu", {"num_gpus": 0}),
            ("integrated_gradients", {"n_steps": 16}, "gpu", {"num_gpus": gpus(0.5)}),
            ("integrated_gradients", {"n_steps": 16}, "gpu_tf32", {"num_gpus": gpus(0.5), "autocast": "tf32"}),
            ("integrated_gradients", {"n_steps": 16}, "gpu_bf16",
             {"num_gpus": gpus(0.5), "autocast": "bf16", "channels_last": True}),
            ("smoothgrad", {"n_samples": 4}, "cpu", {"num_gpus": 0}),
            ("smoothgrad", {"n_samples": 4}, "gpu", {"num_gpus": gpus(0.5)})):
        # The true labels as targets: random-init members' near-equal logits let rounding flip a prediction.
        spec = spec_for(data, work / f"agree-{explainer}-{device}", members, params, explainer={"name": explainer},
                        run={"shard_size": 16}, resources=resources, method={"target": "label"})
        execute(spec, progress=False)
        runs[explainer, device] = scores(spec.run.output)

    def err(a, b) -> float:
        return max(abs(runs[a][k] - runs[b][k]) for k in runs[a])

    ig = ("integrated_gradients", "cpu"), ("integrated_gradients", "gpu")
    say(Figure("gpu_vs_cpu_consensus_score_difference", err(*ig), ".1e").line())
    note(f"{len(runs[ig[0]]) // 2} images, 2 members, target = label, the same spec with CPU actors and with GPU "
         f"actors (autocast none: float32, TF32 off): integrated gradients (16 steps, deterministic) {err(*ig):.1e}; "
         f"vs the GPU with tf32 {err(ig[0], ('integrated_gradients', 'gpu_tf32')):.1e}, with bf16 autocast + "
         f"channels_last {err(ig[0], ('integrated_gradients', 'gpu_bf16')):.1e}; SmoothGrad (4 samples) CPU vs GPU "
         f"{err(('smoothgrad', 'cpu'), ('smoothgrad', 'gpu')):.1e}: its noise is seeded per unit, but CPU and CUDA "
         f"generators draw different numbers from one seed")


# ---------------------------------------------------------------- 6

def smoothgrad_20k(work: Path) -> None:
    n = size(20_000, 16)
    data = image_set(work, "e2e-20k", n, masks=False)
    spec = spec_for(data, work / "e2e-20k-run", ["m=resnet50@random"], {"n_samples": 10},
                    run={"shard_size": 256}, resources={"num_gpus": gpus(1), "batch_size": 32, "autocast": "bf16"})
    manifest = read_manifest(spec.dataset)
    t0 = time.perf_counter()
    pixels = np.stack([decode_image(Path(u).read_bytes(), spec.run.image_size) for u in manifest.table["uri"]])
    decode_s = time.perf_counter() - t0
    labels = manifest.table["label"].to_numpy(np.int64)
    model, pre = on_gpu("m=resnet50@random", manifest.num_classes)
    explainer = create_explainer(spec.explainer.params)
    rates = {}
    for name, layout, compiled in (("eager", False, False), ("channels_last", True, False), ("compile", False, True)):
        m = model.to(memory_format=torch.channels_last) if layout else model.to(memory_format=torch.contiguous_format)
        m = torch.compile(m) if compiled else m
        steps = smoothgrad_batches(m, pre, explainer, pixels, labels, 32, DEV, torch.bfloat16)
        for step in steps[:3]:  # warm-up (and compilation)
            step()
        t0 = sync_time()
        done = sum(step() for step in steps)
        rates[name] = done / (sync_time() - t0)
    info, used = timed_execute(spec)
    best = max(rates, key=rates.get)
    ratio = (n / used.wall_s) / rates["eager"]
    say(Figure("smoothgrad_20k_end_to_end_vs_bare_loop_bf16", ratio, ".2f", ">= 0.85", ratio >= 0.85).line())
    note(f"{n} PNG images {PHOTO[1]}x{PHOTO[0]} -> 224 px, resnet50 (random init), SmoothGrad n_samples 10, batch 32, "
         f"bf16 autocast: end to end {n / used.wall_s:.3g} img/s ({used.wall_s:.0f} s wall of execute(), one GPU slot, "
         f"decode on CPU tasks); run.json: {timings_text(info)}")
    note("bare loop on the pre-decoded images (bf16; decoding them took "
         f"{decode_s:.0f} s in this process): " + ", ".join(f"{k} {v:.3g} img/s" for k, v in rates.items())
         + f"; fastest: {best}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep data sets and run roots in this folder")
    parser.add_argument("--only", type=int, nargs="+", choices=range(1, 7), metavar="N")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (num_gpus 0): checks the script")
    args = parser.parse_args(argv)
    global DEV, SMOKE
    if args.smoke:
        DEV, SMOKE = "cpu", True
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    want = set(args.only or range(1, 6))  # 6 (20,000 images, ~10 minutes) only when asked for
    work = args.keep or Path(tempfile.mkdtemp(prefix="ray-consensus-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    import captum
    import ray
    import timm

    gpu = "smoke test on the CPU" if SMOKE else torch.cuda.get_device_name()
    say(f"# ray-consensus GPU benchmark: {gpu}, {os.cpu_count()} CPU cores; torch "
        f"{torch.__version__}, timm {timm.__version__}, captum {captum.__version__}, ray {ray.__version__}; "
        f"photo-sized PNGs {PHOTO[1]}x{PHOTO[0]}")
    ray.init(address="local", include_dashboard=False, logging_level="WARNING",
             **({"num_cpus": 2, "num_gpus": 0} if SMOKE else {}))
    try:
        for n, part in ((1, lime_gpu), (2, smoothgrad_gpu), (4, committee_gpu), (5, gpu_vs_cpu), (6, smoothgrad_20k)):
            if n in want or (n == 2 and 3 in want):
                t0 = time.perf_counter()
                part(work)
                note(f"({time.perf_counter() - t0:.0f} s)")
    finally:
        ray.shutdown()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    say(f"# total wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
