"""Throughput of `RedisClusterStore` against redis-benchmark on the same cluster, same run.

    python -m benchmarks.store_bench [--seeds H:P,...] [--password P] [--json] [--seconds S]

Without --seeds a 6-node cluster is started with `deploy/redis-cluster up --base-port 7500`
and stopped at the end. Rounds alternate A B A B: every flowstate measurement (pin and
lookup at batch 1, 64 and 512), then `redis-benchmark --cluster -P 64 -c 50 -t set,get`;
the table shows medians over rounds and the ratio flowstate flows/s ÷ redis-benchmark ops/s.

Workload: distinct random IPv4 flows, 40-byte records, TTL 10 min. `pin` pins flows that
are not in the store (each is a real SET NX PX GET that stores); `lookup` reads flows that
are (every GET hits and decodes a record). The store is flushed before each round. Several
batches are in flight at once (`--tasks`, per batch size: one asyncio task each, sharing the
store's one connection per master), each call with a 1 s deadline: this measures throughput,
not the 5 ms lookup deadline a forwarder uses. Runs under uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from flowstate.errors import StoreUnavailable
from flowstate.flow import FiveTuple, Proto
from flowstate.record import FlowRecord
from flowstate.store.base import PinItem, StoreConfig
from flowstate.store.redis_cluster import RedisClusterStore

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 64, 512)
DEFAULT_TASKS = {1: 128, 64: 16, 512: 12}
TTL_MS = 600_000
CALL_DEADLINE_MS = 1000.0


def store_config(deadline_ms: float) -> StoreConfig:
    return StoreConfig(
        lookup_deadline_ms=deadline_ms,
        write_deadline_ms=deadline_ms,
        connect_timeout_ms=2000,
    )


#: Share of one core this process used during each measurement (appended by `run_for`).
_cpu_share: list[float] = []
_RB_LINE = re.compile(r"\b(SET|GET): ([\d.]+) requests per second")


def parse_seeds(text: str) -> list[tuple[str, int]]:
    seeds = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit(f"--seeds: {item!r} is not host:port")
        seeds.append((host.strip("[]"), int(port)))
    return seeds


def make_flows(n: int, seed: int) -> tuple[list[FiveTuple], list[FlowRecord]]:
    rng = random.Random(seed)
    ts = [
        FiveTuple(Proto.TCP, rng.randbytes(4), rng.randrange(1024, 65536), rng.randbytes(4), 443)
        for _ in range(n)
    ]
    recs = [
        FlowRecord(rng.randbytes(16), rng.randbytes(4), 1_700_000_000_000 + i, "bench")
        for i in range(n)
    ]
    return ts, recs


@dataclass
class Measurement:
    op: str
    batch: int
    tasks: int
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


async def run_for(
    call: Callable[[int, int], Awaitable[object]],
    total: int,
    batch: int,
    tasks: int,
    seconds: float,
) -> tuple[float, int, int]:
    """`tasks` workers call `call(start, stop)` on consecutive slices of [0, total) until
    `seconds` pass or the items run out; return (items/s, errors, items consumed)."""
    next_start = 0
    done = 0
    errors = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal next_start, done, errors
        while time.perf_counter() < end:
            start = next_start
            if start + batch > total:
                return
            next_start = start + batch
            try:
                await call(start, start + batch)
                done += batch
            except StoreUnavailable:
                errors += 1

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    wall = time.perf_counter() - t0
    _cpu_share.append((time.process_time() - cpu0) / wall)
    return done / wall, errors, next_start


async def measure_store(
    store: RedisClusterStore,
    ts: list[FiveTuple],
    items: list[PinItem],
    batches: Sequence[int],
    tasks: dict[int, int],
    seconds: float,
    results: dict[tuple[str, int], Measurement],
    tag: str = "",
) -> None:
    """One round: for each batch size, pin fresh flows, then look those up (cyclically)."""
    offset = 0
    for batch in batches:
        n_tasks = tasks[batch]

        async def pin(a: int, b: int, base: int = offset) -> None:
            await store.pin_many(items[base + a : base + b])

        rate, errs, used = await run_for(pin, len(items) - offset, batch, n_tasks, seconds)
        record(results, f"pin{tag}", batch, n_tasks, rate, errs)
        # Whole batches of the flows just pinned, cycled through as often as time allows.
        n_pinned = used - used % batch

        async def lookup(a: int, b: int, base: int = offset, n: int = n_pinned) -> None:
            start = base + a % n
            await store.lookup_many(ts[start : start + (b - a)])

        offset += used

        rate, errs, _ = await run_for(lookup, 1 << 62, batch, n_tasks, seconds)
        record(results, f"lookup{tag}", batch, n_tasks, rate, errs)


def record(
    results: dict[tuple[str, int], Measurement],
    op: str,
    batch: int,
    tasks: int,
    rate: float,
    errors: int,
) -> None:
    m = results.setdefault((op, batch), Measurement(op, batch, tasks))
    m.rates.append(rate)
    m.cpu.append(_cpu_share[-1])
    m.errors += errors


#: redis-benchmark's default run touches one key per master with 3-byte values; this variant
#: (random keys among 1e8, 40-byte values, as big as a record) is closer to flowstate's work.
LIKE_FOR_LIKE = ("-r", "100000000", "-d", "40")


def redis_benchmark(
    seeds: list[tuple[str, int]], password: str | None, requests: int, extra: Sequence[str] = ()
) -> dict[str, float]:
    host, port = seeds[0]
    cmd = ["redis-benchmark", "--cluster", "-h", host, "-p", str(port)]
    cmd += ["-P", "64", "-c", "50", "-t", "set,get", "-n", str(requests), "-q", *extra]
    if password:
        cmd += ["-a", password]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = {m.group(1).lower(): float(m.group(2)) for m in _RB_LINE.finditer(proc.stdout)}
    if proc.returncode != 0 or set(found) != {"set", "get"}:
        raise SystemExit(f"redis-benchmark failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return found


def deploy(*args: str, password: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_REDIS_")}
    env["FLOWSTATE_REDIS_PASSWORD"] = password
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "redis-cluster"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"deploy/redis-cluster {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
        )


async def flush(store: RedisClusterStore) -> None:
    await store._rc.flushall(target_nodes="primaries")


async def bench(args: argparse.Namespace, seeds: list[tuple[str, int]]) -> dict[str, Any]:
    tasks = dict(DEFAULT_TASKS)
    for spec in args.tasks or []:
        b, _, n = spec.partition("=")
        tasks[int(b)] = int(n)
    config = store_config(args.deadline_ms)
    store = await RedisClusterStore.connect(seeds, password=args.password, config=config)
    reference = await RedisClusterStore.connect(
        seeds, password=args.password, config=config, fast_path=False
    )
    # Fresh flows for the pin measurements of a round (~1M/s in all; a measurement that
    # runs out stops early, its rate is still items / elapsed time).
    n_flows = int(1_000_000 * args.seconds) + 10_000
    log(f"generating {n_flows:,} flows ...")
    ts, recs = make_flows(n_flows, 1)
    items: list[PinItem] = [(t, r, TTL_MS) for t, r in zip(ts, recs, strict=True)]
    # Millions of long-lived flows would make every full GC pass walk them all (lookups
    # allocate a record per hit, so collections are frequent): park them out of its way,
    # as a long-running forwarder would with its startup state.
    gc.collect()
    gc.freeze()
    results: dict[tuple[str, int], Measurement] = {}
    rb: dict[str, list[float]] = {"set": [], "get": [], "set_rand": [], "get_rand": []}
    try:
        for rnd in range(args.rounds):
            await flush(store)
            await measure_store(store, ts, items, BATCHES, tasks, args.seconds, results)
            if args.reference and rnd == 0:
                await flush(store)
                await measure_store(
                    reference, ts, items, (512,), tasks, args.seconds, results, tag="(redis-py)"
                )
            await flush(store)
            got = await asyncio.to_thread(redis_benchmark, seeds, args.password, args.requests)
            rb["set"].append(got["set"])
            rb["get"].append(got["get"])
            await flush(store)
            rand = await asyncio.to_thread(
                redis_benchmark, seeds, args.password, args.requests, LIKE_FOR_LIKE
            )
            rb["set_rand"].append(rand["set"])
            rb["get_rand"].append(rand["get"])
            log(
                f"round {rnd + 1}/{args.rounds}: "
                + ", ".join(f"{m.op}@{m.batch}={m.rates[-1]:,.0f}/s" for m in results.values())
                + f", redis-benchmark SET={got['set']:,.0f} GET={got['get']:,.0f}"
                + f" (with {' '.join(LIKE_FOR_LIKE)}: SET={rand['set']:,.0f}"
                + f" GET={rand['get']:,.0f})"
            )
        await flush(store)
        counters = dict(store.counters)
    finally:
        await store.close()
        await reference.close()
    rb_set, rb_get = statistics.median(rb["set"]), statistics.median(rb["get"])
    rand_set, rand_get = statistics.median(rb["set_rand"]), statistics.median(rb["get_rand"])
    rows = []
    for m in results.values():
        base = rb_set if m.op.startswith("pin") else rb_get
        rows.append(
            {
                "op": m.op,
                "batch": m.batch,
                "tasks": m.tasks,
                "flows_per_s": round(m.median),
                "all_rounds": [round(r) for r in m.rates],
                "errors": m.errors,
                "client_cpu": round(statistics.median(m.cpu), 2),
                "ratio": round(m.median / base, 3),
                "ratio_like_for_like": round(
                    m.median / (rand_set if m.op.startswith("pin") else rand_get), 3
                ),
            }
        )
    pin512 = results[("pin", 512)].median
    lookup512 = results[("lookup", 512)].median
    return {
        "loop": "uvloop",
        "rounds": args.rounds,
        "seconds": args.seconds,
        "call_deadline_ms": args.deadline_ms,
        "redis_benchmark": {
            "command": f"redis-benchmark --cluster -P 64 -c 50 -t set,get -n {args.requests} -q",
            "set_ops_per_s": round(rb_set),
            "get_ops_per_s": round(rb_get),
            "set_all_rounds": [round(x) for x in rb["set"]],
            "get_all_rounds": [round(x) for x in rb["get"]],
            "like_for_like_options": " ".join(LIKE_FOR_LIKE),
            "like_for_like_set_ops_per_s": round(rand_set),
            "like_for_like_get_ops_per_s": round(rand_get),
        },
        "results": rows,
        "pin_ratio": round(pin512 / rb_set, 3),
        "lookup_ratio": round(lookup512 / rb_get, 3),
        "pin_ratio_like_for_like": round(pin512 / rand_set, 3),
        "lookup_ratio_like_for_like": round(lookup512 / rand_get, 3),
        "store_counters": counters,
    }


def table(report: dict[str, Any]) -> str:
    rb = report["redis_benchmark"]
    lines = [
        f"{'op':<18}{'batch':>6}{'tasks':>6}{'flows/s':>12}{'redis-benchmark':>18}{'ratio':>7}"
        f"{'-r/-d 40 run':>16}{'ratio':>7}{'cpu':>6}",
    ]
    for r in report["results"]:
        pin = r["op"].startswith("pin")
        base = rb["set_ops_per_s"] if pin else rb["get_ops_per_s"]
        rand = rb["like_for_like_set_ops_per_s"] if pin else rb["like_for_like_get_ops_per_s"]
        name = "SET" if pin else "GET"
        lines.append(
            f"{r['op']:<18}{r['batch']:>6}{r['tasks']:>6}{r['flows_per_s']:>12,}"
            f"{f'{name} {base:,}':>18}{r['ratio']:>7.3f}{f'{name} {rand:,}':>16}"
            f"{r['ratio_like_for_like']:>7.3f}{r['client_cpu']:>6.2f}"
        )
    lines.append(
        f"medians of {report['rounds']} rounds of {report['seconds']} s, A B A B with "
        f"`{rb['command']}` (SET rounds {rb['set_all_rounds']}, GET rounds {rb['get_all_rounds']})"
    )
    lines.append(
        f"pin_ratio={report['pin_ratio']}  lookup_ratio={report['lookup_ratio']}  (like for like"
        f" with `{rb['like_for_like_options']}`: pin {report['pin_ratio_like_for_like']},"
        f" lookup {report['lookup_ratio_like_for_like']})"
    )
    return "\n".join(lines)


_quiet = False


def log(msg: str) -> None:
    if not _quiet:
        print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    global _quiet
    p = argparse.ArgumentParser(prog="python -m benchmarks.store_bench", description=__doc__)
    p.add_argument("--seeds", help="host:port,... of a running cluster (default: start one)")
    p.add_argument("--password", default=None, help="Redis password")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds (default 3)")
    p.add_argument("--requests", type=int, default=2_000_000, help="redis-benchmark -n")
    p.add_argument("--tasks", action="append", metavar="BATCH=N", help="concurrent calls")
    p.add_argument(
        "--deadline-ms",
        type=float,
        default=CALL_DEADLINE_MS,
        help="deadline of every store call (default 1000: throughput, not latency)",
    )
    p.add_argument("--base-port", type=int, default=7500, help="of the cluster started here")
    p.add_argument("--no-reference", dest="reference", action="store_false")
    args = p.parse_args(argv)
    _quiet = args.json
    started: tuple[str, ...] | None = None
    if args.seeds:
        seeds = parse_seeds(args.seeds)
    else:
        args.password = args.password or "flowstate-bench"
        workdir = tempfile.mkdtemp(prefix="flowstate-bench-")
        started = ("--base-port", str(args.base_port), "--dir", workdir)
        log(f"starting a cluster on ports {args.base_port}..{args.base_port + 5} ...")
        deploy("up", *started, password=args.password)
        seeds = [("127.0.0.1", args.base_port + i) for i in range(6)]
    try:
        report = uvloop.run(bench(args, seeds))
    finally:
        if started is not None:
            log("stopping the cluster ...")
            deploy("down", *started, password=args.password)
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
