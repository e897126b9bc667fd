"""Fixtures shared by the whole suite."""

import contextlib
import importlib.util
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray
from s3server import S3Server


@contextlib.contextmanager
def _local_ray(**options):
    """A Ray of this process alone (`address="local"`, never a cluster RAY_ADDRESS names) on 2 CPUs, no
    dashboard; `options` go to `ray.init` (num_gpus: logical GPUs, runtime_env). Shut down on exit."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", **options)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs) for the tests of a module that ask for it."""
    with _local_ray():
        yield


@pytest.fixture(scope="session")
def fresh_ray():
    """`with fresh_ray(num_gpus=5):` a local Ray inside one test, for a test that needs several Rays one
    after another or one that must see what the test set up first (logical GPUs, environment variables)."""
    return _local_ray


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto's standalone server over HTTP) for the session.

    A test that calls `s3_server.stop()` must call `s3_server.start()` again (in a
    `finally`), since other tests share the server.
    """
    server = S3Server()
    server.start()
    yield server
    server.stop(keep_state=False)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty, uniquely named bucket on `s3_server`, as `s3://name`."""
    return s3_server.make_bucket(f"test-{uuid.uuid4().hex[:16]}")


LEGACY = Path(__file__).resolve().parent / "legacy"


@pytest.fixture
def legacy_root(s3_server, tmp_path, monkeypatch):
    """A run root written by 0.1.0 (tests/legacy/run) copied to tmp_path, its data set back in its
    bucket on the test S3 server (the AWS variables point at it): a finished run for any test."""
    module_spec = importlib.util.spec_from_file_location("make_fixture", LEGACY / "make_fixture.py")
    fixture = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(fixture)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    client = s3_server.client()
    if fixture.BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=fixture.BUCKET)
    for path in sorted((LEGACY / "data").rglob("*.png")):
        client.upload_file(str(path), fixture.BUCKET, f"data/{path.relative_to(LEGACY / 'data').as_posix()}")
    root = tmp_path / "run"
    shutil.copytree(LEGACY / "run", root)
    from ray_consensus.spec.config import parse_spec

    yield root, parse_spec(fixture.spec(str(root)))
    ray.shutdown()  # execute() started one for the reducer: leave the next tests a clean process




def _broken_copy(path: Path, value: float) -> str:
    """resnet10t with member a's weights (its seeded random init), one weight of its first convolution set to
    `value`, as a safetensors checkpoint."""
    from safetensors.torch import save_file

    from ray_consensus.models.committee import create_member_model
    from ray_consensus.spec.config import MemberSpec

    model = create_member_model(MemberSpec(id="a", arch="resnet10t", weights="random"), 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[first].view(-1)[0] = value
    save_file(state, str(path))
    return str(path)


@pytest.fixture(scope="session")
def broken_member_runs(tmp_path_factory, fresh_ray) -> dict:
    """One run root for tests/test_nonfinite.py and tests/test_stored_tables.py: members a, b, then a, b and
    two copies of a with one weight NaN (`n`) and inf (`i`). Its data set is a CSV manifest: 8 good images
    with masks, a row whose label is out of range and, in a trailing shard of its own (shard_size 8), a
    truncated PNG. Returns root, the two runs' run.json (`healthy`, `broken`) and the first run's tables."""
    import pandas as pd
    import pyarrow.parquet as pq
    from imagesets import make_image_folder, tiny_spec

    from ray_consensus.runner import execute
    from ray_consensus.spec.config import parse_spec

    tmp = tmp_path_factory.mktemp("broken-members")
    data = make_image_folder(tmp / "ds", n_classes=2, per_class=4)
    images = data / "images"
    (images / "c1" / "zz-truncated.png").write_bytes((images / "c1" / "img000.png").read_bytes()[:150])
    rows = [{"image_id": f"{p.parent.name}/{p.stem}", "uri": str(p), "label": int(p.parent.name[1]),
             "mask_uri": str(data / "masks" / p.parent.name / p.name)} for p in sorted(images.rglob("*.png"))]
    rows.append({**rows[0], "image_id": "c0/label-9", "label": 9})
    pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
    root = tmp / "run"
    spec = tiny_spec(data, str(root))
    spec["dataset"] = {"path": str(tmp / "manifest.csv"), "num_classes": 2}
    with contextlib.nullcontext() if ray.is_initialized() else fresh_ray():
        healthy = execute(parse_spec(spec), progress=False, report=False)
        before = {kind: pq.read_table(str(root / kind)).to_pandas() for kind in ("consensus", "scores")}
        before["models"] = pd.read_parquet(root / "tables" / "models.parquet")
        spec["committee"] += [{"id": m, "arch": "resnet10t", "weights": _broken_copy(tmp / f"{m}.safetensors", value)}
                              for m, value in (("n", np.nan), ("i", np.inf))]
        broken = execute(parse_spec(spec), progress=False)
    return {"root": root, "healthy": healthy, "before": before, "broken": broken}
