"""The command line: one clear line and a non-zero exit for bad specs, before any Ray work."""

from __future__ import annotations

import subprocess
import sys

import pytest
from imagesets import make_image_folder

from ray_consensus.errors import SpecError
from ray_consensus.spec.config import load_spec_file, parse_member, parse_spec

# Imports the CLI and runs it; afterwards asserts Ray was never imported (no cluster work started): the
# exit code is then 1 and stderr ends "AssertionError: ray was imported".
RUNNER = ("import sys; from ray_consensus.cli import app\n"
          "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
          "    assert 'ray' not in sys.modules, 'ray was imported'\n    raise\n")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`ray-consensus *args` in a fresh interpreter (under RUNNER), with `env` or this process's environment."""
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ds"), n_classes=2, per_class=3)


def test_validate_rejects_misspelled_timm_name_before_ray(dataset, tmp_path):
    proc = cli("validate", "--dataset", str(dataset / "images"), "--model", "a=resnet1O@random",
               "--model", "b=mobilenetv3_small_050@random", "--output", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown timm architecture 'resnet1O'" in lines[0] and "did you mean 'resnet18'" in lines[0]
    assert "ray was imported" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_validate_prints_the_plan(dataset, tmp_path):
    proc = cli("validate", "--dataset", str(dataset / "images"), "--model", "a=resnet10t@random",
               "--output", str(tmp_path / "run"), "--set", "run.shard_size=4",
               "--set", "explainer.params.n_samples=10")
    assert proc.returncode == 0, proc.stderr
    assert "6 images (2 classes" in proc.stdout and "2 shards" in proc.stdout and "1 models" in proc.stdout
    # 6 images x 1 model x (10 noisy + 1 prediction) forward passes, 10 backward passes each
    assert "66 forward and 60 backward passes" in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,message", [
    ("dataset: {path: x}\ncomitee: []\n", "unknown key 'comitee' (did you mean 'committee'?)"),
    ("dataset: [unclosed\n", "invalid YAML"),
    ("run: {shard_size: many}\n", "run.shard_size: expected an integer"),
    ("method: {vote: mode}\n", "method.vote: unknown value 'mode'"),
])
def test_spec_errors_are_one_line(tmp_path, text, message):
    f = tmp_path / "spec.yaml"
    f.write_text(text)
    with pytest.raises(SpecError, match=".*") as err:
        parse_spec(load_spec_file(f))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_explainer_and_params(dataset, tmp_path):
    base = {"dataset": {"path": str(dataset / "images")}, "run": {"output": str(tmp_path)},
            "committee": [parse_member("a=resnet10t@random")]}
    with pytest.raises(SpecError, match="unknown explainer 'smoothgard'.*did you mean 'smoothgrad'"):
        parse_spec({**base, "explainer": {"name": "smoothgard"}})
    with pytest.raises(SpecError, match="unknown parameter 'samples'"):
        parse_spec({**base, "explainer": {"name": "smoothgrad", "params": {"samples": 3}}})
    with pytest.raises(SpecError, match="must be unique"):
        parse_spec({**base, "committee": [parse_member("a=resnet10t"), parse_member("a=resnet18")]})


def test_member_flag_forms():
    assert parse_member("resnet50") == {"id": "resnet50", "arch": "resnet50", "weights": "pretrained"}
    assert parse_member("vit_small_patch16_224.augreg_in21k") == {
        "id": "vit_small_patch16_224", "arch": "vit_small_patch16_224.augreg_in21k", "weights": "pretrained"}
    assert parse_member("r=resnet18@/ckpt/r.safetensors") == {"id": "r", "arch": "resnet18",
                                                             "weights": "/ckpt/r.safetensors"}


def test_bad_checkpoint_and_unreadable_dataset_fail_before_ray(dataset, tmp_path):
    import torch

    ckpt = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, ckpt)
    proc = cli("validate", "--dataset", str(dataset / "images"), "--model", f"a=resnet10t@{ckpt}",
               "--output", str(tmp_path / "run"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not fit 'resnet10t'" in proc.stderr
    proc = cli("validate", "--dataset", str(tmp_path / "nowhere"), "--model", "a=resnet10t@random",
               "--output", str(tmp_path / "run"))
    assert proc.returncode == 2 and "data set not found" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_schema_lists_every_section():
    proc = cli("validate", "--schema")
    assert proc.returncode == 0
    for section in ("dataset:", "committee[]:", "explainer:", "method:", "run:", "resources:", "storage:"):
        assert section in proc.stdout
    assert "smoothgrad" in proc.stdout


@pytest.mark.parametrize("explainer,setting,message", [
    ("smoothgrad", "n_samples=many", "explainer.params.n_samples must be an integer >= 1, got 'many'"),
    ("integrated_gradients", "n_steps=-1", "explainer.params.n_steps must be an integer >= 1, got -1"),
    ("lime", "n_segments=abc", "explainer.params.n_segments must be an integer >= 1, got 'abc'"),
    ("lime", "kernel_wdth=0.5",
     "explainer.params: unknown parameter 'kernel_wdth' for lime (did you mean 'kernel_width'?)"),
])
def test_bad_explainer_parameters_are_one_line_before_ray(dataset, tmp_path, explainer, setting, message):
    proc = cli("validate", "--dataset", str(dataset / "images"), "--model", "a=resnet10t@random",
               "--output", str(tmp_path / "run"), "--explainer", explainer, "--set", f"explainer.params.{setting}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert "ray was imported" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_installed_command_runs_main_as_python_m_does():
    """Both run `cli.main` (Ctrl-C: exit 130), and both answer --help."""
    from importlib.metadata import entry_points
    from pathlib import Path

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ray-consensus"]
    assert script.value == "ray_consensus.cli:main"
    for command in ([str(Path(sys.executable).with_name("ray-consensus"))], [sys.executable, "-m", "ray_consensus"]):
        proc = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "export-masks" in proc.stdout, proc.stderr
