"""Every private Ray and timm API the package uses, each behind one small function.

Ray and timm promise nothing about these names, so pyproject pins both below the first version not
checked here (the next minor Ray, the next timm release). Each hook's docstring names the private thing
and the versions it was checked on; tests/test_compat.py checks that on the installed versions every
hook works and takes no fallback. Where the private thing is missing (another version), the hook takes
a fallback that keeps the run correct and says so in one line of ours, once per process, naming what is
lost: nothing falls back silently.

Nothing here imports Ray or timm when the module is imported (each takes seconds); a hook imports what
it needs when it is called.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Callable

from ray_consensus import console
from ray_consensus.errors import first_line

RAY_CHECKED = "2.60.0"
TIMM_CHECKED = "1.0.31"

_taken: set[str] = set()  # the hooks whose fallback has been said in this process


def _fallback(hook: str, package: str, checked: str, line: str) -> None:
    """Say once per process that `hook` took its fallback, with the installed and the checked version."""
    if hook in _taken:
        return
    _taken.add(hook)
    try:
        installed = version(package)
    except PackageNotFoundError:
        installed = "?"
    console.say(f"{line} ({package} {installed}; checked on {checked})")


# ---------------------------------------------------------------- Ray


def route_forwarded_logs(wrap: Callable[[Callable[[dict], None]], Callable[[dict], None]]) -> None:
    """Put `wrap(printer)` in place of Ray's printer of the log batches it forwards to the driver.

    Private: `ray._private.ray_logging.global_worker_stdstream_dispatcher`, its `_lock` and its
    `handlers` list of (name, handler) pairs, where `ray.init(log_to_driver=True)` puts Ray's printer
    under the name "ray_print_logs". Checked on Ray 2.60.0.
    Fallback: Ray's own printer stays; its raylet's errors print as Ray writes them.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
                dispatcher.handlers = [(name, wrap(handler) if name == "ray_print_logs" else handler)
                                       for name, handler in dispatcher.handlers]
                return
    except (ImportError, AttributeError):
        pass
    _fallback("route_forwarded_logs", "ray", RAY_CHECKED,
              "Ray's forwarded logs keep Ray's own printer (no ray._private.ray_logging dispatcher with "
              "'ray_print_logs'): its raylet's errors print as Ray writes them")


def autoscaler_node_types() -> list[tuple[dict, int]]:
    """(resources, max count; -1 for no bound) of each node type the cluster's autoscaler may start;
    [] for a cluster without an autoscaler. Ray must be connected.

    Private: `ray._private.state.state.get_cluster_config()`, the autoscaler's `ClusterConfig` protobuf
    (None without an autoscaler) with its `node_group_configs`' `resources` and `max_count`.
    Checked on Ray 2.60.0.
    Fallback (the function missing, or the GCS not answering): [] with a line, as the schedule then
    counts the live nodes only.
    """
    from google.protobuf.message import DecodeError
    from ray.exceptions import RayError

    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is None:
            return []
        return [(dict(group.resources), int(group.max_count)) for group in config.node_group_configs]
    except (ImportError, AttributeError, RayError, DecodeError) as e:
        _fallback("autoscaler_node_types", "ray", RAY_CHECKED,
                  f"the autoscaler's node types are unknown (ray._private.state.get_cluster_config: "
                  f"{first_line(e)}): the schedule counts the cluster's live nodes only")
        return []


def quiet_issue_detectors(data_ctx) -> None:
    """Turn off Ray Data's issue detectors in `data_ctx` (a `ray.data.DataContext`): their memory hints
    misread the models' one-off load as a leak.

    Private: `DataContext.issue_detectors_config.detectors`, a list of detector classes from
    `ray.data._internal.issue_detection`. Checked on Ray 2.60.0.
    Fallback: the detectors stay on and may print hints of Ray Data's.
    """
    try:
        data_ctx.issue_detectors_config.detectors = []
    except AttributeError:
        _fallback("quiet_issue_detectors", "ray", RAY_CHECKED,
                  "Ray Data's issue detectors stay on (no DataContext.issue_detectors_config): "
                  "they may print memory hints")


# ---------------------------------------------------------------- timm


def timm_weights_source(cfg: dict) -> tuple[str, object]:
    """timm's own choice among the weight sources of a pretrained config (`PretrainedCfg.to_dict()`):
    (kind, location), kind "hf-hub" (location a repo id, or (repo id, file name) where the config names
    the file), "url", "file", "local-dir" or "state_dict"; ("", "") when the config has none.

    Private: `timm.models._builder._resolve_pretrained_source`. Checked on timm 1.0.31.
    Fallback: the config's own fields in timm 1.0.31's order (a `source` of hf-hub or local-dir, else a
    state_dict, a file, a hub id, a URL), without timm's old-cache and hub-installed checks.
    """
    try:
        from timm.models._builder import _resolve_pretrained_source
    except ImportError:
        pass
    else:
        return _resolve_pretrained_source(cfg)
    _fallback("timm_weights_source", "timm", TIMM_CHECKED,
              "timm has no models._builder._resolve_pretrained_source: a pretrained member's weights are "
              "looked for where its pretrained config's fields point")
    source, hub = cfg.get("source", ""), cfg.get("hf_hub_id")
    if source == "local-dir":
        return "local-dir", cfg.get("file")
    if source != "hf-hub":
        for kind in ("state_dict", "file"):
            if cfg.get(kind):
                return kind, cfg[kind]
        if not hub:
            return ("url", cfg["url"]) if cfg.get("url") else ("", "")
    if not hub:
        return "", ""
    return "hf-hub", ((hub, cfg["hf_hub_filename"]) if cfg.get("hf_hub_filename") else hub)


def timm_hub_files(filename: str | None) -> tuple[str, ...]:
    """The files of a hub repo timm tries, in order, for a config's `hf_hub_filename` (None: timm's
    default): its safetensors alternatives first, the file itself last.

    Private: `timm.models._hub.HF_WEIGHTS_NAME` (the default, pytorch_model.bin) and
    `_get_safe_alternatives`. Checked on timm 1.0.31.
    Fallback: pytorch_model.bin as the default, and before a `.bin` file the `.safetensors` of the same
    name (model.safetensors for pytorch_model.bin).
    """
    try:
        from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives
    except ImportError:
        pass
    else:
        filename = filename or HF_WEIGHTS_NAME
        return (*_get_safe_alternatives(filename), filename)
    _fallback("timm_hub_files", "timm", TIMM_CHECKED,
              "timm has no models._hub._get_safe_alternatives: a hub member's .bin weights are looked for "
              "as .safetensors first by name")
    filename = filename or "pytorch_model.bin"
    if filename == "pytorch_model.bin":
        return "model.safetensors", filename
    return (filename[:-4] + ".safetensors", filename) if filename.endswith(".bin") else (filename,)
