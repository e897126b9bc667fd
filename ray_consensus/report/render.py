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

This module is the page: its style, script, sections and tables. The figures in it (charts and the
gallery) are `figures.py`'s; the HTML pieces both use (notes, figures, cells) are `markup.py`'s.
"""

from __future__ import annotations

import base64
import hashlib
import html
from numbers import Real

import numpy as np
import pandas as pd

from ray_consensus.report.figures import (
    GalleryItem,
    alignment_figure,
    disputed_figure,
    gallery_figure,
    robustness_figure,
    scatter_figure,
)
from ray_consensus.report.markup import CONSENSUS_ID, format_value, note

MODEL_COLUMNS = ("model_id", "arch", "accuracy", "n_images", "n_voted", "n_nonfinite", "consensus_score",
                 "ap", "roc_auc", "pointing_game")


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
    run_info: what the page says of the run (`collect` passes the explainer, the error count and
        the creation time from its `RunRecord`; top level or under "config"); nothing is dumped.
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
                 scatter_figure(members, correlations)
                 + _table(correlations, _CORRELATION_FORMATS, "correlations")),
        _section("Alignment with ground-truth masks", alignment_figure(members, reference)),
        _section("Robustness to committee size", robustness_figure(robustness)),
        _section("Gallery", gallery_figure(gallery, [str(m) for m in members["model_id"]])),
    ]
    if disputed is not None:
        sections.append(_section("Most disputed images", disputed_figure(disputed,
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


# ---------------------------------------------------------------- tables

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
    return note("Non-finite logits or maps (NaN or inf), left out of the vote and listed in errors/ — "
                 + "; ".join(parts) + ".", "nonfinite-note")


def _table(frame: pd.DataFrame, formats: dict[str, str], table_id: str,
           reference_rows: np.ndarray | None = None) -> str:
    """An HTML table of `frame`'s columns named in `formats`, in that order."""
    columns = [c for c in formats if c in frame.columns]
    if frame.empty or not columns:
        return note(f"The {table_id} table is empty.", f"{table_id}-note")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    rows = []
    for i, record in enumerate(frame[columns].itertuples(index=False)):
        cells = "".join(
            f'<td class="{"num" if isinstance(v, Real) and not isinstance(v, bool) else "text"}">'
            f"{format_value(v, formats[c])}</td>"
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
                    f"<dd>{format_value(value, 'int' if isinstance(value, Real) else 'auto')}</dd>"
                    for name, value in rows)
    return _section("Run", f'<dl class="summary" id="summary">{items}</dl>\n')


def _run_value(run_info: dict, key: str) -> object:
    """run_info[key], else run_info["config"][key], else None."""
    if key in run_info:
        return run_info[key]
    config = run_info.get("config")
    return config.get(key) if isinstance(config, dict) else None
