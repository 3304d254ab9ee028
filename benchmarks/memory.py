"""Bytes per flow: the forwarder's local flow table (C and Python) and the pinning in Redis.

Local table: RSS growth of a fresh process whose Engine of capacity 1M (Python: 100k with
--quick) took as many distinct SYNs as it has slots, against the same with capacity 1k: the
table's bytes per slot, and the C `entry_size`. The table's memory is fixed, but it holds
fewer flows than it has slots (8-slot buckets evict before they are all full), so the figure
the target applies to is bytes per flow *held* (`len(engine)`), measured at two points:

* at capacity: after as many distinct flow starts as the configured capacity (never more);
* at the eviction onset: after the first batch of 1024 flow starts in which at least 1% of the
  new flows evicted a held one (`memory_probe.ONSET_RATE`); the very first eviction (reported
  too) comes earlier, one unlucky pair of buckets, and says little about the usable fill.

Bytes per held flow = bytes per slot x slots / flows held. Each measurement runs in its own
process (`memory_probe engine`).

Redis: a 6-node cluster (3 masters, 1 replica each) from `deploy/redis-cluster up
--base-port 7600`, stopped at the end. `INFO memory` used_memory summed over the masters
before and after pinning N flows (1M, --quick 100k) through `RedisClusterStore.pin_many`,
divided by N. Then the same number of flows written raw in other layouts (`VARIANTS` in
`memory_probe`): what a shorter value, a shorter key, no TTL or hash buckets would cost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import snapshot
from benchmarks.framework import (
    Benchmark,
    BenchmarkError,
    Context,
    Plan,
    Report,
    RunOptions,
    register,
)

REDIS_BASE_PORT = 7600
REDIS_NODES = 6
TARGETS = {"local_bytes_per_flow": 64, "redis_bytes_per_flow": 128}
#: Variants measured with --quick (all of them otherwise); see memory_probe.VARIANTS.
QUICK_VARIANTS = ("as_pinned", "compact_value_short_key", "no_ttl", "hash_buckets")
ALL_VARIANTS = (
    "as_pinned",
    "packed_value",
    "compact_value",
    "short_key",
    "compact_value_short_key",
    "no_ttl",
    "hash_buckets",
)
SMALL_CAPACITY = 1000


def _sizes(options: RunOptions) -> dict[str, int]:
    return {
        "c": 1_000_000,
        "python": 100_000 if options.quick else 1_000_000,
        "redis": 100_000 if options.quick else 1_000_000,
    }


def _probe(tree: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_probe", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONPATH": snapshot.pythonpath(tree)},
        timeout=900,
    )
    if proc.returncode != 0:
        raise BenchmarkError(f"memory_probe {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def _engine_costs(small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    def growth(r: dict[str, Any]) -> int:
        return int(r["rss_filled"]) - int(r["rss_start"])

    d_rss = growth(big) - growth(small)
    slots = int(big["slots"])
    d_slots = slots - int(small["slots"])
    per_slot = d_rss / d_slots
    table = per_slot * slots  # the big table's bytes
    held = int(big["live_flows"])
    onset_held = int(big.get("onset_held", 0))
    first_held = int(big.get("first_eviction_held", 0))
    return {
        "entry_size": big["entry_size"],
        "capacity": slots,
        "live_flows": held,
        "occupancy": round(held / slots, 3),
        "bytes_per_slot": round(per_slot, 1),
        "bytes_per_flow": round(table / held, 1),
        "onset": {
            "offered": big.get("onset_offered", 0),
            "held": onset_held,
            "occupancy": round(onset_held / slots, 3),
            "bytes_per_flow": round(table / onset_held, 1) if onset_held else None,
        },
        "first_eviction": {
            "offered": big.get("first_eviction_offered", 0),
            "held": first_held,
            "occupancy": round(first_held / slots, 3),
        },
        "evicted": big.get("evicted", 0),
        "rss_growth_bytes": {str(small["slots"]): growth(small), str(big["slots"]): growth(big)},
        "fill_seconds": big["fill_seconds"],
    }


def _worst_per_flow(r: dict[str, Any]) -> float:
    """Bytes per flow held: the worse of the two points (at capacity, at the onset)."""
    onset = r["onset"]["bytes_per_flow"]
    return float(max(r["bytes_per_flow"], onset if onset is not None else 0))


@contextlib.contextmanager
def redis_cluster(password: str) -> Iterator[str]:
    """A fresh cluster on REDIS_BASE_PORT for the block; yields the seeds "h:p,h:p,..."."""
    # Not ".flowstate-bench-redis-PORT.lock": deploy/redis-cluster locks that one itself.
    lock_path = f"/tmp/.flowstate-bench-session-{REDIS_BASE_PORT}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchmarkError(
                f"another benchmark run holds {lock_path} (port {REDIS_BASE_PORT})"
            ) from None
        workdir = Path(f"/tmp/flowstate-bench-redis-{REDIS_BASE_PORT}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_REDIS_")}
        env["FLOWSTATE_REDIS_PASSWORD"] = password
        where = ["--base-port", str(REDIS_BASE_PORT), "--dir", str(workdir)]

        def deploy(*args: str) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, str(snapshot.REPO / "deploy" / "redis-cluster"), *args, *where]
            try:
                return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
            except subprocess.TimeoutExpired as exc:
                raise BenchmarkError(f"deploy/redis-cluster {args[0]} timed out: {exc}") from None

        deploy("down")  # we hold the lock: whatever is there is an orphan of a dead run
        try:
            up = deploy("up", "--nodes", str(REDIS_NODES), "--timeout", "90")
            if up.returncode != 0:
                raise BenchmarkError(f"deploy/redis-cluster up failed:\n{up.stdout}{up.stderr}")
            yield ",".join(f"127.0.0.1:{REDIS_BASE_PORT + i}" for i in range(REDIS_NODES))
        finally:
            deploy("down")
    finally:
        os.close(fd)


@register
class MemoryBenchmark(Benchmark):
    name = "memory"
    summary = "bytes per flow: local flow table (C, Python) and Redis Cluster (pin_many)"

    def plan(self, options: RunOptions) -> Plan:
        sizes = _sizes(options)
        variants = QUICK_VARIANTS if options.quick else ALL_VARIANTS
        seconds = 5 + 3 + sizes["python"] / 45_000 + 8 + sizes["redis"] / 50_000
        seconds += len(variants) * (1.5 + sizes["redis"] / 60_000)
        return Plan(steps=4 + 2 + len(variants), seconds=seconds)

    def run(self, ctx: Context) -> Report:
        from shutil import which

        if which("redis-server") is None or which("redis-cli") is None:
            raise BenchmarkError("memory needs redis-server and redis-cli (apt-get install ...)")
        tree = snapshot.snapshot()
        sizes = _sizes(ctx.options)
        local: dict[str, Any] = {}
        for impl in ("c", "python"):
            runs = []
            for capacity in (SMALL_CAPACITY, sizes[impl]):
                args = ["engine", "--impl", impl, "--capacity", str(capacity)]
                runs.append(_probe(tree, *args, "--flows", str(capacity)))
                ctx.step(
                    f"{impl} engine, capacity {capacity:,}: RSS +"
                    f"{(runs[-1]['rss_filled'] - runs[-1]['rss_start']) / 1e6:.1f} MB, "
                    f"{runs[-1]['live_flows']:,} live flows"
                )
            local[impl] = _engine_costs(runs[0], runs[1])
        password = secrets.token_hex(12)
        env = {"FLOWSTATE_BENCH_REDIS_PASSWORD": password}
        variants = QUICK_VARIANTS if ctx.options.quick else ALL_VARIANTS
        n = sizes["redis"]
        with redis_cluster(password) as seeds:
            ctx.step(f"Redis Cluster up on port {REDIS_BASE_PORT} ({REDIS_NODES} nodes)")
            pinned = _probe(tree, "redis", "--seeds", seeds, "--flows", str(n), env=env)
            ctx.step(
                f"pin_many of {n:,} flows: {pinned['bytes_per_flow_masters']} B/flow on the "
                f"masters ({pinned['write_seconds']} s)"
            )
            measured: dict[str, dict[str, Any]] = {}
            for v in variants:
                args = ["redis", "--seeds", seeds, "--flows", str(n), "--variant", v]
                measured[v] = _probe(tree, *args, env=env)
                ctx.step(f"layout {v}: {measured[v]['bytes_per_flow_masters']} B/flow")
        return build_report(local, pinned, measured, sizes)


def build_report(
    local: dict[str, Any],
    pinned: dict[str, Any],
    variants: dict[str, dict[str, Any]],
    sizes: dict[str, int],
) -> Report:
    base = variants.get("as_pinned", pinned)
    redis: dict[str, Any] = {
        "flows": pinned["flows"],
        "bytes_per_flow": pinned["bytes_per_flow_masters"],
        "bytes_per_flow_all_nodes": pinned["bytes_per_flow_all_nodes"],
        "masters": pinned["masters"],
        "replicas": pinned["replicas"],
        "key_length": pinned["key_length"],
        "value_length": pinned["value_length"],
        "hashtable_main_bytes_per_key": pinned["hashtable_main_bytes_per_key"],
        "hashtable_expires_bytes_per_key": pinned["hashtable_expires_bytes_per_key"],
        "breakdown": pinned.get("breakdown", {}),
        "pin_seconds": pinned["write_seconds"],
        "variants": {
            name: {
                "bytes_per_flow": v["bytes_per_flow_masters"],
                "saving_vs_as_pinned": round(
                    base["bytes_per_flow_masters"] - v["bytes_per_flow_masters"], 1
                ),
                "key_length": v["key_length"],
                "value_length": v["value_length"],
                "hashtable_main_bytes_per_key": v["hashtable_main_bytes_per_key"],
                "hashtable_expires_bytes_per_key": v["hashtable_expires_bytes_per_key"],
            }
            for name, v in variants.items()
        },
    }
    data: dict[str, Any] = {
        "local": local,
        "redis": redis,
        "local_bytes_per_flow": _worst_per_flow(local["c"]),
        "redis_bytes_per_flow": redis["bytes_per_flow"],
        "targets": TARGETS,
        "setup": {
            "engine_capacities": {k: [SMALL_CAPACITY, sizes[k]] for k in ("c", "python")},
            "redis_flows": sizes["redis"],
            "redis": "deploy/redis-cluster, 3 masters + 3 replicas, Redis 7 cluster mode",
        },
    }
    headers = ["what", "bytes/flow", "detail"]
    rows = []
    for impl in ("c", "python"):
        r = local[impl]
        onset, first = r["onset"], r["first_eviction"]
        rows.append(
            [
                f"local table, {impl}",
                f"{r['bytes_per_flow']} per held flow at capacity; "
                f"{onset['bytes_per_flow']} at the eviction onset",
                f"{r['bytes_per_slot']} per slot (entry_size {r['entry_size']}); capacity "
                f"{r['capacity']:,}: {r['occupancy']:.1%} held after {r['capacity']:,} flow "
                f"starts; onset (1% of a batch's new flows evict) at {onset['occupancy']:.1%} "
                f"held; first eviction at {first['occupancy']:.1%}",
            ]
        )
    bd = redis["breakdown"]
    rows.append(
        [
            "Redis, pin_many",
            f"{redis['bytes_per_flow']} (masters)",
            f"{redis['bytes_per_flow_all_nodes']} with replicas; key {redis['key_length']} B, "
            f"value {redis['value_length']} B ({', '.join(bd.get('encodings', {}))}); hash "
            f"tables main {redis['hashtable_main_bytes_per_key']} + expires "
            f"{redis['hashtable_expires_bytes_per_key']} B/key; MEMORY USAGE "
            f"{bd.get('memory_usage_mean', '?')}",
        ]
    )
    for name, v in redis["variants"].items():
        rows.append(
            [
                f"Redis layout {name}",
                str(v["bytes_per_flow"]),
                f"key {v['key_length']} B, value {v['value_length']} B, saves "
                f"{v['saving_vs_as_pinned']:.1f} B/flow against as_pinned",
            ]
        )
    c = local["c"]
    worst = _worst_per_flow(c)
    notes = [
        f"target local <= {TARGETS['local_bytes_per_flow']} B per flow held: C "
        f"{'meets' if worst <= TARGETS['local_bytes_per_flow'] else 'MISSES'} it ({worst}, "
        f"the worse of {c['bytes_per_flow']} at capacity and {c['onset']['bytes_per_flow']} at "
        f"the eviction onset; {c['bytes_per_slot']} B per slot, entry_size {c['entry_size']}); "
        f"Python {local['python']['bytes_per_slot']} B per slot",
        "per flow held = the table's RSS / len(engine); at capacity: after as many distinct "
        "flow starts as slots; eviction onset: after the first batch of 1024 in which >= 1% "
        "of the new flows evicted one",
        f"target Redis <= {TARGETS['redis_bytes_per_flow']} B/flow: "
        f"{'meets' if redis['bytes_per_flow'] <= TARGETS['redis_bytes_per_flow'] else 'MISSES'}"
        f" ({redis['bytes_per_flow']} on the masters, replicas double it)",
        "layouts other than as_pinned are raw SETs/HSETs of the same flows, to price a "
        "different encoding; hash_buckets has no per-flow TTL on Redis 7.0",
        f"DEBUG OBJECT: {bd.get('debug_object', 'not tried')}"[:200],
    ]
    return Report("memory", data, headers, rows, notes)
