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

import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

from ray_consensus import compat
from ray_consensus.errors import SpecError, first_line
from ray_consensus.models.names import timm_cache_file, write_cache_file
from ray_consensus.spec.config import MemberSpec

HUB_TIMEOUT_S = 10.0
SOURCES_FILE = "pretrained-sources.json"


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
    """The source timm's `create_model(member.arch, pretrained=True, **member.kwargs)` loads from: from
    the sources cached for the installed timm version (`known_sources`), else asked of timm."""
    key = _source_key(member)
    known = known_sources()
    if key not in known:
        known[key] = _timm_source(member)
    return known[key]


@lru_cache(maxsize=1)
def known_sources() -> dict[str, Source]:
    """The sources timm gave before, per (arch, kwargs), read once from the cache of this timm version
    (importing timm takes seconds: 4.6 of the 14 s `validate` of a million images x 80 members took
    here); `save_known_sources` adds the new ones."""
    path = timm_cache_file(SOURCES_FILE)
    try:
        return {k: Source(v[0], v[1], tuple(v[2]), v[3]) for k, v in json.loads(path.read_text()).items()}
    except (AttributeError, OSError, ValueError, TypeError, IndexError):  # none yet, or unreadable: ask timm
        return {}


def save_known_sources() -> None:
    write_cache_file(timm_cache_file(SOURCES_FILE), json.dumps(known_sources(), sort_keys=True))


def _source_key(member: MemberSpec) -> str:
    return json.dumps([member.arch, member.kwargs], sort_keys=True, default=str)


def _timm_source(member: MemberSpec) -> Source:
    from timm.models import resolve_pretrained_cfg, split_model_name_tag

    kwargs = timm_kwargs(member.kwargs)
    name, tag = split_model_name_tag(member.arch)
    try:
        cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg") or tag or None,
                                     kwargs.get("pretrained_cfg_overlay"))
    except Exception as e:  # timm raises what it meets (RuntimeError for an unknown tag, others for a bad cfg)
        raise SpecError(f"model {member.id}: no pretrained weights for '{member.arch}': {first_line(e)}") from None
    kind, location = compat.timm_weights_source(cfg.to_dict())  # timm's own choice among the sources
    if not kind:
        raise SpecError(f"model {member.id}: timm has no pretrained weights for '{member.arch}' "
                        f"(use weights: random or a checkpoint)")
    files: tuple[str, ...] = ()
    if kind == "hf-hub":
        location, filename = location if isinstance(location, tuple) else (location, None)
        files = compat.timm_hub_files(filename)
        if files[-1].endswith(".safetensors") or cfg.custom_load == "hf":  # timm downloads just that file
            files = files[-1:]
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
    save_known_sources()
    offline = hub_offline()
    distinct = list(dict.fromkeys(sources.values()))
    # The local caches first, in this thread (80 members: milliseconds); only what they lack asks a server.
    problems = {source: None for source in distinct if _at_hand(source)}
    asked = [source for source in distinct if source not in problems]
    if asked:
        with ThreadPoolExecutor(max_workers=min(16, len(asked))) as pool:
            problems.update(zip(asked, pool.map(lambda s: _problem(s, offline), asked)))
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


def _at_hand(source: Source) -> bool:
    """The weights are in the local cache timm loads them from (or are a local file)."""
    if source.kind == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = source.location.partition("@")
        cache = hub_cache_dir()
        return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision or None), str)
                   for f in source.files)
    if source.kind == "url":
        return os.path.exists(_torch_hub_file(source.location))
    if source.kind in ("file", "local-dir"):
        return os.path.exists(source.location)
    return True  # a state_dict in the config itself


def _problem(source: Source, offline: bool) -> str | None:
    """Why weights not at hand cannot be had, or None when their server has them."""
    if source.kind == "hf-hub":
        return _hub_problem(source, offline)
    if source.kind == "url":
        return _url_problem(source.location)
    return f"{source.location} not found"


def _hub_problem(source: Source, offline: bool) -> str | None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = source.location.partition("@")
    cache = hub_cache_dir()
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
        except Exception as e:  # HTTP, network, TLS or offline errors, of requests or httpx by version: one line
            return (f"{repo} is not in the local Hugging Face cache {cache} and the hub did not give it: "
                    f"{first_line(e)}")
    return f"the hub's {repo} has no {files}"


def torch_hub_dir() -> str:
    """torch.hub.get_dir()'s rule (TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch; then hub),
    without importing torch (seconds)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return os.path.join(_expand(home), "hub")


def _torch_hub_file(url: str) -> str:
    from urllib.parse import urlparse

    return os.path.join(torch_hub_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _url_problem(url: str) -> str | None:
    import http.client
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S):
            return None
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts; a bad URL
        return f"{url} is not in torch hub's cache {torch_hub_dir()} and did not answer: {first_line(e)}"


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))
