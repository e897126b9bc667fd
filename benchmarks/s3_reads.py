"""The end of a run on S3: `write_tables` and the error count read every shard's small files
(aggregates/, subcommittees/, errors/). Read one after another, that pass waits on one request at a
time; `Store.read_parquets` keeps `read_threads` requests in flight. This script times the pass
with read_threads 1 against the S3 store's default, in one process, on a local moto server over
HTTP (tests/s3server.py), then through a proxy that delays each request by a round trip's worth
(standing in for a cloud bucket's latency, which a local server does not have):

    .venv/bin/python benchmarks/s3_reads.py                  # 50,000 images (196 shards) x 26 members, ~3 min
    .venv/bin/python benchmarks/s3_reads.py --images 20000 --delay-ms 20

The reducer's reads are timed the same way: one shard's unit of every member, pyarrow's reads one
file after another (the code before) against `contract.read_attributions` (`Store.read_parquets`).

Prints `name: ratio` lines (sequential seconds / read-ahead seconds) with `#` lines behind them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from s3server import Proxy, S3Server
from scale import SHARD, aggregates, spec_data


def end_of_run(spec, store, shards: list[int], threads: int) -> float:
    from ray_consensus.results.tables import write_tables
    from ray_consensus.runroot.contract import count_errors

    store.read_threads = threads
    t0 = time.perf_counter()
    write_tables(spec, store, shards)
    count_errors(store, shards)
    return time.perf_counter() - t0


def compare(name: str, spec, store, shards: list[int], default: int, rounds: int) -> None:
    times = {1: [], default: []}
    for _ in range(rounds):  # interleaved: a drifting machine favours neither side
        for threads in times:
            times[threads].append(end_of_run(spec, store, shards, threads))
    seq, ahead = min(times[1]), min(times[default])
    print(f"{name}: {seq / ahead:.1f}", flush=True)
    print(f"#   {len(shards)} shards x 4 files read at the end of the run (2 for the tables, 2 error counts); "
          f"read_threads 1: {seq:.2f} s, read_threads {default}: {ahead:.2f} s (the faster of {rounds} each)",
          flush=True)


def member_units(store, members: int, images: int) -> list[str]:
    """Shard 0's attribution unit of each member: `images` synthetic 56 px float32 maps (as the slots
    write them, product defaults); returns the members' ids."""
    import numpy as np

    from ray_consensus.runroot.contract import ImageRef, attributions_file, encode_attributions

    rng = np.random.default_rng(0)
    refs = [ImageRef(f"img{i:06d}", f"s3://bench/data/{i}.png", i % 1000, None) for i in range(images)]
    ids = [f"m{k:02d}" for k in range(members)]
    for model_id in ids:
        maps = rng.standard_normal((images, 56, 56)).astype(np.float32)
        store.write_parquet(attributions_file(model_id, 0),
                            encode_attributions(refs, rng.integers(0, 1000, images), maps, {}, "float32"))
    return ids


def compare_reducer(name: str, store, ids: list[str], default: int, rounds: int) -> None:
    from ray_consensus.runroot.contract import attributions_file, read_attributions

    files = [attributions_file(m, 0) for m in ids]
    times: dict[str, list[float]] = {"pyarrow, one at a time": [], f"read_parquets, {default} ahead": [],
                                     "read_attributions": []}
    store.read_threads = default
    for _ in range(rounds):
        for label, read in zip(times, (lambda: [store.read_parquet(f) for f in files],
                                        lambda: list(store.read_parquets(files)),
                                        lambda: read_attributions(store, ids, 0, 56 * 56))):
            t0 = time.perf_counter()
            read()
            times[label].append(time.perf_counter() - t0)
    best = {label: min(t) for label, t in times.items()}
    seq, ahead = list(best.values())[:2]
    print(f"{name}: {seq / ahead:.1f}", flush=True)
    print(f"#   one shard's {len(files)} member units ({SHARD} images each): " +
          ", ".join(f"{label} {t:.2f} s" for label, t in best.items()) +
          f" (the faster of {rounds} each; read_attributions also decodes the maps)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--members", type=int, default=26)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added per request by the proxy")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from ray_consensus.runroot.contract import MANIFEST_ERRORS_FILE, errors_table, file_of, member_errors_file
    from ray_consensus.spec.config import parse_spec
    from ray_consensus.storage.store import S3Store

    server = S3Server()
    server.start()
    try:
        os.environ.update(server.env())
        server.make_bucket("bench")
        work = Path(tempfile.gettempdir())  # only names the spec's local output, which nothing writes to
        spec = parse_spec({**spec_data(work, args.members), "run": {"output": "s3://bench/run", "shard_size": SHARD}})
        store = S3Store("s3://bench/run")
        shards = list(range(-(-args.images // SHARD)))
        t0 = time.perf_counter()
        aggregates(work, args.images, args.members, store)
        empty = errors_table([])
        for path in [MANIFEST_ERRORS_FILE] + [f for s in shards for f in (file_of("errors", s), member_errors_file(s))]:
            store.write_parquet(path, empty)
        print(f"# {args.images:,} images in {len(shards)} shards x {args.members} members on a moto server over "
              f"HTTP (written in {time.perf_counter() - t0:.0f} s); `write_tables` + `count_errors`", flush=True)
        units = member_units(store, args.members, SHARD)
        default = S3Store.read_threads
        compare("s3_end_of_run_read_ahead_vs_sequential", spec, store, shards, default, args.rounds)
        compare_reducer("s3_reducer_reads_ahead_vs_sequential", store, units, default, args.rounds)
        proxy = Proxy(server.port, delay_s=args.delay_ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{proxy.port}"
        delayed = S3Store("s3://bench/run")
        compare(f"s3_end_of_run_read_ahead_vs_sequential_{args.delay_ms:g}ms_round_trip", spec, delayed, shards,
                default, args.rounds)
        compare_reducer(f"s3_reducer_reads_ahead_vs_sequential_{args.delay_ms:g}ms_round_trip", delayed, units,
                        default, args.rounds)
    finally:
        server.stop(keep_state=False)


if __name__ == "__main__":
    main()
