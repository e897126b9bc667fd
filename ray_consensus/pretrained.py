"""Where a `weights: pretrained` member's weights come from, and whether they can be had.

timm resolves a member's arch (a pretrained tag such as resnet18.a1_in1k, or a bare architecture:
its default tag) and kwargs (pretrained_cfg, pretrained_cfg_overlay) to a pretrained config that
names the weights' source: almost always a Hugging Face hub repo (`hf_hub_id`) and file
(`hf_hub_filename`, default pytorch_model.bin, for which timm first tries model.safetensors), for
a few tags a URL (kept in torch hub's checkpoint cache), or a local file.

`check_pretrained` runs on the driver before Ray starts and downloads nothing: each member's file
must be in the local Hugging Face cache, or the hub (or the URL's server) must answer that it has it,
within HUB_TIMEOUT_S; with HF_HUB_OFFLINE=1 only the cache counts, as for timm in the slots. A member
whose weights cannot be had, or whose pretrained head does not have the data set's classes, is one
`SpecError` line naming it. The cache folder, the offline switch and the hub's address (HF_ENDPOINT)
are read from the environment when the check runs, as the slots (new processes) will read them;
huggingface_hub reads them once, at import.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from ray_consensus.config import MemberSpec
from ray_consensus.errors import SpecError

HUB_TIMEOUT_S = 10.0


class Source(NamedTuple):
    """Where timm loads a member's pretrained weights from."""

    kind: str                # "hf-hub", "url", "file", "local-dir" or "state_dict" (timm's names)
    location: str            # hub repo id (with @revision), URL or path
    files: tuple[str, ...]   # for "hf-hub": the repo's files timm tries, in order
    num_classes: int | None  # classes of the head the member gets (None: timm's config does not say)


def timm_kwargs(kwargs: dict) -> dict:
    """A member's kwargs for timm: YAML/JSON have no tuples, timm wants them inside pretrained_cfg_overlay."""
    out = dict(kwargs)
    if isinstance(out.get("pretrained_cfg_overlay"), dict):
        out["pretrained_cfg_overlay"] = {k: tuple(v) if isinstance(v, list) else v
                                         for k, v in out["pretrained_cfg_overlay"].items()}
    return out


def check_head(member: MemberSpec, classes: int | None, num_classes: int) -> None:
    """Raise SpecError when a pretrained member's head does not have the data set's classes."""
    if classes is not None and classes != num_classes:
        raise SpecError(f"model {member.id}: pretrained '{member.arch}' has {classes} classes, the data set has "
                        f"{num_classes}")


def pretrained_source(member: MemberSpec) -> Source:
    """The source timm's `create_model(member.arch, pretrained=True, **member.kwargs)` loads from."""
    from timm.models import resolve_pretrained_cfg, split_model_name_tag
    from timm.models._builder import _resolve_pretrained_source  # timm's own choice among the sources
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

    kwargs = timm_kwargs(member.kwargs)
    name, tag = split_model_name_tag(member.arch)
    try:
        cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg") or tag or None,
                                     kwargs.get("pretrained_cfg_overlay"))
    except Exception as e:  # an unknown tag, a malformed pretrained_cfg
        raise SpecError(f"model {member.id}: no pretrained weights for '{member.arch}': {_first_line(e)}") from None
    kind, location = _resolve_pretrained_source(cfg.to_dict())
    if not kind:
        raise SpecError(f"model {member.id}: timm has no pretrained weights for '{member.arch}' "
                        f"(use weights: random or a checkpoint)")
    files: tuple[str, ...] = ()
    if kind == "hf-hub":
        location, filename = location if isinstance(location, tuple) else (location, HF_WEIGHTS_NAME)
        direct = filename.endswith(".safetensors") or cfg.custom_load == "hf"  # timm downloads just that file
        files = (filename,) if direct else (*_get_safe_alternatives(filename), filename)
    return Source(kind, "" if kind == "state_dict" else str(location), files,
                  kwargs.get("num_classes", cfg.num_classes))


def check_pretrained(members: list[MemberSpec], num_classes: int) -> None:
    """Raise SpecError for the first `weights: pretrained` member (in committee order) whose weights
    cannot be had or whose head does not fit the data set; the sources are looked up concurrently."""
    members = [m for m in members if m.weights == "pretrained"]
    if not members:
        return
    sources = {}
    for member in members:
        sources[member.id] = source = pretrained_source(member)
        check_head(member, source.num_classes, num_classes)
    offline = hub_offline()
    distinct = list(dict.fromkeys(sources.values()))
    with ThreadPoolExecutor(max_workers=min(16, len(distinct))) as pool:
        problems = dict(zip(distinct, pool.map(lambda s: _problem(s, offline), distinct)))
    for member in members:
        problem = problems[sources[member.id]]
        if problem:
            raise SpecError(f"model {member.id}: cannot load pretrained weights for '{member.arch}': {problem}")


def hub_cache_dir() -> str:
    """huggingface_hub's cache folder by its rule (HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub), as the environment says now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(_expand(home), "hub")
    return _expand(cache)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it: 1, on, yes or true."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def _problem(source: Source, offline: bool) -> str | None:
    """Why the weights cannot be had, or None when they are at hand or the server has them."""
    if source.kind == "hf-hub":
        return _hub_problem(source, offline)
    if source.kind == "url":
        return _url_problem(source.location)
    if source.kind in ("file", "local-dir") and not os.path.exists(source.location):
        return f"{source.location} not found"
    return None


def _hub_problem(source: Source, offline: bool) -> str | None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = source.location.partition("@")
    cache = hub_cache_dir()
    if any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision or None), str)
           for f in source.files):
        return None
    files = " or ".join(source.files)
    if offline:
        return f"{repo} ({files}) is not in the local Hugging Face cache {cache} and HF_HUB_OFFLINE is set"
    for f in source.files:
        try:
            url = hf_hub_url(repo, f, revision=revision or None, endpoint=os.environ.get("HF_ENDPOINT") or None)
            get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
            return None
        except EntryNotFoundError:
            continue  # timm tries the next file
        except Exception as e:
            return (f"{repo} is not in the local Hugging Face cache {cache} and the hub did not give it: "
                    f"{_first_line(e)}")
    return f"the hub's {repo} has no {files}"


def _url_problem(url: str) -> str | None:
    import urllib.request
    from urllib.parse import urlparse

    import torch.hub

    if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S):
            return None
    except Exception as e:
        return f"{url} is not in torch hub's cache {torch.hub.get_dir()} and did not answer: {_first_line(e)}"


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
