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

from ray_consensus.spec.config import load_spec_file, parse_spec

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
    from ray_consensus.spec.config import load_spec_file, parse_spec

    spec = parse_spec(load_spec_file(path))
    assert spec.storage.access_key_id is None and spec.storage.secret_access_key is None


@pytest.mark.parametrize("name,members,families", [("imagenet-val.yaml", 20, 15), ("paper-committee.yaml", 80, 40)])
def test_imagenet_committees_are_pretrained_imagenet_models_of_many_families(name, members, families):
    """Every arch is a timm name with the tag of weights the installed timm knows, 1000 classes."""
    import timm

    spec = parse_spec(load_spec_file(REPO / "jobs" / name))
    pretrained = set(timm.list_models(pretrained=True))
    assert len(spec.committee) >= members
    for member in spec.committee:
        assert member.weights == "pretrained"
        assert member.arch in pretrained, member.arch
        assert timm.models.get_pretrained_cfg(member.arch).num_classes == 1000, member.arch
    found = {re.match(r"[a-z]+", m.arch).group() for m in spec.committee}
    assert len(found) >= families, sorted(found)
    assert spec.dataset.num_classes == 1000


def test_paper_committee_validates_without_ray_and_shows_its_schedule(tmp_path):
    """`ray-consensus validate jobs/paper-committee.yaml`, a local manifest in place of the bucket's, the
    members' weights in a local hub cache (empty files: validate looks for them, reads none)."""
    import os

    import pandas as pd
    from hubcache import placeholder_weights
    from test_cli import cli

    pd.DataFrame({"uri": [f"/data/val/{i:05d}.JPEG" for i in range(600)], "label": [i % 1000 for i in range(600)]}
                 ).to_parquet(tmp_path / "manifest.parquet")
    placeholder_weights(parse_spec(load_spec_file(REPO / "jobs" / "paper-committee.yaml")).committee,
                        tmp_path / "hf", tmp_path / "torch")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"))
    proc = cli("validate", str(REPO / "jobs" / "paper-committee.yaml"), "--dataset", str(tmp_path / "manifest.parquet"),
               "--output", str(tmp_path / "run"), env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr  # and Ray was never imported (test_cli.RUNNER)
    assert "600 images (1000 classes" in proc.stdout and "3 shards" in proc.stdout
    n = len(parse_spec(load_spec_file(REPO / "jobs" / "paper-committee.yaml")).committee)
    assert f"schedule: {n} members on 8 slot(s) of 1 GPU + 1 CPU each" in proc.stdout
    assert f"8 at once, {-(-n // 8)} round(s) per window" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_demo_spec_rebuilds_the_demo_committee_as_trained():
    import timm

    from ray_consensus.demo.committee import DEMO_COMMITTEE
    from ray_consensus.models.committee import create_member_model, member_data_config
    from ray_consensus.spec.config import MemberSpec, load_spec_file, parse_spec

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
    from ray_consensus.spec.config import load_spec_file, parse_spec

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
    from ray_consensus.dataset.manifest import read_manifest
    from ray_consensus.demo.committee import MemberRecipe
    from ray_consensus.demo.images import DatasetSpec as DemoData
    from ray_consensus.models.committee import create_member_model
    from ray_consensus.spec.config import DatasetSpec, MemberSpec

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

SCHEDULES = [REPO / "jobs" / "schedule" / "crontab.example", REPO / "jobs" / "schedule" / "cronjob.yaml",
             REPO / "jobs" / "schedule" / "rayjob.yaml", REPO / "jobs" / "schedule" / "raycronjob.yaml"]
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


# ---------------------------------------------------------------- KubeRay RayJob and RayCronJob

# The fields of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/*_types.go, as documented in the
# RayJob and RayCronJob quickstarts): name -> type; required ones marked with "!".
RAYJOB_SPEC = {"activeDeadlineSeconds": int, "backoffLimit": int, "rayClusterSpec": dict, "submitterPodTemplate": dict,
               "metadata": dict, "clusterSelector": dict, "submitterConfig": dict, "managedBy": str,
               "deletionStrategy": dict, "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "submissionMode": str,
               "entrypointResources": str, "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float),
               "ttlSecondsAfterFinished": int, "preRunningDeadlineSeconds": int, "shutdownAfterJobFinishes": bool,
               "suspend": bool}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
SUBMITTER_CONFIG = {"backoffLimit": int}
RAYCLUSTER_SPEC = {"upgradeStrategy": dict, "authOptions": dict, "suspend": bool, "managedBy": str,
                   "autoscalerOptions": dict, "headServiceAnnotations": dict, "enableInTreeAutoscaling": bool,
                   "gcsFaultToleranceOptions": dict, "historyServerOptions": dict, "networkPolicy": dict,
                   "tlsOptions": dict, "headGroupSpec!": dict, "rayVersion": str, "workerGroupSpecs": list}
HEAD_GROUP = {"template!": dict, "headService": dict, "enableIngress": bool, "ingressOptions": dict, "resources": dict,
              "labels": dict, "rayStartParams!": dict, "serviceType": str}
WORKER_GROUP = {"suspend": bool, "groupName!": str, "replicas": int, "minReplicas!": int, "maxReplicas!": int,
                "idleTimeoutSeconds": int, "priority": int, "resources": dict, "labels": dict,
                "rayStartParams!": dict, "template!": dict, "scaleStrategy": dict, "numOfHosts": int}
RAYCRONJOB_SPEC = {"jobTemplate!": dict, "schedule!": str, "timeZone": str, "suspend": bool}


def _check_fields(obj: dict, fields: dict, where: str) -> None:
    names = {k.rstrip("!"): v for k, v in fields.items()}
    assert not set(obj) - set(names), f"{where}: unknown fields {sorted(set(obj) - set(names))}"
    for key, typ in fields.items():
        if key.endswith("!"):
            assert key[:-1] in obj, f"{where}: {key[:-1]} is required"
    for key, value in obj.items():
        assert isinstance(value, names[key]) and not (names[key] is int and isinstance(value, bool)), \
            f"{where}.{key}: {type(value).__name__}"


def _check_pod_template(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where


def _check_rayjob_spec(spec: dict, where: str) -> None:
    _check_fields(spec, RAYJOB_SPEC, where)
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    _check_fields(spec.get("submitterConfig", {}), SUBMITTER_CONFIG, f"{where}.submitterConfig")
    cluster = spec["rayClusterSpec"]
    _check_fields(cluster, RAYCLUSTER_SPEC, f"{where}.rayClusterSpec")
    _check_fields(cluster["headGroupSpec"], HEAD_GROUP, f"{where}.headGroupSpec")
    _check_pod_template(cluster["headGroupSpec"]["template"], f"{where}.headGroupSpec")
    for group in cluster.get("workerGroupSpecs", []):
        _check_fields(group, WORKER_GROUP, f"{where}.workerGroupSpecs")
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        _check_pod_template(group["template"], f"{where}.workerGroupSpecs")
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in
                                                                   cluster.get("workerGroupSpecs", [])]:
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams is map[string]string"
    assert cluster["rayVersion"] == ray.__version__


def test_rayjob_starts_an_ephemeral_cluster_that_runs_the_job_and_goes_away():
    job = yaml.safe_load((REPO / "jobs" / "schedule" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    _check_rayjob_spec(spec, "RayJob.spec")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600  # ends before the next nightly run starts
    assert spec["backoffLimit"] >= 1  # a failed run is retried on a new cluster, and resumes
    # The entrypoint is the product's own command on a spec the image carries (its Dockerfile copies jobs/).
    command, path = spec["entrypoint"].rsplit(" ", 1)
    assert command == "ray-consensus run" and path.startswith("/home/ray/jobs/")
    assert "COPY jobs/ /home/ray/jobs/" in (REPO / "jobs" / "schedule" / "Dockerfile").read_text()
    parse_spec(load_spec_file(REPO / "jobs" / path.removeprefix("/home/ray/jobs/")))
    assert "secret" not in (REPO / "jobs" / "schedule" / "rayjob.yaml").read_text().lower().replace(
        "no secrets", "")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= {"env_vars", "working_dir", "pip", "py_modules", "excludes"}


def test_raycronjob_schedules_exactly_the_rayjob():
    cron = yaml.safe_load((REPO / "jobs" / "schedule" / "raycronjob.yaml").read_text())
    job = yaml.safe_load((REPO / "jobs" / "schedule" / "rayjob.yaml").read_text())
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    _check_fields(cron["spec"], RAYCRONJOB_SPEC, "RayCronJob.spec")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["timeZone"] == "Etc/UTC"
    assert cron["spec"]["jobTemplate"] == job["spec"]  # one run, one definition
