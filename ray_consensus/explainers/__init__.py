"""Explainers: one small interface (`base`), each method a short class registered by name.

Importing the package registers every explainer (`EXPLAINERS`, name -> class); the actors build
theirs with `create_explainer(spec.explainer.params)`. Their parameters are typed and checked
without torch in `ray_consensus.spec.explainer_params`.
"""

from ray_consensus.explainers import gradcam, gradients, lime  # noqa: F401  (each registers its explainers)
from ray_consensus.explainers.base import EXPLAINERS, Explainer, ScoreModel, create_explainer

__all__ = ["EXPLAINERS", "Explainer", "ScoreModel", "create_explainer"]
