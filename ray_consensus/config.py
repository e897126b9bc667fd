"""The run spec: a YAML file (or flags) resolved into small typed objects.

The schema documents itself: every field below carries its help text, which
`ray-consensus validate --schema` prints. Unknown keys and bad values raise
`SpecError` with one line that says what is wrong (and, for typos, what was meant).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class SpecError(ValueError):
    """A run spec that cannot be run; the message is one line meant for the user."""


def _f(default: Any, help: str, choices: tuple | None = None):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DatasetSpec:
    path: str = _f("", "image folder (one sub-folder per class) or manifest table (.csv/.parquet: uri, label, "
                   "optional mask_uri, optional image_id); local path or s3:// URI")
    masks: str | None = _f(None, "optional folder of foreground masks mirroring the image folder (same relative "
                                 "paths; any image extension)")
    mask_foreground: str = _f("nonzero", "which mask pixels are foreground: nonzero, or nonzero_not_255 "
                                         "(VOC-style masks whose 255 marks object borders)",
                              ("nonzero", "nonzero_not_255"))
    num_classes: int | None = _f(None, "number of classes; default: the number of class folders, or max(label)+1")


@dataclass
class MemberSpec:
    id: str = _f("", "model id used in every table and path (letters, digits, . _ -)")
    arch: str = _f("", "timm architecture name, e.g. resnet50 or vit_small_patch16_224.augreg_in21k_ft_in1k")
    weights: str = _f("pretrained", "pretrained (timm hub), random (smoke tests), or the path/URI of a "
                                    ".safetensors or .pt/.pth state dict (loaded without unpickling code)")
    kwargs: dict = _f({}, "extra keyword arguments for timm.create_model (e.g. img_size)")
    batch_size: int | None = _f(None, "images per forward batch for this member (default: resources.batch_size)")


@dataclass
class ExplainerSpec:
    name: str = _f("smoothgrad", "attribution method (see `ray-consensus validate --schema` for the list)")
    params: dict = _f({}, "method parameters, e.g. {n_samples: 50, noise_level: 0.1} for smoothgrad")


@dataclass
class MethodSpec:
    target: str = _f("label", "class explained: the ground-truth label or each model's own prediction",
                     ("label", "prediction"))
    voted: str = _f("all", "images voted on: every image, or only those every member classifies correctly",
                    ("all", "all_correct"))
    normalise: str = _f("abs_l2", "map normalisation before voting", ("abs_l2", "positive_l2", "max", "rank"))
    vote: str = _f("mean", "voting rule", ("mean", "median", "trimmed_mean", "rank_mean"))
    similarity: str = _f("cosine", "consensus score measure", ("cosine", "pearson", "spearman", "topk_iou"))
    leave_one_out: bool = _f(False, "score each model against the vote of the others")
    bootstrap: int = _f(1000, "bootstrap resamples (of images) for correlation confidence intervals")
    robustness_sizes: list = _f([], "sub-committee sizes for the robustness table (default: 3..K-1 in steps)")
    robustness_trials: int = _f(20, "random sub-committees drawn per size")
    seed: int = _f(0, "seed for bootstrap, sub-committees and stochastic explainers")


@dataclass
class RunSection:
    output: str = _f("", "run root: a local folder or s3://bucket/prefix")
    shard_size: int = _f(256, "images per shard (the unit of work, retry and resume); fixed for a run root")
    image_size: int = _f(224, "side of the square crop every member sees (shorter side resized, then centre crop)")
    map_size: int = _f(56, "side of the common attribution grid all maps are resampled to")
    gallery: int = _f(8, "sample images shown in the report")
    map_dtype: str = _f("float32", "storage type of attribution maps", ("float32", "float16"))


@dataclass
class ResourcesSpec:
    actors_per_model: int = _f(1, "actors in each model's pool")
    num_gpus: float = _f(0.0, "GPUs per actor (0 on CPU; fractions share a GPU)")
    num_cpus: float | None = _f(None, "CPUs per actor (default: 1 with GPUs; on CPU-only clusters the CPUs "
                                      "shared out so that every member's pool fits at once)")
    batch_size: int = _f(16, "images per forward batch (per member override: committee[].batch_size)")
    autocast: str = _f("none", "precision on GPU actors: none (float32 with TF32 off, the closest to CPU runs), "
                               "tf32 (float32 storage, TF32 matrix maths), bf16 or fp16 autocast",
                        ("none", "tf32", "bf16", "fp16"))
    channels_last: bool = _f(False, "channels_last memory format on GPU actors")


@dataclass
class StorageSpec:
    endpoint_url: str | None = _f(None, "S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    region: str | None = _f(None, "region (default: AWS_DEFAULT_REGION / AWS_REGION / profile)")
    profile: str | None = _f(None, "AWS profile name")
    access_key_id: str | None = _f(None, "access key (default: AWS_ACCESS_KEY_ID / profile); never written out")
    secret_access_key: str | None = _f(None, "secret key (default: AWS_SECRET_ACCESS_KEY / profile); never "
                                             "written out")


SECRET_FIELDS = ("access_key_id", "secret_access_key")


@dataclass
class RunSpec:
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    committee: list[MemberSpec] = field(default_factory=list)
    explainer: ExplainerSpec = field(default_factory=ExplainerSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    run: RunSection = field(default_factory=RunSection)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)

    def to_public_dict(self) -> dict:
        """The spec as plain data with secrets removed (for run.json and logs)."""
        d = dataclasses.asdict(self)
        for k in SECRET_FIELDS:
            d["storage"][k] = None if d["storage"][k] is None else "***"
        return d

    def member(self, model_id: str) -> MemberSpec:
        return next(m for m in self.committee if m.id == model_id)


# ---------------------------------------------------------------- parsing

def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    args = get_args(typ)
    if value is None and (typ is type(None) or type(None) in args):
        return None
    if args and type(None) in args:  # Optional[X]
        typ = next(a for a in args if a is not type(None))
        origin, args = get_origin(typ), get_args(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(typ, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise SpecError(f"{where}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise SpecError(f"{where}: expected {'an integer' if typ is int else 'a number'}, got {value!r}")
        if typ is int and float(value) != out:
            raise SpecError(f"{where}: expected an integer, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, where: str):
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise SpecError(f"unknown key '{where + '.' if where else ''}{key}'{_suggest(str(key), fields)}")
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], path)
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise SpecError(f"{path}: unknown value '{kwargs[key]}'{_suggest(str(kwargs[key]), choices)}")
    return cls(**kwargs)


def parse_spec(data: dict | None) -> RunSpec:
    """Build a RunSpec from plain data (a parsed YAML document) and check it."""
    spec = _build(RunSpec, data or {}, "")
    check_spec(spec)
    return spec


def load_spec_file(path: str | Path) -> dict:
    """Read a YAML spec file into plain data, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"invalid YAML in {p}{at}: {getattr(e, 'problem', None) or e}") from None
    if data is not None and not isinstance(data, dict):
        raise SpecError(f"{p}: the spec must be a mapping of sections (dataset, committee, ...)")
    return data or {}


