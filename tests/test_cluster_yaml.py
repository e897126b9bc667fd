"""Deployment files: cluster.yaml, the job specs and schedules in jobs/, and docs/cluster.md.

cluster.yaml is checked with the JSON schema and the checks that ship in the installed ray
wheel (what `ray up` runs first), the job specs with the product's own spec parser, and the
commands in the docs against the CLI they call.
"""

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
SPECS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if p.name != "runtime_env.yaml")

# (vCPUs, GPUs) of every instance type cluster.yaml may use, from the AWS instance type pages.
INSTANCE_TYPES = {
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "g5.xlarge": (4, 1),
    "g5.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8),
}


def _node_types():
    return CLUSTER["available_node_types"]


def _workers():
    return {name: t for name, t in _node_types().items() if name != CLUSTER["head_node_type"]}


# ---------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_matches_the_schema_in_the_ray_wheel():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(CLUSTER, schema)


def test_cluster_yaml_passes_the_checks_ray_up_runs():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(CLUSTER)  # merges the AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_head_has_no_gpus_and_runs_no_tasks():
    head = _node_types()[CLUSTER["head_node_type"]]
    assert INSTANCE_TYPES[head["node_config"]["InstanceType"]][1] == 0
    assert head["resources"] == {"CPU": 0, "GPU": 0}


def test_every_worker_type_autoscales_from_zero_and_advertises_its_real_hardware():
    gpu_types = []
    for name, node in _workers().items():
        vcpus, gpus = INSTANCE_TYPES[node["node_config"]["InstanceType"]]
        assert node["min_workers"] == 0, name
        assert node["max_workers"] >= 1, name
        assert node["resources"].get("GPU", 0) == gpus, name
        assert 1 <= node["resources"]["CPU"] <= vcpus, name
        if gpus:
            gpu_types.append(name)
    assert len(gpu_types) >= 2


def test_workers_can_reach_s3_through_an_instance_profile():
    # Ray gives the head an instance profile but workers none; they read images and write maps.
    for name, node in _workers().items():
        assert node["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}, name


def test_images_are_the_gpu_build_of_the_installed_ray():
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py3\d+)-gpu", CLUSTER["docker"]["image"])
    assert match, CLUSTER["docker"]["image"]
    assert match.group(1) == ray.__version__
    assert CLUSTER["docker"]["head_image"] == f"rayproject/ray:{match.group(1)}-{match.group(2)}-cpu"


def test_setup_installs_the_wheel_that_file_mounts_upload():
    [(remote, local)] = CLUSTER["file_mounts"].items()
    assert local == "./dist"
    [command] = CLUSTER["setup_commands"]
    assert f"{remote}/ray_consensus-*.whl" in command and command.startswith("pip install")


# ---------------------------------------------------------------- jobs/

@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_job_specs_parse_with_the_run_schema(path):
    from ray_consensus.config import load_spec_file, parse_spec

    spec = parse_spec(load_spec_file(path))
    assert spec.storage.access_key_id is None and spec.storage.secret_access_key is None


def test_imagenet_committee_is_20_plus_pretrained_imagenet_models_of_many_families():
    import timm
    from ray_consensus.config import load_spec_file, parse_spec

    spec = parse_spec(load_spec_file(REPO / "jobs" / "imagenet-val.yaml"))
    pretrained = set(timm.list_models(pretrained=True))
    assert len(spec.committee) >= 20
    for member in spec.committee:
        assert member.weights == "pretrained"
        assert member.arch in pretrained, member.arch
        assert timm.models.get_pretrained_cfg(member.arch).num_classes == 1000, member.arch
    families = {re.match(r"[a-z]+", m.arch).group() for m in spec.committee}
    assert len(families) >= 15, sorted(families)
    assert spec.dataset.num_classes == 1000


def test_demo_spec_rebuilds_the_demo_committee_as_trained():
    import timm
    from ray_consensus.committee import create_member_model, member_data_config
    from ray_consensus.config import MemberSpec, load_spec_file, parse_spec
    from ray_consensus.demo import DEMO_COMMITTEE

    spec = parse_spec(load_spec_file(REPO / "jobs" / "demo-local-s3.yaml"))
    assert [(m.id, m.arch) for m in spec.committee] == [(r.id, r.arch) for r in DEMO_COMMITTEE]
    for member, recipe in zip(spec.committee, DEMO_COMMITTEE):
        assert member.weights == f"s3://ray-consensus-demo/inputs/models/{recipe.id}.safetensors"
        built = create_member_model(MemberSpec(member.id, member.arch, "random", member.kwargs), 10)
        trained = timm.create_model(recipe.arch, num_classes=10, **recipe.kwargs)
        # Same tensors (so the checkpoint loads) and the input size the member was trained at.
        assert {k: v.shape for k, v in built.state_dict().items()} == \
               {k: v.shape for k, v in trained.state_dict().items()}, member.id
        assert member_data_config(built).input_size == (recipe.input_size, recipe.input_size), member.id


