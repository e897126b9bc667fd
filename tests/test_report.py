"""The HTML report: self-contained, escaped, and rendered by a real headless Chromium."""

import base64
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ray_consensus.report.render import GalleryItem, render_report

HOSTILE_ID = "<script>alert(1)</script>"
MATHTEXT_ID = r"vit$\x$tiny"  # invalid mathtext: drawing it as math would raise
MODEL_IDS = ["resnet18", "resnet50", HOSTILE_ID, "convnext_tiny", MATHTEXT_ID, "deit_small"]
N_ITEMS = 7
IMAGE_SIZE, MAP_SIZE = 64, 16


def _normalise(m):
    return np.abs(m) / np.linalg.norm(m)


@pytest.fixture(scope="module")
def inputs():
    """6 models whose maps are a shared object blob plus model-specific noise, 7 images."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:MAP_SIZE, :MAP_SIZE]
    noise = np.linspace(0.1, 1.5, len(MODEL_IDS))  # later models agree less with the blob
    gallery = []
    for i in range(N_ITEMS):
        cy, cx = rng.integers(4, MAP_SIZE - 4, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
        maps = {m: _normalise(blob + s * rng.random((MAP_SIZE, MAP_SIZE)))
                for m, s in zip(MODEL_IDS, noise)}
        consensus = np.mean(list(maps.values()), axis=0)
        scores = {m: float(np.dot(v.ravel(), consensus.ravel()) / np.linalg.norm(consensus))
                  for m, v in maps.items()}
        image = (rng.random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 80).astype(np.uint8)
        image[cy * 4 - 12:cy * 4 + 12, cx * 4 - 12:cx * 4 + 12] = (230, 120, 40)
        mask = (np.abs(yy - cy) <= 3) & (np.abs(xx - cx) <= 3)
        gallery.append(GalleryItem(f"img_{i:03d}", image, mask, consensus, maps, label=i % 3,
                                   scores=scores))
    models = pd.DataFrame({
        "model_id": MODEL_IDS,
        "arch": ["resnet18", "resnet50", "<b>arch</b>", "convnext_tiny", "vit_tiny", "deit_small"],
        "accuracy": 0.9 - 0.05 * noise + rng.normal(0, 0.02, len(MODEL_IDS)),
        "n_images": 10, "n_voted": N_ITEMS,
        "consensus_score": [np.mean([g.scores[m] for g in gallery]) for m in MODEL_IDS],
        "ap": 0.8 - 0.2 * noise / noise.max(),
        "roc_auc": 0.95 - 0.1 * noise / noise.max(),
        "pointing_game": 1.0 - 0.1 * np.arange(len(MODEL_IDS)),
    })
    models.loc[len(models)] = {"model_id": "consensus", "arch": "", "accuracy": np.nan,
                               "n_images": 10, "n_voted": N_ITEMS, "consensus_score": np.nan,
                               "ap": 0.83, "roc_auc": 0.97, "pointing_game": 1.0}
    members = models.iloc[:len(MODEL_IDS)]
    correlations = pd.DataFrame([
        {"x": "consensus_score", "y": "accuracy", "method": name,
         "coefficient": r.statistic, "p_value": r.pvalue, "p_permutation": r.pvalue * 1.1, "ci_over": over,
         "ci_low": r.statistic - width, "ci_high": min(1.0, r.statistic + width / 3), "n": len(members)}
        for name, r in [("spearman", stats.spearmanr(members.consensus_score, members.accuracy)),
                        ("pearson", stats.pearsonr(members.consensus_score, members.accuracy)),
                        ("kendall", stats.kendalltau(members.consensus_score, members.accuracy))]
        for over, width in (("images", 0.1), ("members", 0.3))])
    robustness = pd.DataFrame([
        {"k": k, "trial": t, "method": "spearman",
         "coefficient": stats.spearmanr(members.consensus_score.iloc[list(c)],
                                        members.accuracy.iloc[list(c)]).statistic}
        for k in (3, 4, 5) for t, c in enumerate(combinations(range(len(MODEL_IDS)), k))])
    run_info = {"explainer": {"name": "smoothgrad", "params": {"n_samples": 50}},
                "counts": {"errors": 2}, "created": "2025-01-01T00:00:00Z", "secret_key": "xyz"}
    disputed = [GalleryItem(g.image_id, g.image, g.mask, g.consensus, g.model_maps, g.label, g.scores,
                            note=f"mean consensus score 0.{i}, 2/6 members correct") for i, g in enumerate(gallery[:2])]
    return models, correlations, robustness, gallery, run_info, disputed


@pytest.fixture(scope="module")
def report(inputs):
    return render_report(*inputs)


def _img_sources(text):
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)


def test_report_is_self_contained_and_has_every_figure(report):
    assert not re.search(r"https?://", report)
    assert 'src="/' not in report and "url(" not in report
    sources = _img_sources(report)
    # 3 charts + per gallery and disputed item: image, mask, consensus, 6 model maps
    assert len(sources) == 3 + (N_ITEMS + 2) * (3 + len(MODEL_IDS))
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for figure_id in ("scatter", "alignment", "robustness", "gallery", "disputed"):
        assert len(re.findall(rf'<figure id="{figure_id}">.*?<figcaption>', report, re.S)) == 1
    assert report.count('<div class="gallery-item">') == N_ITEMS + 2
    assert "mean consensus score 0.1, 2/6 members correct" in report


def test_strings_from_the_data_are_escaped(report):
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert "&lt;b&gt;arch&lt;/b&gt;" in report and "<b>" not in report
    assert "alert(1)</script>" not in report
    assert report.count("<script") == 1  # the report's own image check, nothing else


def test_run_summary_is_compact(report):
    summary = re.search(r'<dl class="summary" id="summary">(.*?)</dl>', report, re.S).group(1)
    assert "smoothgrad (n_samples=50)" in summary
    assert "<dt>committee size</dt><dd>6</dd>" in summary
    assert "<dt>voted images</dt><dd>7</dd>" in summary
    assert "<dt>errors</dt><dd>2</dd>" in summary
    assert "secret_key" not in report and "xyz" not in report


def test_scatter_caption_and_tables_carry_the_numbers(inputs, report):
    models, correlations = inputs[0], inputs[1]
    caption = re.search(r'<figure id="scatter">.*?<figcaption>(.*?)</figcaption>', report,
                        re.S).group(1)
    for (method, rows), name in zip(correlations.groupby("method", sort=False), ("Spearman ρ", "Pearson r",
                                                                                 "Kendall τ")):
        images, members = rows.iloc[0], rows.iloc[1]
        assert (f"{name} = {images.coefficient:.3f} (p = {images.p_value:.2g}, permutation p = "
                f"{images.p_permutation:.2g}; CI over images [{images.ci_low:.3f}, {images.ci_high:.3f}], over "
                f"members [{members.ci_low:.3f}, {members.ci_high:.3f}]; n = 6)") in caption
    assert "over members they resample the committee" in caption
    models_table = re.search(r'<table id="models-table">.*?</table>', report, re.S).group(0)
    rows = re.findall(r"<tr( class=\"reference\")?><td class=\"text\">(.*?)</td>", models_table)
    # members by falling consensus score, then the consensus as the highlighted reference row
    members = models.iloc[:-1].sort_values("consensus_score", ascending=False)
    expected = [m.replace("<", "&lt;").replace(">", "&gt;") for m in members.model_id]
    assert [r[1] for r in rows] == expected + ["consensus"]
    assert [bool(r[0]) for r in rows] == [False] * len(MODEL_IDS) + [True]
    assert "<td class=\"num\">0.830</td>" in models_table  # consensus AP, 3 decimals
    assert "<td class=\"num\">–</td>" in models_table  # its NaN accuracy


def test_missing_masks_and_robustness_leave_notes_instead_of_figures(inputs):
    models, correlations, _, gallery, run_info, _ = inputs
    no_masks = models[models.model_id != "consensus"].drop(columns=["ap", "roc_auc",
                                                                    "pointing_game"])
    unmasked = [GalleryItem(g.image_id, g.image, None, g.consensus, g.model_maps, g.label,
                            g.scores) for g in gallery[:2]]
    text = render_report(no_masks, correlations, None, unmasked, {})
    assert 'id="alignment"' not in text and 'id="alignment-note"' in text
    assert 'id="robustness"' not in text and 'id="robustness-note"' in text
    assert text.count("no mask") == 2 and text.count('<div class="gallery-item">') == 2
    assert len(_img_sources(text)) == 1 + 2 * (2 + len(MODEL_IDS))
    empty = render_report(no_masks, correlations, pd.DataFrame(), [], {})
    assert 'id="robustness-note"' in empty and 'id="gallery-note"' in empty


class _DomFacts(HTMLParser):
    """Body data attributes, figure ids and gallery-item count of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.body, self.figures, self.items = {}, [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "figure":
            self.figures.append(attrs.get("id"))
        elif tag == "div" and attrs.get("class") == "gallery-item":
            self.items += 1


def _chromium():
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium not on PATH; install with: apt-get install -y chromium")
    return path


def test_report_renders_in_headless_chromium(report, tmp_path):
    page = tmp_path / "index.html"
    page.write_text(report, encoding="utf-8")
    screenshot = tmp_path / "report.png"
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=5000", "--window-size=1400,3000",
               f"--screenshot={screenshot}", "--dump-dom", page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = _DomFacts()
    dom.feed(done.stdout)
    total = 3 + (N_ITEMS + 2) * (3 + len(MODEL_IDS))
    assert dom.body.get("data-images-total") == str(total), done.stdout[:500]
    assert dom.body.get("data-images-ok") == str(total)
    assert dom.body.get("data-errors") == ""
    assert dom.figures == ["scatter", "alignment", "robustness", "gallery", "disputed"]
    assert dom.items == N_ITEMS + 2
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1400, 3000)
    assert len(png) > 100_000  # a blank page compresses to a few kB
