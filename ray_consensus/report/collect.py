"""The report of a stored run: reads what it shows and renders it with `report.render`.

It reads the run through the data contract (`record.RunRecord` parses run.json's spec) and
only what the page shows: the tables (of tables/images a few columns, to find the most disputed
images), and the shards of the images it shows (their consensus, scores and each member's
attributions), never every shard.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ray_consensus import console
from ray_consensus.errors import SpecError, first_line
from ray_consensus.report.render import GalleryItem, render_report
from ray_consensus.results import consensus as cm
from ray_consensus.runroot.contract import (
    read_consensus,
    read_maps,
    read_scores,
    read_stored_manifest,
)
from ray_consensus.runroot.record import RunRecord
from ray_consensus.runroot.units import IMAGES
from ray_consensus.storage.datafiles import read_uri_bytes
from ray_consensus.storage.store import Store


def write_report(store: Store) -> str:
    """Render report/index.html from the run root's tables, a gallery of sample images and the most
    disputed images; returns its URI."""
    run = RunRecord.load(store)
    if not store.exists("tables/models.parquet"):
        raise SpecError(f"no tables at {store.root} (run.json says {run.status!r}): a report needs a "
                        f"finished run; `ray-consensus status {store.root}` shows what is missing")
    tables = {name: store.read_parquet(f"tables/{name}.parquet").to_pandas() if store.exists(
        f"tables/{name}.parquet") else None for name in ("models", "correlations", "robustness")}
    summary = {"explainer": run.spec_data["explainer"], "counts": run.counts and run.counts.to_dict(),
               "created": run.updated}
    html = render_report(tables["models"], tables["correlations"], tables["robustness"], gallery_items(store, run),
                         summary, disputed_items(store, run))
    store.write_text("report/index.html", html)
    return store.uri("report/index.html")


def gallery_items(store: Store, run: RunRecord, max_shards: int = 8) -> list[GalleryItem]:
    """A few voted images with image, mask, consensus and every model's map: from the first
    shards (at most `max_shards` read), one image per class before any class repeats."""
    want = run.spec.run.gallery
    manifest = read_stored_manifest(store, columns=["shard"])
    if not want or manifest is None:
        return []
    voted = []
    for s in sorted(manifest["shard"].unique())[:max_shards]:
        cons = read_consensus(store, int(s), columns=["image_id", "label", "voted"])
        voted.append(cons[cons["voted"]].assign(shard=int(s)))
        if sum(len(v) for v in voted) >= want and pd.concat(voted)["label"].nunique() >= want:
            break
    if not voted:  # a run without images
        return []
    voted = pd.concat(voted, ignore_index=True)
    first = ~voted["label"].duplicated()
    chosen = pd.concat([voted[first], voted[~first]]).head(want)
    items = _items(store, run, chosen.assign(note=""))
    return sorted(items, key=lambda i: (i.label, i.image_id))


def disputed_items(store: Store, run: RunRecord) -> list[GalleryItem] | None:
    """The `run.gallery` images with the lowest mean consensus score over the committee (tables/images
    is read by a few columns; only their shards' maps are read). None for runs without tables/images."""
    if not store.list(IMAGES):
        return None
    table = store.read_parquet(IMAGES, columns=["image_id", "shard", "label", "members", "members_correct",
                                                "majority_pred", "majority_votes", "mean_consensus_score"])
    rows = table.to_pandas().sort_values(["mean_consensus_score", "image_id"], na_position="last")
    chosen = rows.head(run.spec.run.gallery)
    notes = [f"mean consensus score {r.mean_consensus_score:.3f}, {r.members_correct}/{r.members} members correct, "
             f"majority prediction {r.majority_pred} ({r.majority_votes} votes)" for r in chosen.itertuples()]
    return _items(store, run, chosen.assign(shard=chosen["shard"].astype(int), note=notes))


def _items(store: Store, run: RunRecord, chosen: pd.DataFrame) -> list[GalleryItem]:
    """Gallery items of the chosen images (columns image_id, shard, note), in the order given; each
    shard's consensus, scores and member maps read once."""
    from ray_consensus.dataset.decode import decode_image

    spec = run.spec
    models, side = [m.id for m in spec.committee], spec.run.map_size
    uris = read_stored_manifest(store, columns=["image_id", "uri"]).set_index("image_id")["uri"]
    by_id = {}
    for s, rows in chosen.groupby("shard", sort=True):
        cons = read_consensus(store, int(s)).set_index("image_id")
        scores = read_scores(store, int(s), columns=["image_id", "model_id", "consensus_score"])
        maps = {m: read_maps(store, m, int(s), side * side) for m in models}
        for row in rows.itertuples():
            try:
                image = decode_image(read_uri_bytes(uris.loc[row.image_id], spec.storage), spec.run.image_size)
            except Exception as e:  # gone, unreadable or undecodable since the run (any store's errors): the others
                console.say(f"report: image {row.image_id} left out of the gallery: {first_line(e)}")
                continue
            c = cons.loc[row.image_id]
            mask = c["mask"] if "mask" in cons.columns else None
            per_image = scores[scores["image_id"] == row.image_id].set_index("model_id")["consensus_score"]
            by_id[row.image_id] = GalleryItem(
                image_id=row.image_id, image=image,
                mask=None if mask is None else np.asarray(mask, np.uint8).reshape(side, side),
                consensus=np.asarray(c["consensus"], np.float32).reshape(side, side),
                model_maps={m: cm.normalise(maps[m][row.image_id], spec.method.normalise).reshape(side, side)
                            for m in models},
                label=int(c["label"]), scores={m: float(per_image.get(m, np.nan)) for m in models}, note=row.note)
    return [by_id[i] for i in chosen["image_id"] if i in by_id]
