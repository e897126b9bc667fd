"""Copy the offline demo's data set and trained committee to S3, for jobs/demo-local-s3.yaml.

    python jobs/stage_demo_s3.py s3://ray-consensus-demo/inputs

Builds (or reuses) the demo under $RAY_CONSENSUS_CACHE (default ~/.cache/ray-consensus),
then writes, under the destination:

    images/<class>/<image_id>.png     the image set a run explains
    masks/<class>/<image_id>.png      its foreground masks (0 or 255)
    models/<member id>.safetensors    the committee's trained weights

The endpoint, keys and region come from the standard AWS variables, as for every
ray-consensus command. A local folder works as destination too.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ray_consensus.demo.spec import ensure_demo
from ray_consensus.storage.store import open_store


def stage_demo(dest: str, **demo_options) -> list[str]:
    """Write the demo's images, masks and checkpoints under `dest`; returns the relative paths written.

    `demo_options` go to `ray_consensus.demo.spec.ensure_demo` (cache_dir, seed, spec, recipes, progress).
    """
    root, committee = ensure_demo(**demo_options)
    store = open_store(dest)
    written = []
    for folder in ("images", "masks"):
        for path in sorted((root / folder).rglob("*.png")):
            rel = path.relative_to(root).as_posix()
            store.write_bytes(rel, path.read_bytes())
            written.append(rel)
    for member in committee:
        rel = f"models/{member['id']}.safetensors"
        store.write_bytes(rel, Path(member["weights"]).read_bytes())
        written.append(rel)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} s3://bucket/prefix")
    print(f"staged {len(stage_demo(sys.argv[1]))} files under {sys.argv[1]}")
