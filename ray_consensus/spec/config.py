"""The run spec: a YAML file (or flags) resolved into small typed objects, checked once.

The schema documents itself: every field below carries its help text (and its choices or
bounds), which `ray-consensus validate --schema` prints. Unknown keys and bad values raise
`SpecError` with one line that says what is wrong (and, for typos, what was meant). The
explainer's parameters are typed too (`explainer_params`): `spec.explainer.params` is the
parsed object, not a mapping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ray_consensus.errors import SpecError
from ray_consensus.spec.explainer_params import PARAMS, ExplainerParams, parse_params, schema_lines
from ray_consensus.spec.fields import build, describe, spec_field

_f = spec_field


@dataclass
class DatasetSpec:
    path: str = _f("", "image folder (every sub-folder a class, empty ones too) or manifest table (.csv/.parquet: "
                   "uri, label, optional mask_uri, image_id, version); local path, file:///path or s3:// URI")
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
    batch_size: int | None = _f(None, "images per forward batch for this member (default: resources.batch_size)",
                                low=1)


@dataclass
class ExplainerSpec:
    """The explainer and its typed parameters. `params` may be given as a mapping (YAML, flags): it is
    parsed into the explainer's parameter class when the spec is built, so it is always typed after."""

    name: str = _f("smoothgrad", f"attribution method: {' | '.join(PARAMS)}")
    params: ExplainerParams | dict = _f({}, "method parameters, e.g. {n_samples: 50, noise_level: 0.1} for "
                                            "smoothgrad (each explainer's are listed below)")

    def __post_init__(self):
        if isinstance(self.params, dict):
            self.params = parse_params(self.name, self.params)
        elif self.params.name != self.name:
            raise SpecError(f"explainer.params are {self.params.name}'s, explainer.name is {self.name}")


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
    bootstrap: int = _f(1000, "bootstrap resamples for the correlations' intervals, over images (blocks of them) "
                              "and over members", low=0)
    permutations: int = _f(10000, "random pairings for the correlations' permutation p-value (exact when all "
                                  "pairings of the committee are fewer)", low=1)
    robustness_sizes: list[int] = _f([], "sub-committee sizes for the robustness table, each from 2 to the "
                                         "committee's size (default: 3..K-1 in steps)")
    robustness_trials: int = _f(20, "random sub-committees drawn per size", low=0)
    seed: int = _f(0, "seed for bootstrap, sub-committees and stochastic explainers", low=0)


@dataclass
class RunSection:
    output: str = _f("", "run root: a local folder or s3://bucket/prefix")
    shard_size: int = _f(256, "images per shard (the unit of work, retry and resume); fixed for a run root",
                         low=1)
    image_size: int = _f(224, "side of the square crop every member sees (shorter side resized, then centre crop)",
                         low=8)
    map_size: int = _f(56, "side of the common attribution grid all maps are resampled to", low=2)
    gallery: int = _f(8, "sample images shown in the report", low=0)
    map_dtype: str = _f("float32", "storage type of attribution maps", ("float32", "float16"))


@dataclass
class ResourcesSpec:
    actors_per_model: int = _f(1, "slots that share one member's shards of a window (each loads the member); "
                                  "raise it to use more GPUs than there are members", low=1)
    num_gpus: float = _f(0.0, "GPUs per slot, the actor that holds one member at a time (0: CPU slots; "
                              "fractions share a GPU)", low=0)
    num_cpus: float | None = _f(None, "CPUs per slot (default: 1, or less where the cluster's CPUs must be "
                                      "shared out among the slots and the decode tasks)", low=0, open_low=True)
    max_gpus: float | None = _f(None, "GPUs the cluster can grow to (default: what it has, or what its "
                                      "autoscaler's node types allow); sets the number of GPU slots", low=0)
    max_cpus: float | None = _f(None, "CPUs the cluster can grow to (default: what it has, or what its "
                                      "autoscaler's node types allow)", low=0, open_low=True)
    window_shards: int | None = _f(None, "shards decoded and held in the object store at once while the slots "
                                         "take members one after another (default: what fits a fifth of it)",
                                   low=1)
    slot_wait_s: float = _f(1200.0, "how long to wait for the first slot to be placed before failing (an "
                                    "autoscaler may take minutes to add a node)", low=0, open_low=True)
    batch_size: int = _f(16, "images per forward batch (per member override: committee[].batch_size)", low=1)
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

def parse_spec(data: dict | None) -> RunSpec:
    """Build a RunSpec from plain data (a parsed YAML document) and check it."""
    spec = build(RunSpec, data or {}, "")
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
    """Checks across fields that need no I/O (each field's own type, choices and bounds are checked
    as it is parsed; the rest is `validate`)."""
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
    if spec.run.map_size > spec.run.image_size:
        raise SpecError(f"run.map_size ({spec.run.map_size}) cannot exceed run.image_size ({spec.run.image_size})")
    if spec.method.leave_one_out and len(spec.committee) < 2:
        raise SpecError("method.leave_one_out needs at least 2 committee members")
    outside = [k for k in spec.method.robustness_sizes if not 2 <= k <= len(spec.committee)]
    if outside:
        raise SpecError(f"method.robustness_sizes: each size must be from 2 to {len(spec.committee)} (the "
                        f"committee's size), got {', '.join(map(str, outside))}")


SECTIONS = (("dataset", DatasetSpec), ("committee[]", MemberSpec), ("explainer", ExplainerSpec),
            ("method", MethodSpec), ("run", RunSection), ("resources", ResourcesSpec), ("storage", StorageSpec))


def schema_text() -> str:
    """Human-readable reference of every section and key, generated from the dataclasses."""
    lines = []
    for section, cls in SECTIONS:
        lines.append(f"{section}:")
        lines += describe(cls)
    return "\n".join(lines + schema_lines())
