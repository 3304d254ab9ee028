"""Child processes of the memory benchmark (run on the snapshot's PYTHONPATH); each prints
one JSON line.

    python -m benchmarks.memory_probe engine --impl c|python --capacity N --flows M

RSS growth of one Engine of `capacity` slots after `flows` TCP SYNs of distinct flows went
through `process()` (each becomes a table entry, exactly as on the data path), in batches of
BATCH; after each batch the `evicted` counter tells where evictions began: the first eviction,
and the onset (the first batch in which ONSET_RATE of the new flows evicted a held one), with
the flows held (`len(engine)`) at both points.

    python -m benchmarks.memory_probe redis --seeds H:P,... --flows N [--variant NAME]

`INFO memory` used_memory summed over the masters (and the replicas) before and after
writing N flows: without --variant through `RedisClusterStore.pin_many` (what the forwarder
does), with one raw SETs of a changed key or value layout (see `VARIANTS`), to measure what a
different encoding would save. The password comes from $FLOWSTATE_BENCH_REDIS_PASSWORD.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import struct
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from flowstate.flow import key_slot

SOURCE6 = bytes.fromhex("fd000020000000000000000000000001")
BACKEND6 = bytes.fromhex("fd00000b000000000000000000000001")
VIP4 = bytes([192, 0, 2, 10])
VIP_PORT = 80
BATCH = 1024
#: Evictions "begin" (the onset) in the first batch of BATCH distinct SYNs in which at least
#: this share of the new flows evicted a held one: the very first eviction comes much earlier
#: (one unlucky bucket) and says nothing about how full the table can be used.
ONSET_RATE = 0.01
_PAGE = os.sysconf("SC_PAGE_SIZE")
# Ethernet (dst, src, IPv4) + IPv4 (TCP, to the VIP) + TCP SYN; client address/port filled in.
_FRAME = struct.Struct("!6s6sH BBHHHBBH4s4s HHIIBBHHH")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def syn_frames(flows: int) -> Iterator[list[bytes]]:
    """Batches of SYN frames of `flows` distinct flows (client 10.0.0.0 + i, port 1024 + i %
    60000 so that both vary)."""
    pack = _FRAME.pack
    mac_a, mac_b = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
    batch: list[bytes] = []
    for i in range(flows):
        client = (0x0A000000 + i).to_bytes(4, "big")
        batch.append(
            pack(
                mac_a,
                mac_b,
                0x0800,
                0x45,
                0,
                40,
                0,
                0x4000,
                64,
                6,
                0,
                client,
                VIP4,
                1024 + i % 60000,
                VIP_PORT,
                i,
                0,
                0x50,
                0x02,
                65535,
                0,
                0,
            )
        )
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def probe(impl: str, capacity: int, flows: int) -> dict[str, int | float | str]:
    from forwarder.fastpath import load_engine

    engine_cls = load_engine(impl)
    gc.collect()
    rss_start = rss()
    engine = engine_cls(
        source_ipv6=SOURCE6,
        capacity=capacity,
        tcp_idle_ms=300_000,
        udp_idle_ms=30_000,
        fin_linger_ms=10_000,
        touch_interval_ms=75_000,
    )
    engine.set_backend(0, BACKEND6)
    engine.set_vip(0, VIP4, VIP_PORT, 6)
    engine.set_maglev(0, array("H", [0] * 251).tobytes())
    gc.collect()
    rss_created = rss()
    started = time.perf_counter()
    now_ms = 1_000_000
    offered = evicted = 0
    first_eviction: dict[str, int] = {}
    onset: dict[str, int] = {}
    for batch in syn_frames(flows):
        engine.process(batch, now_ms)
        offered += len(batch)
        total = engine.counters()["evicted"]
        if total and not first_eviction:
            first_eviction = {"offered": offered, "held": len(engine)}
        # Onset: the first batch in which at least ONSET_RATE of the new flows evicted one.
        if not onset and total - evicted >= ONSET_RATE * len(batch):
            onset = {"offered": offered, "held": len(engine), "evicted": total}
        evicted = total
    elapsed = time.perf_counter() - started
    gc.collect()
    counters = engine.counters()
    return {
        "impl": impl,
        "rss_start": rss_start,
        "rss_created": rss_created,
        "rss_filled": rss(),
        "live_flows": len(engine),
        "slots": counters["capacity"],
        "new": counters["new"],
        "evicted": counters["evicted"],
        "first_eviction_offered": first_eviction.get("offered", 0),
        "first_eviction_held": first_eviction.get("held", 0),
        "onset_offered": onset.get("offered", 0),
        "onset_held": onset.get("held", 0),
        "entry_size": int(getattr(engine, "entry_size", 0)),
        "fill_seconds": round(elapsed, 3),
    }


# ---- Redis ---------------------------------------------------------------------------------

#: Key and value layouts written raw by `--variant`, against the real one ("record").
#: value: "record" = FlowRecord.encode() of a realistic record (msgpack, 40 bytes with a
#: 4-character POP id); "packed" = 22 bytes (version, backend address, created seconds, POP
#: index); "compact" = 8 bytes (backend index u16, created seconds u32, POP index u16).
#: key: "full" = b"fs1:" + 16-byte digest (FiveTuple.key()); "short" = 12 digest bytes;
#: "bucket" = HSET of the flow into one of N / BUCKET_FIELDS hashes.
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "as_pinned": ("full", "record", True),
    "packed_value": ("full", "packed", True),
    "compact_value": ("full", "compact", True),
    "short_key": ("short", "record", True),
    "compact_value_short_key": ("short", "compact", True),
    "no_ttl": ("full", "record", False),
    "hash_buckets": ("bucket", "compact", False),
}
#: "bucket" keys: flows share Redis hashes of about this many fields (12-byte digest field,
#: value as given), small enough for the listpack encoding (hash-max-listpack-entries 128).
#: Redis 7.0 has no per-field TTL (HPEXPIRE is 7.4+), so this layout measures the footprint
#: of a restructured store, not a drop-in replacement.
BUCKET_FIELDS = 64
TTL_MS = 300_000
POP = "pop1"
PIN_BATCH = 2000
PIN_TASKS = 4
RAW_CHUNK = 5000
#: Keys written (and flushed) before measuring, to grow the replication buffers first.
PRIME_FLOWS = 60_000


@dataclass(frozen=True, slots=True)
class Node:
    host: str
    port: int
    master: bool


def _flows(n: int, seed: int) -> list[Any]:
    from flowstate.flow import FiveTuple, Proto

    rng = random.Random(seed)
    vip = bytes([192, 0, 2, 10])
    seen: set[tuple[bytes, int]] = set()
    out: list[Any] = []
    while len(out) < n:
        client, port = rng.randbytes(4), rng.randrange(1024, 65536)
        if (client, port) not in seen:
            seen.add((client, port))
            out.append(FiveTuple(Proto.TCP, client, port, vip, 443))
    return out


def _record() -> Any:
    from flowstate.record import FlowRecord

    return FlowRecord(BACKEND6, bytes([192, 0, 2, 10]), int(time.time() * 1000), POP)


async def _client(node: Node, password: str | None) -> Any:
    import redis.asyncio as aredis

    return aredis.Redis(host=node.host, port=node.port, password=password, socket_timeout=30)


async def _nodes(seed: tuple[str, int], password: str | None) -> list[Node]:
    c = await _client(Node(seed[0], seed[1], True), password)
    try:
        text = await c.execute_command("CLUSTER", "NODES")
    finally:
        await c.aclose()
    if isinstance(text, bytes):
        text = text.decode()
    nodes = []
    for line in str(text).splitlines():
        fields = line.split()
        flags = set(fields[2].split(","))
        if flags & {"fail", "fail?", "noaddr", "handshake"}:
            continue
        host, _, port = fields[1].split("@")[0].rpartition(":")
        nodes.append(Node(host, int(port), "master" in flags))
    return nodes


async def _used_memory(nodes: Sequence[Node], password: str | None) -> dict[str, int]:
    out = {}
    for node in nodes:
        c = await _client(node, password)
        try:
            info = await c.info("memory")
            out[f"{node.host}:{node.port}"] = int(info["used_memory"])
        finally:
            await c.aclose()
    return out


async def _call_all(nodes: Sequence[Node], password: str | None, *cmd: Any) -> list[Any]:
    out = []
    for node in nodes:
        c = await _client(node, password)
        try:
            out.append(await c.execute_command(*cmd))
        finally:
            await c.aclose()
    return out


async def _settle(nodes: Sequence[Node], password: str | None, keys: int) -> None:
    """Wait (10 s at most) until the replicas hold as many keys as the masters."""
    masters = [n for n in nodes if n.master]
    replicas = [n for n in nodes if not n.master]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = sum(await _call_all(masters, password, "DBSIZE"))
        r = sum(await _call_all(replicas, password, "DBSIZE"))
        if m == keys and r == keys * len(replicas) // max(1, len(masters)):
            return
        await asyncio.sleep(0.1)


async def _snapshot_memory(nodes: Sequence[Node], password: str | None) -> dict[str, int]:
    used = await _used_memory(nodes, password)
    return {
        "masters": sum(v for n, v in zip(nodes, used.values(), strict=True) if n.master),
        "all": sum(used.values()),
    }


async def _pin(seeds: list[tuple[str, int]], password: str | None, flows: list[Any]) -> int:
    """Pin every flow through `RedisClusterStore.pin_many` (several batches in flight, as a
    busy forwarder has); returns how many records came back."""
    from flowstate.store.base import StoreConfig
    from flowstate.store.redis_cluster import RedisClusterStore

    config = StoreConfig(write_deadline_ms=30_000, connect_timeout_ms=5_000)
    store = await RedisClusterStore.connect(seeds, password=password, config=config)
    rec = _record()
    batches = iter(range(0, len(flows), PIN_BATCH))

    async def worker() -> int:
        done = 0
        for start in batches:
            items = [(t, rec, TTL_MS) for t in flows[start : start + PIN_BATCH]]
            done += len(await store.pin_many(items))
        return done

    try:
        return sum(await asyncio.gather(*(worker() for _ in range(PIN_TASKS))))
    finally:
        await store.close()


def _value(kind: str) -> bytes:
    if kind == "record":
        return bytes(_record().encode())
    if kind == "packed":
        # version, backend address, created (Unix seconds), POP index: no msgpack framing,
        # no VIP (the key's flow already names it).
        return struct.pack("!B16sIB", 1, BACKEND6, int(time.time()), 1)
    return struct.pack("!HIH", 1, int(time.time()), 1)  # backend index, created s, POP index


def _layout(flows: Sequence[Any], key_kind: str, value_kind: str) -> tuple[list[bytes], bytes]:
    keys = [t.key() for t in flows]
    if key_kind == "short":
        keys = [k[-16:-4] for k in keys]
    return keys, _value(value_kind)


async def _slot_owners(nodes: Sequence[Node], password: str | None) -> dict[int, Node]:
    """Master of every hash slot, from CLUSTER SLOTS."""
    masters = [n for n in nodes if n.master]
    slots = await _call_all(masters[:1], password, "CLUSTER", "SLOTS")
    owner: dict[int, Node] = {}
    for start, end, primary, *_ in slots[0]:
        host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
        for slot in range(int(start), int(end) + 1):
            owner[slot] = Node(host, int(primary[1]), True)
    return owner


def _pack(*args: bytes | str | int) -> bytes:
    import hiredis

    data: bytes = hiredis.pack_command(cast(Any, args))
    return data


async def _pipeline(node: Node, password: str | None, commands: list[bytes]) -> int:
    """Send RESP `commands` on one connection, read every reply; returns the error count."""
    import hiredis

    reader, writer = await asyncio.open_connection(node.host, node.port)
    parser = hiredis.Reader()
    head = [_pack("AUTH", password)] if password else []
    errors = 0
    try:
        for i in range(0, len(commands), RAW_CHUNK):
            chunk = head + commands[i : i + RAW_CHUNK]
            head = []
            writer.write(b"".join(chunk))
            await writer.drain()
            got = 0
            while got < len(chunk):
                data = await reader.read(1 << 16)
                if not data:
                    raise ConnectionError(f"{node.host}:{node.port} closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    got += 1
                    errors += isinstance(reply, hiredis.ReplyError)
    finally:
        writer.close()
        await writer.wait_closed()
    return errors


async def _raw_set(
    nodes: Sequence[Node], password: str | None, keys: list[bytes], value: bytes, ttl: bool
) -> None:
    """SET every key on the master owning its slot, pipelined (the layout is what matters)."""
    owner = await _slot_owners(nodes, password)
    tail = ("PX", TTL_MS) if ttl else ()
    by_node: dict[Node, list[bytes]] = {}
    for key in keys:
        by_node.setdefault(owner[key_slot(key)], []).append(_pack("SET", key, value, *tail))
    await _send_all(by_node, password)


async def _raw_hset(
    nodes: Sequence[Node], password: str | None, keys: list[bytes], value: bytes
) -> None:
    """HSET each flow (its 12 last digest bytes) into one of len(keys)/BUCKET_FIELDS hashes."""
    owner = await _slot_owners(nodes, password)
    buckets = max(1, len(keys) // BUCKET_FIELDS)
    by_node: dict[Node, list[bytes]] = {}
    for key in keys:
        digest = key[-16:]
        bucket = b"fs1h:%d" % (int.from_bytes(digest[:4], "little") % buckets)
        cmd = _pack("HSET", bucket, digest[4:], value)
        by_node.setdefault(owner[key_slot(bucket)], []).append(cmd)
    await _send_all(by_node, password)


async def _send_all(by_node: dict[Node, list[bytes]], password: str | None) -> None:
    results = await asyncio.gather(*(_pipeline(n, password, c) for n, c in by_node.items()))
    if sum(results):
        raise RuntimeError(f"{sum(results)} commands failed")


async def _breakdown(
    nodes: Sequence[Node], password: str | None, keys: list[bytes]
) -> dict[str, Any]:
    """MEMORY USAGE, OBJECT ENCODING, STRLEN (and DEBUG OBJECT if allowed) of sample keys."""
    owner = await _slot_owners(nodes, password)
    usage, strlen = [], []
    encodings: dict[str, int] = {}
    debug: str | None = None
    for key in keys:
        c = await _client(owner[key_slot(key)], password)
        try:
            usage.append(int(await c.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")))
            enc = await c.execute_command("OBJECT", "ENCODING", key)
            name = enc.decode() if isinstance(enc, bytes) else str(enc)
            encodings[name] = encodings.get(name, 0) + 1
            strlen.append(int(await c.execute_command("STRLEN", key)))
            if debug is None:
                try:
                    debug = str(await c.execute_command("DEBUG", "OBJECT", key))
                except Exception as exc:  # redis-py raises ResponseError and friends
                    debug = f"unavailable: {exc}"
        finally:
            await c.aclose()
    return {
        "sampled_keys": len(keys),
        "memory_usage_mean": round(sum(usage) / len(usage), 1),
        "key_length": len(keys[0]),
        "value_length_mean": round(sum(strlen) / len(strlen), 1),
        "encodings": encodings,
        "debug_object": debug,
    }


async def _hashtables(masters: Sequence[Node], password: str | None, n: int) -> dict[str, float]:
    """Bytes per key of the masters' main and expires hash tables (MEMORY STATS)."""
    main = expires = 0
    for node in masters:
        c = await _client(node, password)
        try:
            stats = await c.memory_stats()
        finally:
            await c.aclose()
        db = stats.get("db.0") or {}
        main += int(db.get("overhead.hashtable.main", 0))
        expires += int(db.get("overhead.hashtable.expires", 0))
    return {
        "hashtable_main_bytes_per_key": round(main / n, 1),
        "hashtable_expires_bytes_per_key": round(expires / n, 1),
    }


