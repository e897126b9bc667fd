"""Self-contained HTML report of one run.

`render_report` takes plain data (the models / correlations / robustness tables, a few
gallery samples and the run's ``run.json`` dict) and returns one HTML page with every
figure embedded as a base64 PNG data URI. The page loads nothing from outside: a
Content-Security-Policy forbids any request that is not a data URI, and a tiny inline
script records on ``<body>`` how many images decoded (``data-images-ok`` of
``data-images-total``) and any error or blocked load (``data-errors``), so a headless
browser can check the page.

Every string that comes from the data (model ids, archs, image ids, run info) is
HTML-escaped, and is drawn by matplotlib as plain text (no mathtext, no TeX).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from dataclasses import dataclass
from numbers import Integral, Real

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

CONSENSUS_ID = "consensus"
MAP_CMAP = "viridis"  # perceptually uniform, readable in grey and by colour-blind readers
MODEL_COLUMNS = ("model_id", "arch", "accuracy", "n_images", "n_voted", "n_nonfinite", "consensus_score",
                 "ap", "roc_auc", "pointing_game")
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


def render_report(models: pd.DataFrame, correlations: pd.DataFrame,
                  robustness: pd.DataFrame | None, gallery: list[GalleryItem],
                  run_info: dict, disputed: list[GalleryItem] | None = None) -> str:
    """Render the report of one run and return its HTML text.

    models: one row per committee member (model_id, arch, accuracy, n_images, n_voted,
        consensus_score, and where masks exist ap, roc_auc, pointing_game); an optional
        row with model_id == "consensus" holds the consensus's own alignment means.
    correlations: x, y, method, coefficient, p_value, p_permutation, ci_over (images |
        members), ci_low, ci_high, n: two rows per (x, y, method), one per interval.
    robustness: k, trial, method, coefficient (sub-committee correlations), or None.
    gallery: samples shown as rows of image, mask, consensus and each model's map.
    disputed: the images the committee agrees on least, shown the same way (None: no section).
    run_info: the run's run.json dict; only the explainer, error count and creation
        time are read from it (top level or under "config"), nothing is dumped.
    """
    is_consensus = models["model_id"].astype(str) == CONSENSUS_ID
    members = models[~is_consensus].sort_values("consensus_score", ascending=False,
                                                 na_position="last")
    reference = models[is_consensus]
    table = pd.concat([members, reference], ignore_index=True)
    robustness = robustness if robustness is not None else pd.DataFrame()
    sections = [
        _summary_section(members, run_info),
        _section("Models", _models_table(table) + _nonfinite_note(members)),
        _section("Consensus score vs accuracy",
                 _scatter_figure(members, correlations)
                 + _table(correlations, _CORRELATION_FORMATS, "correlations")),
        _section("Alignment with ground-truth masks", _alignment_figure(members, reference)),
        _section("Robustness to committee size", _robustness_figure(robustness)),
        _section("Gallery", _gallery_figure(gallery, [str(m) for m in members["model_id"]])),
    ]
    if disputed is not None:
        sections.append(_section("Most disputed images", _disputed_figure(disputed,
                                                                          [str(m) for m in members["model_id"]])))
    return _page("".join(sections))


# ---------------------------------------------------------------- page and sections

_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif;
 color:#1d2430;margin:0 auto;padding:24px 32px 64px;max-width:1500px}
h1{font-size:26px;margin:0 0 12px}h2{font-size:20px;margin:36px 0 12px;
 border-bottom:1px solid #d5dae1;padding-bottom:4px}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0}
dl.summary dt{color:#5b6675}dl.summary dd{margin:0}
table{border-collapse:collapse;margin:12px 0;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #e3e7ec;text-align:left}
th{background:#f3f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.reference td{font-weight:600;background:#fff6e0}
figure{margin:12px 0}figure img{max-width:100%;height:auto}
figcaption{color:#3d4756;max-width:900px;margin-top:6px}
p.note{color:#5b6675;font-style:italic}
.gallery-item{margin:0 0 22px;padding-bottom:12px;border-bottom:1px solid #e3e7ec}
.gallery-head{font-weight:600;margin-bottom:6px}.gallery-head span{font-weight:400;color:#5b6675}
.panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(128px,1fr));gap:10px}
.panel img{width:100%;height:auto;display:block;border:1px solid #e3e7ec}
.panel img.map{image-rendering:pixelated}
.panel .title{font-size:12.5px;margin-top:3px;overflow-wrap:anywhere}
.panel .missing{aspect-ratio:1;display:flex;align-items:center;justify-content:center;
 background:#f3f5f8;color:#5b6675;font-size:13px}
"""

