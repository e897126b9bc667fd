"""Cross-model consensus of explanations for image classifiers, at dataset scale, on Ray.

    import ray_consensus as rc

    record = rc.run("spec.yaml")          # or a dict, or a RunSpec
    summary = rc.validate("spec.yaml")    # the plan and schedule, without Ray
    r = rc.open_run("runs/demo")          # the stored tables as pandas, an image's maps as arrays

Importing the package is cheap: torch, timm and Ray are imported by the functions that use them
(`api`).
"""

from ray_consensus.api import RunResults, load_spec, open_run, run, validate

__all__ = ["RunResults", "load_spec", "open_run", "run", "validate"]
