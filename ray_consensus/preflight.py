"""Everything that can fail before Ray starts: timm names, weights, the data set, the run root.

A bad spec fails here with one `SpecError` (or `StorageError`) line, before any cluster work
and without writing to the run root.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from ray_consensus.config import RunSpec
from ray_consensus.data import Manifest, read_manifest
from ray_consensus.errors import SpecError
from ray_consensus.model_names import check_arch
from ray_consensus.storage import Store, open_store
from ray_consensus.units import completed_later


class Checked(NamedTuple):
    store: Store
    manifest: Manifest
    listing: Optional[Callable[[], dict[str, str]]]  # the run root's complete units, for `make_plan`


def preflight(spec: RunSpec, check_weights: bool = True, list_units: bool = True) -> Checked:
    """The run root (checked writable), the data set's manifest and, with `list_units`, the listing of
    the run root's complete units, started before the manifest is read so that the two overlap. With
    `check_weights`, every checkpoint is loaded and checked against its architecture and the explainer
    (hub weights are left to the slots: downloading them on the driver would double the traffic).
    Names are checked without importing timm (`model_names`); torch is imported only to load
    checkpoints."""
    for member in spec.committee:
        check_arch(member.arch)
    store = open_store(spec.run.output, spec.storage)
    store.check_writable()
    listing = completed_later(store) if list_units else None
    manifest = read_manifest(spec.dataset, spec.storage)
    # Random weights have nothing to check unless the explainer checks the model itself.
    checks_models = spec.explainer.params.checks_models
    checked = [m for m in spec.committee if m.weights != "pretrained" and (m.weights != "random" or checks_models)]
    if check_weights and checked:
        from ray_consensus.committee import create_member_model
        from ray_consensus.explainers import create_explainer

        explainer = create_explainer(spec.explainer.params)
        for member in checked:
            model = create_member_model(member, manifest.num_classes, spec.storage)
            try:
                explainer.check_model(model)
            except SpecError as e:
                raise SpecError(f"model {member.id}: {e}") from None
    return Checked(store, manifest, listing)
