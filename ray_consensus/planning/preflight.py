"""Everything that can fail before Ray starts: timm names, weights, the data set, the run root.

A bad spec fails here with one `SpecError` (or `StorageError`) line, before any cluster work
and without writing to the run root.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from ray_consensus.dataset.manifest import Manifest, read_manifest
from ray_consensus.errors import SpecError
from ray_consensus.models.names import check_arch
from ray_consensus.models.pretrained import check_pretrained
from ray_consensus.runroot.units import completed_later
from ray_consensus.spec.config import RunSpec
from ray_consensus.storage.store import Store, open_store


class Checked(NamedTuple):
    store: Store
    manifest: Manifest
    listing: Optional[Callable[[], dict[str, str]]]  # the run root's complete units, for `make_plan`


def preflight(spec: RunSpec, check_weights: bool = True, list_units: bool = True) -> Checked:
    """The run root (checked writable), the data set's manifest and, with `list_units`, the listing of
    the run root's complete units, started before the manifest is read so that the two overlap. With
    `check_weights`, every checkpoint is loaded and checked against its architecture and the explainer,
    and every pretrained member's weights are found in the local Hugging Face cache or on the hub
    (`pretrained.check_pretrained`: nothing is downloaded on the driver, the slots do that).
    Names are checked without importing timm (`model_names`); timm is imported only for pretrained
    members and checkpoints."""
    for member in spec.committee:
        check_arch(member.arch)
    store = open_store(spec.run.output, spec.storage)
    store.check_writable()
    listing = completed_later(store) if list_units else None
    manifest = read_manifest(spec.dataset, spec.storage)
    check_classes(store, manifest)
    # Random weights have nothing to check unless the explainer checks the model itself.
    checks_models = spec.explainer.params.checks_models
    checked = [m for m in spec.committee if m.weights != "pretrained" and (m.weights != "random" or checks_models)]
    if check_weights:
        check_pretrained(spec.committee, manifest.num_classes)
    if check_weights and checked:
        from ray_consensus.explainers import create_explainer
        from ray_consensus.models.committee import create_member_model

        explainer = create_explainer(spec.explainer.params)
        for member in checked:
            model = create_member_model(member, manifest.num_classes, spec.storage)
            try:
                explainer.check_model(model)
            except SpecError as e:
                raise SpecError(f"model {member.id}: {e}") from None
    return Checked(store, manifest, listing)


def check_classes(store: Store, manifest: Manifest) -> None:
    """Refuse a data set whose classes differ from those the run root's results were computed with (its
    run.json): a class folder added, removed or emptied elsewhere would shift every later label."""
    from ray_consensus.runroot.record import RUN_FILE, RunRecord

    if not store.exists(RUN_FILE):
        return
    run = RunRecord.load(store)
    names, count = run.class_names, run.plan.classes
    if names and names != manifest.class_names:
        added = [c for c in manifest.class_names if c not in names]
        removed = [c for c in names if c not in manifest.class_names]
        change = "; ".join(f"{what} {', '.join(cs[:5])}{' …' if len(cs) > 5 else ''}"
                           for what, cs in (("added", added), ("gone", removed)) if cs) or "another order"
        raise SpecError(f"the data set's class folders differ from those of the run root {store.root} "
                        f"({change}): the class indices would change; use a new run.output")
    if count is not None and count != manifest.num_classes:
        raise SpecError(f"the data set has {manifest.num_classes} classes, the run root {store.root} was computed "
                        f"with {count}: the class indices would change; use a new run.output")
