"""Tiling's finalize of a store on S3 as a pod runs it: the wall time of `sarflow tile-finalize` when
every request to the object store pays a network round trip, this checkout against an anchor commit,
side by side in one run.

    .venv/bin/python benchmarks/bench_finalize_s3.py [--anchor REV] [--size 2048] [--latency-ms 20] [--rounds 3]

Finalize reads three small files per unit (its rows of chips.parquet, its train chips' sums, its
report) and a continental build has hundreds of thousands of units, so on S3 its wall time is the
requests' latency, not CPU. The S3 server is moto on 127.0.0.1 behind a TCP proxy in this process that
holds every chunk a client sends for `--latency-ms` before passing it on: each request pays about one
round trip, as from a pod to S3 in its region (10-30 ms to the first byte of a small object). The
units are built once per code version straight on moto (the anchor's own units, its src from a
`git worktree`); every round copies the build to a new prefix and runs finalize on it in a separate
process through the proxy. Reports the medians of wall and CPU seconds and their ratios. Writes
benchmarks/results/finalize_s3.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from anchored import CHILD_HEAD, ROOT, anchor_worktree, build_store, median, scene_catalog, version_child
from machine import git_commit, host, write_result


# a child (PYTHONPATH: the version's src/): build the units, or finalize and report wall and CPU
CHILD = CHILD_HEAD + r"""
elif step == "finalize":
    from sarflow.data.tile_units import finalize
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finalize(store)
    w1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"finalize_wall_s": w1 - w0,
                      "finalize_cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime}))
"""


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 in a thread of this process: every chunk a client sends waits `latency`
    seconds before it goes on to `upstream` (host, port); answers go back at once."""

    def __init__(self, upstream: tuple[str, int], latency: float):
        self.upstream, self.latency, self.delayed = upstream, latency, 0  # chunks held so far
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise SystemExit("the latency proxy did not start on 127.0.0.1")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        started.set()
        self.loop.run_forever()

    async def _serve(self, client_r, client_w) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()  # the client sees its connection refused, as it would without the proxy
            return

        async def pump(reader, writer, delay: float) -> None:
            try:
                while data := await reader.read(1 << 16):
                    if delay:
                        self.delayed += 1
                        await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pump(client_r, server_w, self.latency), pump(server_r, client_w, 0.0))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _measure(versions: dict[str, Path], args, url: str, proxy: LatencyProxy, tmp: Path) -> tuple[dict, dict]:
    """Builds each version's units on moto (straight, not through the proxy), then finalizes a copy of
    each build `args.rounds` times through the proxy, the versions interleaved: (built, rounds)."""
    from sarflow.data.storage import ensure_bucket, s3_filesystem

    ensure_bucket("bench")
    fs = s3_filesystem()
    catalog = scene_catalog(tmp / "scene", args.size, args.chip_size)
    built = {name: build_store(CHILD, src, f"s3://bench/{name}.zarr", catalog, env={"AWS_ENDPOINT_URL": url},
                               workers=2, shard_chips=16, unit_shards=1) for name, src in versions.items()}
    rounds = {name: [] for name in versions}
    for r in range(args.rounds):
        for name, src in versions.items():  # interleaved: both versions under the same load
            copy = f"bench/{name}-{r}.zarr"
            files = fs.find(f"bench/{name}.zarr")  # objects only (a recursive copy PUTs "folders" too)
            fs.copy(files, [copy + f[len(f"bench/{name}.zarr"):] for f in files])
            delayed = proxy.delayed
            rounds[name].append({**version_child(CHILD, src, "finalize", "s3://" + copy,
                                                 env={"AWS_ENDPOINT_URL": proxy.url}),
                                 "requests_delayed": proxy.delayed - delayed})
            fs.rm(copy, recursive=True)
            print(f"round {r} {name}: {rounds[name][-1]}", flush=True)
    return built, rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchor", default="05abd9d", help="the commit to compare with (its src/ in a git worktree)")
    ap.add_argument("--size", type=int, default=2048, help="synthetic scene side in pixels")
    ap.add_argument("--chip-size", type=int, default=32, help="chip side in pixels (units of one 16-chip shard)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="held per chunk a client sends to S3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finalize_s3.json")
    args = ap.parse_args()

    from sarflow.local.services import start_s3, stop

    tmp = Path(tempfile.mkdtemp(prefix="bench_finalize_s3_"))
    os.environ.pop("SARFLOW_S3_ENDPOINT", None)  # it would win over AWS_ENDPOINT_URL: not moto, not the proxy
    moto, url = start_s3(tmp / "moto.log")
    proxy = None
    try:
        os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
        proxy = LatencyProxy(("127.0.0.1", int(url.rsplit(":", 1)[1])), args.latency_ms / 1000)
        with anchor_worktree(args.anchor, tmp / "anchor") as anchor_src:
            built, rounds = _measure({"anchor": anchor_src, "this": ROOT / "src"}, args, url, proxy, tmp)
    finally:
        if proxy is not None:
            proxy.close()
        stop(moto)
        subprocess.run(["rm", "-rf", str(tmp)])

    medians = {name: {k: round(median([x[k] for x in rs]), 3) for k in rs[0]} for name, rs in rounds.items()}
    result = {
        "benchmark": "bench_finalize_s3", "machine": host(), "git_commit": git_commit(ROOT), "anchor": args.anchor,
        "scene_px": args.size, "chip_size": args.chip_size, "latency_ms": args.latency_ms, "rounds": rounds,
        "units": built["this"]["units"], "chips": built["this"]["chips"], "medians": medians,
        "wall_ratio_this_over_anchor": round(medians["this"]["finalize_wall_s"] / medians["anchor"]["finalize_wall_s"], 3),
        "cpu_ratio_this_over_anchor": round(medians["this"]["finalize_cpu_s"] / medians["anchor"]["finalize_cpu_s"], 3),
        "note": "moto on 127.0.0.1 behind a proxy holding each chunk (up to 64 KiB) a client sends for latency_ms: "
                "about one round trip per small request, more for an upload, none for opening a connection; "
                "finalize in its own process, wall and CPU of the finalize call; requests_delayed: chunks held",
    }
    write_result(args.out, result, hide=("machine", "rounds"))


if __name__ == "__main__":
    sys.exit(main())
