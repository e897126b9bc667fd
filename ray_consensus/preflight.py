"""Everything that can fail before Ray starts: timm names, weights, the data set, the run root.

A bad spec fails here with one `SpecError` (or `StorageError`) line, before any cluster work
and without writing to the run root.
"""

from __future__ import annotations

from ray_consensus.config import RunSpec
from ray_consensus.data import Manifest, read_manifest
from ray_consensus.errors import SpecError
from ray_consensus.storage import Store, open_store


def preflight(spec: RunSpec, check_weights: bool = True) -> tuple[Store, Manifest]:
    """The run root (checked writable) and the data set's manifest. With `check_weights`, every
    checkpoint is loaded and checked against its architecture and the explainer (hub weights are
    left to the slots: downloading them on the driver would double the traffic)."""
    from ray_consensus.committee import check_arch, create_member_model
    from ray_consensus.explainers import EXPLAINERS, create_explainer

    for member in spec.committee:
        check_arch(member.arch)
    store = open_store(spec.run.output, spec.storage)
    store.check_writable()
    manifest = read_manifest(spec.dataset, spec.storage)
    checks_models = EXPLAINERS[spec.explainer.name].checks_models
    # Random weights have nothing to check unless the explainer checks the model itself.
    checked = [m for m in spec.committee if m.weights != "pretrained" and (m.weights != "random" or checks_models)]
    if check_weights and checked:
        explainer = create_explainer(spec.explainer.params)
        for member in checked:
            model = create_member_model(member, manifest.num_classes, spec.storage)
            try:
                explainer.check_model(model)
            except SpecError as e:
                raise SpecError(f"model {member.id}: {e}") from None
    return store, manifest
