"""The report of a stored run: reads what it shows and renders it with `report.py`.

It reads the run through the data contract (`contract.read_run` parses run.json's spec) and
only what the page shows: the tables, and for the gallery a few shards (their consensus and
scores, and each member's attributions of the images chosen), never every shard.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ray_consensus import consensus as cm
from ray_consensus.contract import StoredRun, read_consensus, read_maps, read_run, read_scores, read_stored_manifest
from ray_consensus.report import GalleryItem, render_report
from ray_consensus.storage import Store, read_uri_bytes


def write_report(store: Store) -> str:
    """Render report/index.html from the run root's tables and a gallery of sample images; returns its URI."""
    run = read_run(store)
    tables = {name: store.read_parquet(f"tables/{name}.parquet").to_pandas() if store.exists(
        f"tables/{name}.parquet") else None for name in ("models", "correlations", "robustness")}
    summary = {**run.info, "explainer": run.info["spec"]["explainer"], "created": run.info.get("updated")}
    html = render_report(tables["models"], tables["correlations"], tables["robustness"], gallery_items(store, run),
                         summary)
    store.write_text("report/index.html", html)
    return store.uri("report/index.html")


def gallery_items(store: Store, run: StoredRun, max_shards: int = 8) -> list[GalleryItem]:
    """A few voted images with image, mask, consensus and every model's map: from the first
    shards (at most `max_shards` read), one image per class before any class repeats."""
    from ray_consensus.data import decode_image

    spec = run.spec
    want, models = spec.run.gallery, [m.id for m in spec.committee]
    manifest = read_stored_manifest(store, columns=["image_id", "uri", "shard"])
    if not want or manifest is None:
        return []
    uris = manifest.set_index("image_id")["uri"]
    voted = []
    for s in sorted(manifest["shard"].unique())[:max_shards]:
        cons = read_consensus(store, int(s))
        voted.append(cons[cons["voted"]].assign(shard=int(s)))
        if sum(len(v) for v in voted) >= want and pd.concat(voted)["label"].nunique() >= want:
            break
    voted = pd.concat(voted, ignore_index=True)
    first = ~voted["label"].duplicated()
    chosen = pd.concat([voted[first], voted[~first]]).head(want)
    side = spec.run.map_size
    items = []
    for s, rows in chosen.groupby("shard", sort=True):
        scores = read_scores(store, s, columns=["image_id", "model_id", "consensus_score"])
        maps = {m: read_maps(store, m, s, side * side) for m in models}
        for row in rows.itertuples():
            try:
                image = decode_image(read_uri_bytes(uris.loc[row.image_id], spec.storage), spec.run.image_size)
            except Exception:  # the image vanished since the run: show the others
                continue
            mask = getattr(row, "mask", None)
            per_image = scores[scores["image_id"] == row.image_id].set_index("model_id")["consensus_score"]
            items.append(GalleryItem(
                image_id=row.image_id, image=image,
                mask=None if mask is None else np.asarray(mask, np.uint8).reshape(side, side),
                consensus=np.asarray(row.consensus, np.float32).reshape(side, side),
                model_maps={m: cm.normalise(maps[m][row.image_id], spec.method.normalise).reshape(side, side)
                            for m in models},
                label=int(row.label), scores={m: float(per_image.get(m, np.nan)) for m in models}))
    return sorted(items, key=lambda i: (i.label, i.image_id))
