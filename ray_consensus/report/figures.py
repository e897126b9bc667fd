"""The report's figures: the charts (consensus score against accuracy, alignment per model, robustness to
committee size) and the gallery's rows of image, mask and maps. Each function returns the HTML of one
<figure> with its caption, or a note where there is nothing to draw; `render.py` puts them in sections.

Charts are drawn by matplotlib as plain text (no mathtext, no TeX): ids like "a$b$" stay literal.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ray_consensus.report.markup import CONSENSUS_ID, data_uri, figure, format_value, note

MAP_CMAP = "viridis"  # perceptually uniform, readable in grey and by colour-blind readers
METHOD_NAMES = {"spearman": "Spearman ρ", "pearson": "Pearson r", "kendall": "Kendall τ"}
# Charts are saved by Figure.savefig to PNG (the Agg renderer; pyplot is never imported),
# at 2x and shown at 100 px per inch, so they stay sharp on hi-dpi screens.
_DPI = 200
_PLAIN_TEXT = {"parse_math": False, "usetex": False}  # ids like "a$b$" stay literal


@dataclass
class GalleryItem:
    """One image of the gallery with its maps.

    image: (H, W, 3) uint8, the image on the run's shared image grid.
    mask: (h, w) bool/uint8 ground-truth mask on the map grid, or None.
    consensus: (h, w) float, the consensus map.
    model_maps: model_id -> (h, w) float normalised map.
    label: the class explained.
    scores: model_id -> consensus score of that model on this image.
    note: a line shown beside the label (e.g. why the image is among the most disputed).
    """

    image_id: str
    image: np.ndarray
    mask: np.ndarray | None
    consensus: np.ndarray
    model_maps: dict[str, np.ndarray]
    label: int
    scores: dict[str, float]
    note: str = ""


# ---------------------------------------------------------------- charts

def scatter_figure(members: pd.DataFrame, correlations: pd.DataFrame) -> str:
    points = members.dropna(subset=["consensus_score", "accuracy"])
    if points.empty:
        return note("No model has both a consensus score and an accuracy.", "scatter-note")
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(points["consensus_score"], points["accuracy"], s=36, color="#2a6fb0", zorder=3)
    for model_id, x, y in zip(points["model_id"], points["consensus_score"], points["accuracy"]):
        ax.annotate(str(model_id), (x, y), xytext=(5, 4), textcoords="offset points",
                    fontsize=8.5, color="#1d2430", **_PLAIN_TEXT)
    ax.set_xlabel("consensus score (mean cosine similarity to the consensus)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.margins(0.12)
    if not correlations.empty:
        correlations = correlations[(correlations["x"] == "consensus_score")
                                    & (correlations["y"] == "accuracy")]
    stats = "; ".join(_correlation_text(rows) for _, rows in correlations.groupby("method", sort=False))
    caption = (f"Each point is one committee member ({len(points)} models). "
               + (stats + ". " + html.escape(UNCERTAINTY) if stats else "No correlation was computed."))
    return figure("scatter", _chart_img(fig, "consensus score vs accuracy"), caption)


UNCERTAINTY = ("Intervals (95%, Fisher-z normal with a bootstrap standard error) over images resample "
               "blocks of images: how precisely each member's means are known from this image sample; "
               "over members they resample the committee: how much the correlation depends on which "
               "members it has, wide when the committee is small; the permutation p-value re-pairs the "
               "members' two statistics at random.")


def _correlation_text(rows: pd.DataFrame) -> str:
    """'Spearman ρ = 0.829 (p = 0.042, permutation p = 0.05; CI over images [0.70, 0.90], over members
    [0.21, 0.98]; n = 6)' as escaped HTML, from a method's rows (one per interval)."""
    first = rows.iloc[0]
    name = METHOD_NAMES.get(str(first.method), str(first.method))
    intervals = ", ".join(f"over {r.ci_over} [{format_value(r.ci_low)}, {format_value(r.ci_high)}]"
                          for r in rows.itertuples(index=False))
    return html.escape(
        f"{name} = {format_value(first.coefficient)} (p = {format_value(first.p_value, 'p')}, "
        f"permutation p = {format_value(first.p_permutation, 'p')}; CI {intervals}; "
        f"n = {format_value(first.n, 'int')})", quote=False)


def alignment_figure(members: pd.DataFrame, reference: pd.DataFrame) -> str:
    if "ap" not in members.columns or members["ap"].isna().all():
        return note("No mask metrics: the data set has no ground-truth masks.", "alignment-note")
    bars = pd.concat([members, reference]).dropna(subset=["ap"]).sort_values("ap")
    is_reference = (bars["model_id"].astype(str) == CONSENSUS_ID).to_numpy()
    fig = Figure(figsize=(7.5, 1.2 + 0.28 * len(bars)), layout="constrained")
    ax = fig.add_subplot()
    positions = np.arange(len(bars))
    ax.barh(positions, bars["ap"], color=np.where(is_reference, "#e08a00", "#2a6fb0"))
    ax.set_yticks(positions, [str(m) for m in bars["model_id"]], fontsize=8.5, **_PLAIN_TEXT)
    if is_reference.any():
        ax.axvline(bars["ap"][is_reference].iloc[0], color="#e08a00", linestyle="--",
                   linewidth=1.2, label="consensus")
        ax.legend(loc="lower right")
    ax.set_xlabel("mean average precision of the map against the mask")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    caption = ("Mean average precision (AP) over voted images with a mask, per model, "
               "treating each map as a pixel score for the mask. "
               + ("The orange bar and dashed line are the consensus map's own AP."
                  if is_reference.any() else "The consensus's own AP is not available."))
    return figure("alignment", _chart_img(fig, "mean AP per model"), html.escape(caption))


def robustness_figure(robustness: pd.DataFrame) -> str:
    if robustness.empty:
        return note("No robustness analysis (sub-committee resampling) in this run.",
                     "robustness-note")
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for method, rows in robustness.groupby("method", sort=True):
        by_k = rows.groupby("k")["coefficient"].agg(["mean", "min", "max"]).sort_index()
        line, = ax.plot(by_k.index, by_k["mean"], marker="o",
                        label=str(METHOD_NAMES.get(str(method), method)))
        ax.fill_between(by_k.index, by_k["min"], by_k["max"], color=line.get_color(), alpha=0.18)
    for text in ax.legend(fontsize=9).get_texts():
        text.set_parse_math(False)
    ax.set_xlabel("sub-committee size k")
    ax.set_ylabel("correlation of consensus score with accuracy")
    ax.set_xticks(sorted(robustness["k"].unique()))
    ax.grid(alpha=0.3)
    trials = robustness.groupby(["method", "k"])["trial"].nunique()
    caption = (f"Correlation between consensus score and accuracy within random sub-committees "
               f"of size k: mean over trials (line) and min–max range (band); "
               f"{trials.min()}–{trials.max()} trials per k.")
    return figure("robustness", _chart_img(fig, "correlation vs committee size"),
                   html.escape(caption))


# ---------------------------------------------------------------- gallery

def gallery_figure(gallery: list[GalleryItem], model_order: list[str]) -> str:
    if not gallery:
        return note("No gallery samples.", "gallery-note")
    items = "".join(_gallery_item(item, model_order) for item in gallery)
    caption = (f"One row per image: the image, its ground-truth mask, the consensus map and "
               f"each model's map (titled with the model's consensus score on this image), "
               f"models in order of mean consensus score. Maps use the {MAP_CMAP} colormap "
               f"from 0 to the 99th percentile over all maps of the row, so panels of a row "
               f"are comparable.")
    return figure("gallery", items, html.escape(caption))


def disputed_figure(items: list[GalleryItem], model_order: list[str]) -> str:
    if not items:
        return note("No image to show.", "disputed-note")
    caption = ("The images whose members' maps agree least with each other (lowest mean consensus score "
               "over the committee), each with how many members classify it correctly and the "
               "committee's majority prediction: where an auditor looks for label noise (a confident "
               "majority against the label) and for shortcut features (maps on the background). "
               "tables/images holds every image's figures.")
    return figure("disputed", "".join(_gallery_item(item, model_order) for item in items),
                   html.escape(caption))


def _gallery_item(item: GalleryItem, model_order: list[str]) -> str:
    ordered = [m for m in model_order if m in item.model_maps]
    ordered += [m for m in item.model_maps if m not in ordered]
    maps = [np.asarray(item.consensus, dtype=float)] + [np.asarray(item.model_maps[m], dtype=float)
                                                        for m in ordered]
    vmax = float(np.nanpercentile(np.concatenate([m.ravel() for m in maps]), 99))
    vmax = vmax if vmax > 0 else 1.0  # all-zero (or all-NaN) row: any positive scale will do
    image_id = html.escape(item.image_id)
    panels = [_panel(_array_img(np.asarray(item.image, dtype=np.uint8), item.image_id, "image"),
                     "image")]
    panels.append(_panel(_array_img(np.asarray(item.mask) > 0, "mask", "map",
                                    cmap="gray", vmin=0, vmax=1), "mask")
                  if item.mask is not None else
                  _panel('<div class="missing">no mask</div>', "mask"))
    titles = ["consensus"] + [f"{m} · {format_value(item.scores.get(m))}" for m in ordered]
    for title, array in zip(titles, maps):
        panels.append(_panel(_array_img(array, title, "map", cmap=MAP_CMAP, vmin=0, vmax=vmax),
                             title))
    return (f'<div class="gallery-item">\n'
            f'<div class="gallery-head">{image_id} <span>label {int(item.label)} · '
            f'{html.escape(item.note) + " · " if item.note else ""}'
            f"colour scale 0 – {vmax:.3g}</span></div>\n"
            f'<div class="panels">{"".join(panels)}</div>\n</div>\n')


def _panel(content: str, title: str) -> str:
    return f'<div class="panel">{content}<div class="title">{html.escape(title)}</div></div>'


# ---------------------------------------------------------------- images

def _chart_img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    png = buffer.getvalue()
    width = int.from_bytes(png[16:20], "big") * 100 // _DPI  # IHDR width, shown at 100 px/inch
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}" style="width:{width}px">'


def _array_img(array: np.ndarray, alt: str, css_class: str, **imsave_kwargs) -> str:
    """An <img> of an (h, w) map through a colormap, or of an (H, W, 3) uint8 image."""
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, array, format="png", **imsave_kwargs)
    return (f'<img class="{css_class}" src="{data_uri(buffer.getvalue())}" '
            f'alt="{html.escape(alt)}">')
