"""Write tests/legacy/: a run root made by ray-consensus 0.1.0 (commit 4aa1785), for the test that
newer code resumes such a root without recomputing its attributions.

Run with the 0.1.0 code on the path (e.g. a worktree of that commit):

    PYTHONPATH=<0.1.0 checkout>:tests python tests/legacy/make_fixture.py

The data set lives in a bucket (S3 URIs do not depend on where a checkout sits, local paths
would), on a moto server this script starts; the run root is a local folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from imagesets import make_image_folder  # noqa: E402
from s3server import S3Server  # noqa: E402

BUCKET = "rc-legacy-fixture"


def spec(output: str) -> dict:
    return {
        "dataset": {"path": f"s3://{BUCKET}/data/images", "masks": f"s3://{BUCKET}/data/masks"},
        "committee": [{"id": "a", "arch": "resnet10t", "weights": "random"},
                      {"id": "b", "arch": "mobilenetv3_small_050", "weights": "random"}],
        "explainer": {"name": "smoothgrad", "params": {"n_samples": 3, "samples_per_pass": 3}},
        "method": {"bootstrap": 50, "robustness_sizes": [2], "robustness_trials": 2},
        "run": {"output": output, "shard_size": 4, "image_size": 32, "map_size": 16, "gallery": 2},
        "resources": {"batch_size": 4},
    }


def main() -> None:
    import os

    import ray

    from ray_consensus.spec.config import parse_spec
    from ray_consensus.runner import execute

    for folder in ("data", "run"):
        shutil.rmtree(HERE / folder, ignore_errors=True)
    make_image_folder(HERE / "data", n_classes=2, per_class=4, size=(32, 32))
    server = S3Server()
    server.start()
    try:
        os.environ.update(server.env())
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        for path in sorted((HERE / "data").rglob("*.png")):
            client.upload_file(str(path), BUCKET, f"data/{path.relative_to(HERE / 'data').as_posix()}")
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        execute(parse_spec(spec(str(HERE / "run"))), progress=False)
        ray.shutdown()
    finally:
        server.stop(keep_state=False)
    shutil.rmtree(HERE / "run" / "report")  # large and not needed to resume


if __name__ == "__main__":
    main()
