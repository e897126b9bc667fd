"""The private Ray and timm hooks (ray_consensus.compat): on the installed versions each works and takes
no fallback; where the private thing is missing, the fallback keeps the answer and says so, once."""

from __future__ import annotations

import types

import pytest

from ray_consensus import compat


@pytest.fixture
def taken(monkeypatch):
    """A process in which no fallback has been said yet: the set of hooks whose fallback is said."""
    fresh: set[str] = set()
    monkeypatch.setattr(compat, "_taken", fresh)
    return fresh


def our_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[ray-consensus]")]


# ---------------------------------------------------------------- timm

TIMM_CONFIGS = [
    {"hf_hub_id": "timm/resnet18.a1_in1k", "url": "https://example.org/r18.pth"},
    {"hf_hub_id": "timm/vit_x", "hf_hub_filename": "open_clip_pytorch_model.bin"},
    {"url": "https://example.org/r18.pth"},
    {"file": "/weights/r18.pth", "hf_hub_id": "timm/resnet18.a1_in1k"},
    {"state_dict": {"w": 1}, "file": "/weights/r18.pth"},
    {"source": "hf-hub", "hf_hub_id": "someone/r18", "file": "/weights/r18.pth"},
    {"source": "local-dir", "file": "/weights/r18"},
    {},
]
HUB_FILES = [None, "pytorch_model.bin", "weights.bin", "model.safetensors", "weights.npz"]


def test_timm_hooks_give_timms_answers_without_a_fallback(taken, capsys):
    from timm.models import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg("resnet18", "a1_in1k").to_dict()
    assert compat.timm_weights_source(cfg) == ("hf-hub", "timm/resnet18.a1_in1k")
    assert compat.timm_weights_source({"url": "https://example.org/r18.pth"}) == ("url", "https://example.org/r18.pth")
    assert compat.timm_hub_files(None) == ("model.safetensors", "pytorch_model.bin")
    assert compat.timm_hub_files("weights.bin") == ("weights.safetensors", "weights.bin")
    assert not taken and our_lines(capsys) == []


def test_without_timms_source_resolver_the_fallback_agrees_with_it_and_says_so_once(taken, capsys, monkeypatch):
    import timm.models._builder as builder

    expected = [compat.timm_weights_source(cfg) for cfg in TIMM_CONFIGS]
    monkeypatch.delattr(builder, "_resolve_pretrained_source")
    assert [compat.timm_weights_source(cfg) for cfg in TIMM_CONFIGS] == expected
    (line,) = our_lines(capsys)
    assert "_resolve_pretrained_source" in line and "checked on 1.0.31" in line


def test_without_timms_safetensors_alternatives_the_fallback_agrees_with_it_and_says_so_once(taken, capsys,
                                                                                            monkeypatch):
    import timm.models._hub as hub

    expected = [compat.timm_hub_files(name) for name in HUB_FILES]
    monkeypatch.delattr(hub, "_get_safe_alternatives")
    assert [compat.timm_hub_files(name) for name in HUB_FILES] == expected
    (line,) = our_lines(capsys)
    assert "_get_safe_alternatives" in line


# ---------------------------------------------------------------- Ray


def test_ray_data_issue_detectors_are_turned_off_without_a_fallback(taken, capsys):
    from ray.data import DataContext

    # A new context, with Ray Data's defaults: the process's own may have been quieted by an earlier
    # test's run, and stays as it is.
    ctx = DataContext()
    assert ctx.issue_detectors_config.detectors  # on by default: there is something to turn off
    compat.quiet_issue_detectors(ctx)
    assert ctx.issue_detectors_config.detectors == []
    assert not taken and our_lines(capsys) == []


def test_a_ray_data_without_issue_detectors_is_one_line(taken, capsys):
    ctx = types.SimpleNamespace()
    compat.quiet_issue_detectors(ctx)
    compat.quiet_issue_detectors(ctx)
    (line,) = our_lines(capsys)
    assert "issue detectors stay on" in line and "checked on 2.60.0" in line


def test_a_ray_without_the_log_dispatcher_keeps_its_printer_and_says_so_once(taken, capsys, monkeypatch):
    import ray._private.ray_logging as ray_logging

    monkeypatch.delattr(ray_logging, "global_worker_stdstream_dispatcher")
    compat.route_forwarded_logs(lambda handler: pytest.fail("nothing to wrap"))
    compat.route_forwarded_logs(lambda handler: pytest.fail("nothing to wrap"))
    (line,) = our_lines(capsys)
    assert "Ray's own printer" in line


def test_a_ray_without_the_cluster_config_counts_live_nodes_and_says_so_once(taken, capsys, monkeypatch):
    from ray._private.state import GlobalState

    monkeypatch.delattr(GlobalState, "get_cluster_config")
    assert compat.autoscaler_node_types() == []
    assert compat.autoscaler_node_types() == []
    (line,) = our_lines(capsys)
    assert "live nodes only" in line and "get_cluster_config" in line


def test_ray_hooks_work_on_a_running_ray_without_a_fallback(ray_local, taken, capsys, monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "handlers", list(dispatcher.handlers))  # put back as it was afterwards
    printer = dict(dispatcher.handlers)["ray_print_logs"]  # ray.init(log_to_driver=True) put it there
    compat.route_forwarded_logs(lambda handler: ("wrapped", handler))
    assert dict(dispatcher.handlers)["ray_print_logs"] == ("wrapped", printer)
    assert compat.autoscaler_node_types() == []  # a local Ray has no autoscaler
    assert not taken and our_lines(capsys) == []
