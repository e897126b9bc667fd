"""The end of a run on S3: `write_tables` and the error count read every shard's small files
(aggregates/, subcommittees/, errors/). Read one after another, that pass waits on one request at a
time; `Store.read_parquets` keeps `read_threads` requests in flight. This script times the pass
with read_threads 1 against the S3 store's default, in one process, on a local moto server over
HTTP (tests/s3server.py), then through a proxy that delays each request by a round trip's worth
(standing in for a cloud bucket's latency, which a local server does not have):

    .venv/bin/python benchmarks/s3_reads.py                  # 50,000 images (196 shards) x 26 members, ~3 min
    .venv/bin/python benchmarks/s3_reads.py --images 20000 --delay-ms 20

Prints `name: ratio` lines (sequential seconds / read-ahead seconds) with `#` lines behind them.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from s3server import S3Server  # noqa: E402
from scale import SHARD, aggregates, spec_data  # noqa: E402


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds each chunk a client sends for `delay_s` before passing it on:
    every HTTP request then costs a round trip, as it does against a bucket across a network."""

    def __init__(self, target_port: int, delay_s: float):
        self.target, self.delay_s = target_port, delay_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, self.delay_s), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, 0.0), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        try:
            while data := src.recv(1 << 16):
                if delay_s:
                    time.sleep(delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def end_of_run(spec, store, shards: list[int], threads: int) -> float:
    from ray_consensus.contract import count_errors
    from ray_consensus.tables import write_tables

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--members", type=int, default=26)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added per request by the proxy")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from ray_consensus.config import parse_spec
    from ray_consensus.contract import MANIFEST_ERRORS_FILE, errors_table, file_of, member_errors_file
    from ray_consensus.storage import S3Store

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
        default = S3Store.read_threads
        compare("s3_end_of_run_read_ahead_vs_sequential", spec, store, shards, default, args.rounds)
        proxy = DelayProxy(server.port, args.delay_ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{proxy.port}"
        compare(f"s3_end_of_run_read_ahead_vs_sequential_{args.delay_ms:g}ms_round_trip", spec,
                S3Store("s3://bench/run"), shards, default, args.rounds)
    finally:
        server.stop(keep_state=False)


if __name__ == "__main__":
    main()