# Runs in <head>: errors of images that fail to decode fire before <body> is parsed.
_SCRIPT = """(function () {
  var errors = [];
  function show() { document.body.dataset.errors = errors.join(" | "); }
  function record(message) { errors.push(String(message)); if (document.body) show(); }
  window.addEventListener("error", function (e) {
    record(e.message || ("failed to load " + (e.target && e.target.tagName)));
  }, true);
  document.addEventListener("securitypolicyviolation", function (e) {
    record("blocked " + e.blockedURI);
  });
  window.addEventListener("load", function () {
    var images = document.images, ok = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) ok++;
    }
    document.body.dataset.imagesOk = ok;
    document.body.dataset.imagesTotal = images.length;
    show();
  });
})();"""


def _page(body: str) -> str:
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    # Only data-URI images, our own inline style and this one script may load or run.
    policy = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
              f"script-src 'sha256-{script_hash}'")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>ray-consensus report</title>\n<style>{_STYLE}</style>\n"
            f"<script>{_SCRIPT}</script>\n</head>\n<body>\n"
            f"<h1>ray-consensus report</h1>\n{body}</body>\n</html>\n")


def _section(title: str, content: str) -> str:
    return f"<section>\n<h2>{html.escape(title)}</h2>\n{content}</section>\n"


def _note(text: str, note_id: str) -> str:
    return f'<p class="note" id="{note_id}">{html.escape(text)}</p>\n'


def _figure(figure_id: str, content: str, caption: str) -> str:
    """A <figure>; `content` is HTML, `caption` is HTML built from escaped pieces."""
    return (f'<figure id="{figure_id}">\n{content}\n'
            f"<figcaption>{caption}</figcaption>\n</figure>\n")


def _chart_img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    png = buffer.getvalue()
    width = int.from_bytes(png[16:20], "big") * 100 // _DPI  # IHDR width, shown at 100 px/inch
    return f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}" style="width:{width}px">'


def _array_img(array: np.ndarray, alt: str, css_class: str, **imsave_kwargs) -> str:
    """An <img> of an (h, w) map through a colormap, or of an (H, W, 3) uint8 image."""
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, array, format="png", **imsave_kwargs)
    return (f'<img class="{css_class}" src="{_data_uri(buffer.getvalue())}" '
            f'alt="{html.escape(alt)}">')


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- formatting

def _format_value(value: object, style: str = "auto") -> str:
    """Format one table cell; returns escaped HTML text. NaN/None render as an en dash."""
    if value is None or (isinstance(value, Real) and math.isnan(value)):
        return "–"
    if style == "p":
        return f"{value:.2g}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        return html.escape(str(value))
    if isinstance(value, Integral) or style == "int":
        return f"{int(value):d}"
    return f"{value:.3f}"


_CORRELATION_FORMATS = {"x": "auto", "y": "auto", "method": "auto", "coefficient": "auto",
                        "p_value": "p", "p_permutation": "p", "ci_over": "auto", "ci_low": "auto",
                        "ci_high": "auto", "n": "int"}


def _models_table(table: pd.DataFrame) -> str:
    known = [c for c in MODEL_COLUMNS if c in table.columns]
    extra = [c for c in table.columns if c not in MODEL_COLUMNS]
    formats = {c: ("int" if c in ("n_images", "n_voted", "n_nonfinite") else "auto") for c in known + extra}
    reference_rows = (table["model_id"].astype(str) == CONSENSUS_ID).to_numpy()
    return _table(table, formats, "models", reference_rows)


def _nonfinite_note(members: pd.DataFrame) -> str:
    """Members whose logits or maps were not finite (NaN or inf: e.g. broken weights), left out of the vote."""
    if "n_nonfinite" not in members or not (members["n_nonfinite"] > 0).any():
        return ""
    parts = [f"{m}: every map" if n == total else f"{m}: {n} of {total} maps"
             for m, n, total in zip(members["model_id"], members["n_nonfinite"], members["n_images"]) if n > 0]
    return _note("Non-finite logits or maps (NaN or inf), left out of the vote and listed in errors/ — "
                 + "; ".join(parts) + ".", "nonfinite-note")