async def redis_probe(
    seeds: list[tuple[str, int]], password: str | None, n: int, variant: str | None
) -> dict[str, Any]:
    nodes = await _nodes(seeds[0], password)
    masters = [n for n in nodes if n.master]
    # A master's replication buffer grows with its first writes (up to repl-backlog-size)
    # and stays: fill it before measuring, or the first run pays ~1 MB per master.
    prime_keys, prime_value = _layout(_flows(PRIME_FLOWS, seed=99), "full", "record")
    await _raw_set(nodes, password, prime_keys, prime_value, True)
    await _call_all(masters, password, "FLUSHALL", "SYNC")
    await _settle(nodes, password, 0)
    flows = _flows(n, seed=7)
    gc.collect()
    before = await _snapshot_memory(nodes, password)
    started = time.perf_counter()
    if variant is None:
        stored = await _pin(seeds, password, flows)
        keys = [t.key() for t in flows]
        value_len = len(_record().encode())
    else:
        key_kind, value_kind, ttl = VARIANTS[variant]
        keys, value = _layout(flows, key_kind, value_kind)
        if key_kind == "bucket":
            await _raw_hset(nodes, password, keys, value)
        else:
            await _raw_set(nodes, password, keys, value, ttl)
        stored = n
        value_len = len(value)
    elapsed = time.perf_counter() - started
    keys_stored = sum(await _call_all(masters, password, "DBSIZE"))
    await _settle(nodes, password, keys_stored)
    after = await _snapshot_memory(nodes, password)
    out: dict[str, Any] = {
        "variant": variant or "pin_many",
        "flows": n,
        "stored": stored,
        "keys": keys_stored,
        "masters": len(masters),
        "replicas": len(nodes) - len(masters),
        "used_memory_masters_before": before["masters"],
        "used_memory_masters_after": after["masters"],
        "used_memory_all_before": before["all"],
        "used_memory_all_after": after["all"],
        "bytes_per_flow_masters": round((after["masters"] - before["masters"]) / n, 1),
        "bytes_per_flow_all_nodes": round((after["all"] - before["all"]) / n, 1),
        "key_length": 12 if variant == "hash_buckets" else len(keys[0]),
        "value_length": value_len,
        "write_seconds": round(elapsed, 3),
    }
    out.update(await _hashtables(masters, password, n))
    out["hash_fields"] = n if variant == "hash_buckets" else 0
    if variant is None:
        sample = random.Random(1).sample(keys, min(200, len(keys)))
        out["breakdown"] = await _breakdown(nodes, password, sample)
    await _call_all(masters, password, "FLUSHALL", "SYNC")
    return out


def _seeds(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        out.append((host, int(port)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_probe")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--impl", choices=("c", "python"), required=True)
    e.add_argument("--capacity", type=int, required=True)
    e.add_argument("--flows", type=int, required=True)
    r = sub.add_parser("redis")
    r.add_argument("--seeds", required=True)
    r.add_argument("--flows", type=int, required=True)
    r.add_argument("--variant", choices=sorted(VARIANTS))
    args = p.parse_args()
    if args.command == "engine":
        result: dict[str, Any] = probe(args.impl, args.capacity, args.flows)
    else:
        password = os.environ.get("FLOWSTATE_BENCH_REDIS_PASSWORD") or None
        result = asyncio.run(redis_probe(_seeds(args.seeds), password, args.flows, args.variant))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
