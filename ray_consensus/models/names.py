"""Which timm architectures exist, checked without importing timm on `validate`'s path.

Importing timm takes seconds (it imports torch, torchvision and every model module); a misspelled
name among 80 members is refused before it (timm is imported later only for what needs it: the
checkpoints, a pretrained tag's source the first time: `pretrained.known_sources`). timm's registry of
names is listed once per
installed timm version into the cache (`$RAY_CONSENSUS_CACHE`, default ~/.cache/ray-consensus)
and read from there afterwards; a name not in the list is looked up in timm itself before it
is refused, so a stale or hand-edited list can only cost time, never refuse a real name.
"""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ray_consensus.errors import SpecError
from ray_consensus.storage.atomic import atomic_write


def default_cache_dir() -> Path:
    """``$RAY_CONSENSUS_CACHE`` if set, else ``~/.cache/ray-consensus``."""
    return Path(os.environ.get("RAY_CONSENSUS_CACHE") or Path.home() / ".cache" / "ray-consensus")


def timm_cache_file(what: str) -> Path | None:
    """The cache file of `what` for the installed timm version (None: timm is not installed)."""
    try:
        return default_cache_dir() / f"timm-{version('timm')}-{what}"
    except PackageNotFoundError:
        return None


def write_cache_file(path: Path | None, text: str) -> None:
    """Write a cache file atomically; a read-only home only means the work is done again next time."""
    if path is None:
        return
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except OSError:
        pass


@lru_cache(maxsize=1)
def known_archs() -> frozenset[str]:
    """timm's architecture names (without pretrained tags)."""
    path = timm_cache_file("models.txt")
    if path is not None and path.is_file():
        return frozenset(path.read_text().split())
    import timm

    names = frozenset(timm.list_models())
    write_cache_file(path, "\n".join(sorted(names)) + "\n")
    return names


def check_arch(arch: str) -> None:
    """Raise SpecError for a name timm does not know, with the closest names."""
    name = arch.split(".")[0]
    if name in known_archs():
        return
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, sorted(known_archs() | set(timm.list_models())), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise SpecError(f"unknown timm architecture '{arch}'{hint}")