def parse_member(text: str) -> dict:
    """A `--model` flag: `ID=ARCH[@WEIGHTS]` or `ARCH[@WEIGHTS]` (id defaults to the arch)."""
    ident, _, rest = text.rpartition("=") if "=" in text.split("@")[0] else ("", "", text)
    arch, _, weights = rest.partition("@")
    if not arch:
        raise SpecError(f"--model '{text}': expected ARCH, ID=ARCH or ID=ARCH@WEIGHTS")
    return {"id": ident or arch.split(".")[0], "arch": arch, "weights": weights or "pretrained"}


def check_spec(spec: RunSpec) -> None:
    """Static checks that need no I/O (the rest is `validate`)."""
    from ray_consensus.explainers import EXPLAINERS

    if not spec.dataset.path:
        raise SpecError("dataset.path is required (an image folder or a manifest table)")
    if not spec.run.output:
        raise SpecError("run.output is required (a local folder or s3://bucket/prefix)")
    if not spec.committee:
        raise SpecError("the committee is empty: add members under `committee:` or pass --model")
    ids = [m.id for m in spec.committee]
    for m in spec.committee:
        if not m.id or not m.arch:
            raise SpecError(f"committee member {m.id or m.arch!r}: both id and arch are required")
        if not all(c.isalnum() or c in "._-" for c in m.id) or m.id.startswith("."):
            raise SpecError(f"committee member id '{m.id}': use only letters, digits, '.', '_' and '-'")
        if m.id == "consensus":
            raise SpecError("committee member id 'consensus' is reserved for the vote's own row in the tables")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SpecError(f"committee member ids must be unique: {', '.join(dup)} repeated")
    if spec.explainer.name not in EXPLAINERS:
        raise SpecError(f"explainer.name: unknown explainer '{spec.explainer.name}'"
                        f"{_suggest(spec.explainer.name, EXPLAINERS)}")
    EXPLAINERS[spec.explainer.name].check_params(spec.explainer.params)
    r = spec.run
    for name, value, low in (("run.shard_size", r.shard_size, 1), ("run.image_size", r.image_size, 8),
                             ("run.map_size", r.map_size, 2), ("resources.actors_per_model",
                                                               spec.resources.actors_per_model, 1),
                             ("resources.batch_size", spec.resources.batch_size, 1)):
        if value < low:
            raise SpecError(f"{name} must be at least {low}, got {value}")
    if r.map_size > r.image_size:
        raise SpecError(f"run.map_size ({r.map_size}) cannot exceed run.image_size ({r.image_size})")
    if spec.resources.num_gpus < 0:
        raise SpecError("resources.num_gpus must be >= 0")
    if spec.resources.num_cpus is not None and spec.resources.num_cpus <= 0:
        raise SpecError("resources.num_cpus must be > 0")
    if spec.method.leave_one_out and len(spec.committee) < 2:
        raise SpecError("method.leave_one_out needs at least 2 committee members")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (what a stored unit was computed from)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def schema_text() -> str:
    """Human-readable reference of every section and key, generated from the dataclasses."""
    from ray_consensus.explainers import EXPLAINERS

    lines = []
    for section, cls in (("dataset", DatasetSpec), ("committee[]", MemberSpec), ("explainer", ExplainerSpec),
                         ("method", MethodSpec), ("run", RunSection), ("resources", ResourcesSpec),
                         ("storage", StorageSpec)):
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            extra = f" [{' | '.join(choices)}]" if choices else ""
            lines.append(f"  {f.name}: {default!r}{extra}\n      {f.metadata['help']}")
    lines.append("explainers:")
    for name, cls in EXPLAINERS.items():
        lines.append(f"  {name}: {cls.__doc__.strip().splitlines()[0]}  defaults: {cls.defaults}")
    return "\n".join(lines)