def test_voc_spec_counts_only_object_pixels_as_foreground():
    from ray_consensus.config import load_spec_file, parse_spec

    spec = parse_spec(load_spec_file(REPO / "jobs" / "voc-masks.yaml"))
    assert spec.dataset.mask_foreground == "nonzero_not_255"
    assert spec.dataset.num_classes == 20


def test_runtime_env_is_accepted_by_ray_and_holds_no_credentials():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**data)  # raises on malformed fields (e.g. non-string env values)
    assert "working_dir" not in data  # given by --working-dir
    assert {".git/", "dist/"} <= set(data["excludes"])
    assert not [k for k in data["env_vars"] if re.search(r"KEY|SECRET|TOKEN|PASSWORD", k)]


def test_stage_demo_copies_a_demo_that_a_spec_reads_back_from_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    from ray_consensus.committee import create_member_model
    from ray_consensus.config import DatasetSpec, MemberSpec
    from ray_consensus.data import read_manifest
    from ray_consensus.demo import DatasetSpec as DemoData, MemberRecipe

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    module_spec = importlib.util.spec_from_file_location("stage_demo_s3", REPO / "jobs" / "stage_demo_s3.py")
    stage = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(stage)
    tiny = MemberRecipe("tiny", "resnet10t", 32, steps=1, batch_size=4)

    dest = f"{s3_bucket}/inputs"
    written = stage.stage_demo(dest, cache_dir=tmp_path, progress=False, recipes=(tiny,),
                               spec=DemoData(n_classes=2, per_class=2, image_size=32, train_per_class=2))

    assert len(written) == 2 * 2 * 2 + 1  # images and masks of 2 classes x 2, one checkpoint
    manifest = read_manifest(DatasetSpec(path=f"{dest}/images", masks=f"{dest}/masks"))
    assert manifest.num_classes == 2 and len(manifest.table) == 4
    assert sorted(manifest.table["label"]) == [0, 0, 1, 1]
    assert all(u.startswith(f"{dest}/masks/") for u in manifest.table["mask_uri"])
    member = MemberSpec(id="tiny", arch="resnet10t", weights=f"{dest}/models/tiny.safetensors",
                        kwargs={"pretrained_cfg_overlay": {"input_size": [3, 32, 32], "crop_pct": 1.0}})
    model = create_member_model(member, 2)
    assert model.num_classes == 2


# ---------------------------------------------------------------- schedules and docs

SCHEDULES = [REPO / "jobs" / "schedule" / "crontab.example", REPO / "jobs" / "schedule" / "cronjob.yaml"]
DOCUMENTS = [REPO / "docs" / "cluster.md", REPO / "cluster.yaml", *SCHEDULES,
             *(REPO / "jobs").glob("*.yaml")]


def test_cronjob_submits_the_imagenet_job_and_forbids_overlap():
    cron = yaml.safe_load(SCHEDULES[1].read_text())
    assert cron["kind"] == "CronJob"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    [container] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert "ray job submit --address http://ray-head:8265" in command
    assert command.endswith("-- ray-consensus run jobs/imagenet-val.yaml")


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_files_named_in_docs_and_schedules_exist(path):
    named = set(re.findall(r"(?<![\w/.-])((?:jobs|docs)/[\w./-]+\.(?:yaml|py|md|example)|cluster\.yaml)",
                           path.read_text()))
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing


def _cli_invocations(path: Path):
    """(subcommand, options) of every `ray-consensus ...` command in `path`: in Markdown its
    code blocks and spans, elsewhere every line, comments included."""
    text = path.read_text()
    if path.suffix == ".md":
        text = "\n".join(re.findall(r"```\w*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text))
    for line in text.replace("\\\n", " ").splitlines():
        # A command starts a line, follows `ray job submit ... --`, or opens a code span.
        for match in re.finditer(r"(?:^|-- |`)ray-consensus (\w+)([^|&;>`\"]*)", line.lstrip("# ")):
            args = re.sub(r"\$\([^)]*\)", "", match.group(2)).split()  # drop $(date ...)
            yield match.group(1), [a.split("=")[0] for a in args if a.startswith("-")]


def test_ray_consensus_commands_in_docs_are_ones_the_cli_accepts():
    import typer.main
    from ray_consensus.cli import app

    commands = typer.main.get_command(app).commands
    seen = 0
    for path in DOCUMENTS:
        for sub, options in _cli_invocations(path):
            assert sub in commands, f"{path.name}: ray-consensus {sub}"
            known = {o for p in commands[sub].params for o in (*p.opts, *p.secondary_opts)}
            assert not set(options) - known, f"{path.name}: ray-consensus {sub} {options}"
            seen += 1
    assert seen >= 10
