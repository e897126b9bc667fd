"""Files where huggingface_hub (and torch hub) keep downloads, for tests that run without the hub."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

COMMIT = "3f1d2c0b9a8e7d6c5b4a39281706f5e4d3c2b1a0"


def put_in_hub_cache(hf_home: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """A file where huggingface_hub keeps a download of it: HF_HOME/hub/models--ORG--NAME/snapshots/<commit>/,
    with refs/main naming that commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    path = repo / "snapshots" / COMMIT / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def placeholder_weights(members, hf_home: Path, torch_home: Path) -> None:
    """An empty file where each pretrained member's weights would be cached (HF_HOME's hub cache, or
    TORCH_HOME's checkpoints for the few tags timm loads from a URL): enough for `validate`, which
    looks for the files and reads none of them."""
    from ray_consensus.models.pretrained import pretrained_source

    for member in members:
        source = pretrained_source(member)
        if source.kind == "hf-hub":
            put_in_hub_cache(hf_home, source.location, source.files[0], b"")
        else:
            assert source.kind == "url", source
            path = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(source.location).path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