def _table(frame: pd.DataFrame, formats: dict[str, str], table_id: str,
           reference_rows: np.ndarray | None = None) -> str:
    """An HTML table of `frame`'s columns named in `formats`, in that order."""
    columns = [c for c in formats if c in frame.columns]
    if frame.empty or not columns:
        return _note(f"The {table_id} table is empty.", f"{table_id}-note")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    rows = []
    for i, record in enumerate(frame[columns].itertuples(index=False)):
        cells = "".join(
            f'<td class="{"num" if isinstance(v, Real) and not isinstance(v, bool) else "text"}">'
            f"{_format_value(v, formats[c])}</td>"
            for c, v in zip(columns, record))
        row_class = ' class="reference"' if reference_rows is not None and reference_rows[i] else ""
        rows.append(f"<tr{row_class}>{cells}</tr>")
    return (f'<table id="{table_id}-table">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(rows) + "\n</tbody>\n</table>\n")


def _summary_section(members: pd.DataFrame, run_info: dict) -> str:
    explainer = _run_value(run_info, "explainer")
    if isinstance(explainer, dict):
        params = explainer.get("params") or {}
        explainer = str(explainer.get("name", "?")) + (
            " (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")
    counts = _run_value(run_info, "counts")
    errors = counts.get("errors") if isinstance(counts, dict) else None
    n_images = members["n_images"].max() if "n_images" in members else None
    n_voted = members["n_voted"].max() if "n_voted" in members else None
    rows = [("explainer", explainer), ("committee size", len(members)),
            ("images", n_images), ("voted images", n_voted), ("errors", errors),
            ("created", _run_value(run_info, "created"))]
    items = "".join(f"<dt>{html.escape(name)}</dt>"
                    f"<dd>{_format_value(value, 'int' if isinstance(value, Real) else 'auto')}</dd>"
                    for name, value in rows)
    return _section("Run", f'<dl class="summary" id="summary">{items}</dl>\n')


def _run_value(run_info: dict, key: str) -> object:
    """run_info[key], else run_info["config"][key], else None."""
    if key in run_info:
        return run_info[key]
    config = run_info.get("config")
    return config.get(key) if isinstance(config, dict) else None


# ---------------------------------------------------------------- figures

def _scatter_figure(members: pd.DataFrame, correlations: pd.DataFrame) -> str:
    points = members.dropna(subset=["consensus_score", "accuracy"])
    if points.empty:
        return _note("No model has both a consensus score and an accuracy.", "scatter-note")
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
    return _figure("scatter", _chart_img(fig, "consensus score vs accuracy"), caption)


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
    intervals = ", ".join(f"over {r.ci_over} [{_format_value(r.ci_low)}, {_format_value(r.ci_high)}]"
                          for r in rows.itertuples(index=False))
    return html.escape(
        f"{name} = {_format_value(first.coefficient)} (p = {_format_value(first.p_value, 'p')}, "
        f"permutation p = {_format_value(first.p_permutation, 'p')}; CI {intervals}; "
        f"n = {_format_value(first.n, 'int')})", quote=False)


def _alignment_figure(members: pd.DataFrame, reference: pd.DataFrame) -> str:
    if "ap" not in members.columns or members["ap"].isna().all():
        return _note("No mask metrics: the data set has no ground-truth masks.", "alignment-note")
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
    return _figure("alignment", _chart_img(fig, "mean AP per model"), html.escape(caption))


def _robustness_figure(robustness: pd.DataFrame) -> str:
    if robustness.empty:
        return _note("No robustness analysis (sub-committee resampling) in this run.",
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
    return _figure("robustness", _chart_img(fig, "correlation vs committee size"),
                   html.escape(caption))


def _gallery_figure(gallery: list[GalleryItem], model_order: list[str]) -> str:
    if not gallery:
        return _note("No gallery samples.", "gallery-note")
    items = "".join(_gallery_item(item, model_order) for item in gallery)
    caption = (f"One row per image: the image, its ground-truth mask, the consensus map and "
               f"each model's map (titled with the model's consensus score on this image), "
               f"models in order of mean consensus score. Maps use the {MAP_CMAP} colormap "
               f"from 0 to the 99th percentile over all maps of the row, so panels of a row "
               f"are comparable.")
    return _figure("gallery", items, html.escape(caption))


def _disputed_figure(items: list[GalleryItem], model_order: list[str]) -> str:
    if not items:
        return _note("No image to show.", "disputed-note")
    caption = ("The images whose members' maps agree least with each other (lowest mean consensus score "
               "over the committee), each with how many members classify it correctly and the "
               "committee's majority prediction: where an auditor looks for label noise (a confident "
               "majority against the label) and for shortcut features (maps on the background). "
               "tables/images holds every image's figures.")
    return _figure("disputed", "".join(_gallery_item(item, model_order) for item in items),
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
    titles = ["consensus"] + [f"{m} · {_format_value(item.scores.get(m))}" for m in ordered]
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
