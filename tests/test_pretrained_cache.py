"""`weights: pretrained` members: their weights are found in the local Hugging Face cache (or on the hub)
before Ray starts, the slots load them from there, and a member whose weights cannot be had is one line."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pandas as pd
import pytest
from hubcache import put_in_hub_cache
from imagesets import make_image_folder, tiny_spec
from test_spec_checks import assert_one_line, cli_each

TAG = "resnet10t.c3_in1k"  # a real timm pretrained tag: timm loads it from the hub repo its config names
HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(HF_HOME, the same weights as a checkpoint file): weights this test made for TAG (a seeded random
    resnet10t with the tag's 1000-class head) as model.safetensors in the hub repo timm's config names."""
    import timm
    import torch
    from safetensors.torch import save_file

    home = tmp_path_factory.mktemp("hf")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = timm.create_model("resnet10t", pretrained=False)
    checkpoint = tmp_path_factory.mktemp("weights") / "written.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    repo = timm.models.get_pretrained_cfg(TAG).hf_hub_id
    assert repo == f"timm/{TAG}"
    put_in_hub_cache(home, repo, "model.safetensors", checkpoint.read_bytes())
    return home, checkpoint


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """The hub cache in the environment, offline: the cache alone counts, for the check and for timm."""
    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(hub_cache[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def ray_offline(offline, fresh_ray):
    """Ray started with that environment, so the slots (new processes) see the same cache."""
    with fresh_ray():
        yield


@pytest.mark.slow
def test_a_pretrained_tag_runs_from_the_local_hub_cache_with_the_weights_written(ray_offline, hub_cache, tmp_path):
    from ray_consensus.runner import execute
    from ray_consensus.spec.config import parse_spec

    checkpoint = hub_cache[1]
    dataset = make_image_folder(tmp_path / "ds", n_classes=2, per_class=3, masks=False)
    # The same weights from the hub cache and as a checkpoint file, and the same architecture random.
    spec = tiny_spec(dataset, str(tmp_path / "run"), models=(f"hub={TAG}", f"file=resnet10t@{checkpoint}",
                                                             "rnd=resnet10t@random"),
                     explainer={"name": "saliency", "params": {}})
    spec["dataset"]["num_classes"] = 1000  # the tag's head
    info = execute(parse_spec(spec), progress=False)

    assert info.status == "complete" and info.counts.errors == 0
    rows = {m: pd.read_parquet(tmp_path / "run" / "attributions" / f"model={m}").sort_values("image_id")
            for m in ("hub", "file", "rnd")}
    assert len(rows["hub"]) == 6
    maps = {m: np.stack(r["attribution"].to_numpy()) for m, r in rows.items()}
    scale = np.abs(maps["file"]).max()
    assert scale > 0
    # Saliency is deterministic: the slot's hub member computed what the written weights compute ...
    assert np.abs(maps["hub"] - maps["file"]).max() <= 1e-5 * scale
    assert list(rows["hub"]["pred"]) == list(rows["file"]["pred"])
    # ... and not what other weights of the architecture would.
    assert np.abs(maps["rnd"] - maps["file"]).max() > 0.1 * scale


def test_validate_and_run_name_the_member_whose_weights_are_not_in_the_offline_cache(offline, tmp_path):
    dataset = make_image_folder(tmp_path / "ds", n_classes=2, per_class=3, masks=False)
    run = tmp_path / "run"
    args = ["--dataset", str(dataset / "images"), "--model", f"ok={TAG}", "--model", "gone=resnet18.a1_in1k",
            "--output", str(run), "--set", "dataset.num_classes=1000"]
    validate, run_, classes = cli_each(["validate", *args], ["run", *args],
                                       ["validate", *args[:4], "--output", str(run)])  # and Ray never imported
    for result in (validate, run_):
        assert_one_line(result, "model gone: cannot load pretrained weights for 'resnet18.a1_in1k'",
                        "timm/resnet18.a1_in1k", "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    # The tag that is in the cache passes; its 1000-class head does not fit a 2-class data set.
    assert_one_line(classes, "model ok: pretrained 'resnet10t.c3_in1k' has 1000 classes, the data set has 2")
    assert not run.exists()


class HangingUpHub:
    """A hub address whose server reads each request and hangs up without answering; `requests` holds each
    request's first line ("HEAD /timm/.../model.safetensors HTTP/1.1")."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and (chunk := conn.recv(4096)):
                    head += chunk
                self.requests.append(head.split(b"\r\n")[0].decode())


def test_a_hub_that_does_not_answer_is_one_line_naming_the_member(tmp_path, monkeypatch):
    """What `validate` and `run` check first (preflight), with the hub's address on a server that hangs up:
    the member's file is asked for once (no retries, which would wait seconds between them)."""
    from ray_consensus.errors import SpecError
    from ray_consensus.planning.preflight import preflight
    from ray_consensus.spec.config import parse_member, parse_spec

    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    hub = HangingUpHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    dataset = make_image_folder(tmp_path / "ds", n_classes=2, per_class=3, masks=False)
    spec = parse_spec({"dataset": {"path": str(dataset / "images"), "num_classes": 1000},
                       "committee": [parse_member(f"net={TAG}")], "run": {"output": str(tmp_path / "run")}})
    try:
        with pytest.raises(SpecError) as err:
            preflight(spec, list_units=False)
    finally:
        hub.listener.close()
    assert [r for r in hub.requests if r.startswith("HEAD ")] == [
        f"HEAD /timm/{TAG}/resolve/main/model.safetensors HTTP/1.1"]
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"model net: cannot load pretrained weights for '{TAG}': timm/{TAG} is not in the "
                              f"local Hugging Face cache {tmp_path / 'empty-hf' / 'hub'} and the hub did not give it")


def test_weight_sources_are_cached_per_timm_version_and_read_back_without_timm(tmp_path):
    """A later `validate` finds each tag's source in the cache instead of importing timm (seconds)."""
    import json
    import subprocess
    import sys

    code = """
import json, sys
from ray_consensus.spec.config import MemberSpec
from ray_consensus.models.pretrained import pretrained_source, save_known_sources
members = [MemberSpec(id="a", arch=sys.argv[1], weights="pretrained"),
           MemberSpec(id="b", arch="vit_tiny_patch16_224", weights="pretrained", kwargs={"num_classes": 7})]
sources = [list(pretrained_source(m)) for m in members]
save_known_sources()
print(json.dumps({"sources": sources, "timm": "timm" in sys.modules}))
"""
    env = {**__import__("os").environ, "RAY_CONSENSUS_CACHE": str(tmp_path)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", code, TAG], capture_output=True, text=True, check=True,
                                      env=env).stdout) for _ in range(2)]
    assert runs[0]["timm"] and not runs[1]["timm"]  # asked timm once, then read the cache
    assert runs[0]["sources"] == runs[1]["sources"]
    (a_kind, a_repo, a_files, a_classes), (_, b_repo, _, b_classes) = runs[1]["sources"]
    assert (a_kind, a_repo, a_classes) == ("hf-hub", f"timm/{TAG}", 1000) and "model.safetensors" in a_files
    assert b_repo.startswith("timm/vit_tiny_patch16_224") and b_classes == 7  # the kwargs are part of the key
    assert list(tmp_path.glob("timm-*-pretrained-sources.json"))
