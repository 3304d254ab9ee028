"""The `FlowStore` contract, run against both stores: `MemoryStore` and `RedisClusterStore`.

Time: the memory store runs on an injected clock (`advance` moves it); the Redis store runs
on real time with short TTLs (a few hundred ms), so `advance` sleeps there.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio.cluster as rcluster

from flowstate.errors import UsageError
from flowstate.flow import FiveTuple, Proto
from flowstate.record import FlowRecord
from flowstate.store.base import FlowStore, StoreConfig
from flowstate.store.memory import MemoryStore
from flowstate.store.redis_cluster import RedisClusterStore

#: Generous deadlines: this suite checks answers, not latency (see the Redis-only tests).
TEST_CONFIG = StoreConfig(lookup_deadline_ms=3000, write_deadline_ms=3000, connect_timeout_ms=3000)
BIG_DEADLINE_MS = 20_000

GARBAGE = [
    b"\xc1not msgpack",
    b"",
    b"hello",
    b"\x93\x01\x02\x03",  # valid msgpack, wrong shape
    FlowRecord(bytes(16), bytes(4), 1, "p", 2).encode(),  # wrong version
    FlowRecord(bytes(15), bytes(4), 1, "p").encode(),  # 15-byte backend
    FlowRecord(bytes(16), bytes(4), 1, "").encode(),  # empty pop
]


@dataclass
class Harness:
    kind: str
    store: FlowStore
    advance: Callable[[int], Awaitable[None]]
    put_raw: Callable[[bytes, bytes, int], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        now = [1_000_000]

        async def advance(ms: int) -> None:
            now[0] += ms

        mem = MemoryStore(clock=lambda: now[0])

        async def put_raw(key: bytes, value: bytes, ttl: int) -> None:
            mem.put_raw(key, value, ttl)

        yield Harness("memory", mem, advance, put_raw)
        return

    cluster = request.getfixturevalue("redis_cluster")
    cluster.flushall()
    store = await RedisClusterStore.connect(
        cluster.seeds, password=cluster.password or None, config=TEST_CONFIG
    )
    raw = rcluster.RedisCluster(
        startup_nodes=[rcluster.ClusterNode(h, p) for h, p in cluster.seeds],
        password=cluster.password or None,
    )

    async def sleep(ms: int) -> None:
        await asyncio.sleep(ms / 1000)

    async def put(key: bytes, value: bytes, ttl: int) -> None:
        await raw.set(key, value, px=ttl)

    try:
        yield Harness("redis", store, sleep, put)
    finally:
        await store.close()
        await raw.aclose()


@pytest.fixture
def store(harness: Harness) -> FlowStore:
    return harness.store


_rng = random.Random(1234)


def tuples(n: int, v6: bool = False) -> list[FiveTuple]:
    """`n` distinct random flows (fresh ones on every call)."""
    out = []
    for _ in range(n):
        size = 16 if v6 else 4
        out.append(
            FiveTuple(
                _rng.choice([Proto.TCP, Proto.UDP]),
                _rng.randbytes(size),
                _rng.randrange(1024, 65536),
                _rng.randbytes(size),
                _rng.choice([80, 443, 53]),
            )
        )
    return out


def records(n: int, pop: str = "pop-a") -> list[FlowRecord]:
    return [
        FlowRecord(
            _rng.randbytes(16),
            _rng.choice([_rng.randbytes(4), _rng.randbytes(16)]),
            _rng.randrange(0, 1 << 63),
            pop,
        )
        for _ in range(n)
    ]


async def test_pin_then_lookup(store: FlowStore) -> None:
    ts, recs = tuples(20) + tuples(5, v6=True), records(25)
    assert await store.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)]) == recs
    assert await store.lookup_many(ts) == recs


async def test_pin_with_keys_given_writes_under_those_keys(store: FlowStore) -> None:
    """`keys=` (the engine's `flow_keys`) are used as given: pinning with the keys of other
    tuples stores the records where lookups of those other tuples find them."""
    ts, others, recs = tuples(8), tuples(8), records(8)
    items = [(t, r, 60_000) for t, r in zip(ts, recs, strict=True)]
    assert await store.pin_many(items, keys=[o.key() for o in others]) == recs
    assert await store.lookup_many(others) == recs
    assert await store.lookup_many(ts) == [None] * 8
    assert await store.pin_many(items, keys=[t.key() for t in ts]) == recs
    assert await store.lookup_many(ts) == recs
    with pytest.raises(UsageError):
        await store.pin_many(items, keys=[t.key() for t in ts[:-1]])


async def test_conflicting_pin_returns_first_record(store: FlowStore) -> None:
    ts, first, second = tuples(10), records(10, "first"), records(10, "second")
    await store.pin_many([(t, r, 60_000) for t, r in zip(ts[:5], first, strict=False)])
    got = await store.pin_many([(t, r, 60_000) for t, r in zip(ts, second, strict=True)])
    assert got == first[:5] + second[5:]
    assert await store.lookup_many(ts) == first[:5] + second[5:]


async def test_duplicate_tuple_within_one_batch_adopts_first(store: FlowStore) -> None:
    (t,) = tuples(1)
    a, b = records(2)
    assert await store.pin_many([(t, a, 60_000), (t, b, 60_000)]) == [a, a]


async def test_lookup_hit_and_miss(store: FlowStore) -> None:
    ts, recs = tuples(6), records(3)
    await store.pin_many([(t, r, 60_000) for t, r in zip(ts[::2], recs, strict=True)])
    assert await store.lookup_many(ts) == [recs[0], None, recs[1], None, recs[2], None]
    assert await store.lookup_many([]) == []
    assert await store.pin_many([]) == []


async def test_ttl_expiry(harness: Harness) -> None:
    store = harness.store
    ts, recs = tuples(4), records(4)
    await store.pin_many([(t, r, 400) for t, r in zip(ts, recs, strict=True)])
    assert await store.lookup_many(ts) == recs
    ttl = await store.ttl_ms(ts[0])
    assert ttl is not None and 0 < ttl <= 400
    await harness.advance(600)
    assert await store.lookup_many(ts) == [None] * 4
    assert await store.ttl_ms(ts[0]) is None
    # Once expired, a new pin wins.
    fresh = records(4)
    assert await store.pin_many([(t, r, 60_000) for t, r in zip(ts, fresh, strict=True)]) == fresh


async def test_release_shortens_never_lengthens(harness: Harness) -> None:
    store = harness.store
    long_, short = tuples(3), tuples(3)
    await store.pin_many([(t, r, 60_000) for t, r in zip(long_, records(3), strict=True)])
    await store.pin_many([(t, r, 1_000) for t, r in zip(short, records(3), strict=True)])
    absent = tuples(2)
    assert await store.release_many(long_ + absent, 300) == [True] * 3 + [False] * 2
    for t in long_:
        ttl = await store.ttl_ms(t)
        assert ttl is not None and 0 < ttl <= 300
    assert await store.release_many(short, 50_000) == [True] * 3  # exists, left alone
    for t in short:
        ttl = await store.ttl_ms(t)
        assert ttl is not None and 0 < ttl <= 1_000
    assert await store.release_many(long_, 50_000) == [True] * 3
    for t in long_:
        ttl = await store.ttl_ms(t)
        assert ttl is not None and ttl <= 300
    await harness.advance(500)
    assert await store.lookup_many(long_) == [None] * 3
    assert await store.release_many(long_, 300) == [False] * 3


async def test_touch_extends(harness: Harness) -> None:
    store = harness.store
    ts, recs = tuples(3), records(3)
    await store.pin_many([(t, r, 300) for t, r in zip(ts, recs, strict=True)])
    absent = tuples(1)
    assert await store.touch_many([(t, 60_000) for t in ts + absent]) == [True] * 3 + [False]
    for t in ts:
        ttl = await store.ttl_ms(t)
        assert ttl is not None and 30_000 < ttl <= 60_000
    await harness.advance(500)
    assert await store.lookup_many(ts) == recs
    assert await store.lookup_many(absent) == [None]


async def test_delete(store: FlowStore) -> None:
    ts, recs = tuples(5), records(5)
    await store.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)])
    assert await store.delete(ts[:3] + tuples(2)) == 3
    assert await store.lookup_many(ts) == [None, None, None, recs[3], recs[4]]
    assert await store.delete(ts[:3]) == 0
    assert await store.delete([]) == 0


async def test_batches_of_ten_thousand(store: FlowStore) -> None:
    n = 10_000
    ts, recs = tuples(n // 2) + tuples(n // 2, v6=True), records(n)
    half = n // 2
    pinned = await store.pin_many(
        [(t, r, 60_000) for t, r in zip(ts[::2], recs[::2], strict=True)],
        deadline_ms=BIG_DEADLINE_MS,
    )
    assert pinned == recs[::2]
    others = records(n)
    got = await store.pin_many(
        [(t, r, 60_000) for t, r in zip(ts, others, strict=True)], deadline_ms=BIG_DEADLINE_MS
    )
    expect = [recs[i] if i % 2 == 0 else others[i] for i in range(n)]
    assert got == expect
    misses = tuples(half)
    looked = await store.lookup_many(ts + misses, deadline_ms=BIG_DEADLINE_MS)
    assert looked == expect + [None] * half


async def test_garbage_value(harness: Harness) -> None:
    store = harness.store
    ts = tuples(len(GARBAGE))
    for t, junk in zip(ts, GARBAGE, strict=True):
        await harness.put_raw(t.key(), junk, 60_000)
    assert await store.lookup_many(ts) == [None] * len(ts)
    recs = records(len(ts))
    got = await store.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)])
    assert got == recs
    assert await store.lookup_many(ts) == recs
    ttl = await store.ttl_ms(ts[0])
    assert ttl is not None and 30_000 < ttl <= 60_000
    counters: dict[str, Any] | None = getattr(store, "counters", None)
    if counters is not None:
        assert counters["bad_records"] >= 2 * len(GARBAGE)


async def test_bad_ttl_is_a_usage_error(store: FlowStore) -> None:
    from flowstate.errors import UsageError

    (t,), (r,) = tuples(1), records(1)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(UsageError):
            await store.pin_many([(t, r, bad)])  # type: ignore[list-item]
        with pytest.raises(UsageError):
            await store.touch_many([(t, bad)])  # type: ignore[list-item]
        with pytest.raises(UsageError):
            await store.release_many([t], bad)  # type: ignore[arg-type]


async def test_scan_finds_exactly_what_was_pinned(harness: Harness) -> None:
    store = harness.store
    ts, recs = tuples(1500) + tuples(500, v6=True), records(2000)
    await store.pin_many(
        [(t, r, 60_000) for t, r in zip(ts, recs, strict=True)], deadline_ms=BIG_DEADLINE_MS
    )
    (bad,) = tuples(1)
    await harness.put_raw(bad.key(), b"\xc1junk", 60_000)
    await harness.put_raw(b"other:key", b"x", 60_000)  # not a flow key: not matched
    wrong_type = None
    if harness.kind == "redis":
        assert isinstance(store, RedisClusterStore)
        (wrong_type,) = tuples(1)
        await store._rc.hset(wrong_type.key(), "f", "v")  # a hash where a record belongs
    found: dict[bytes, Any] = {}
    async for entry in store.scan(count=300):
        assert entry.key not in found
        found[entry.key] = entry
    expect = {t.key(): r for t, r in zip(ts, recs, strict=True)}
    extra = {bad.key()} | ({wrong_type.key()} if wrong_type else set())
    assert set(found) == set(expect) | extra
    if wrong_type:
        assert found[wrong_type.key()].record is None and found[wrong_type.key()].error
    for key, rec in expect.items():
        entry = found[key]
        assert entry.record == rec and entry.error is None
        assert entry.ttl_ms is not None and 0 < entry.ttl_ms <= 60_000
    assert found[bad.key()].record is None and found[bad.key()].error
