"""`RedisClusterStore`-only behaviour: the fast path's pure logic (with fakes), its agreement
with the redis-py reference path, MOVED/ASK during a real slot migration, deadlines, and
recovery after the cluster went away. Destructive tests (SIGSTOP, stop/start) come last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import statistics
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from flowstate.errors import RecordError, StoreUnavailable
from flowstate.flow import CLUSTER_SLOTS, FiveTuple, Proto, key_slot
from flowstate.record import FlowRecord, decode_record
from flowstate.store._codec import (
    decode_fast,
    encode_record,
    group_by_node,
    group_by_node_py,
    keys_of,
)
from flowstate.store._resp import RespConnection, pack_command
from flowstate.store.base import ReplicaReads, StoreConfig
from flowstate.store.redis_cluster import RedisClusterStore

SLACK_S = 0.2
CONFIG = StoreConfig(lookup_deadline_ms=3000, write_deadline_ms=3000, connect_timeout_ms=3000)
_rng = random.Random(99)


def tuples(n: int) -> list[FiveTuple]:
    return [
        FiveTuple(Proto.TCP, _rng.randbytes(4), _rng.randrange(65536), _rng.randbytes(4), 443)
        for _ in range(n)
    ]


def records(n: int, pop: str = "pop") -> list[FlowRecord]:
    return [
        FlowRecord(_rng.randbytes(16), _rng.randbytes(4), _rng.randrange(1 << 50), pop)
        for _ in range(n)
    ]


# -- pure logic ------------------------------------------------------------------------------

tuple_st = st.builds(
    lambda proto, fam, c, cp, v, vp: FiveTuple(proto, c[:fam], cp, v[:fam], vp),
    st.sampled_from(list(Proto)),
    st.sampled_from([4, 16]),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 65535),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 65535),
)


@given(st.lists(tuple_st, max_size=50))
def test_keys_of_matches_fivetuple_key(ts: list[FiveTuple]) -> None:
    assert keys_of(ts) == [t.key() for t in ts]


@pytest.mark.parametrize("group", [group_by_node, group_by_node_py], ids=["used", "python"])
def test_group_by_node_honours_slots_and_hash_tags(group: Any) -> None:
    keys = [*keys_of(tuples(5000)), b"a{x}b", b"{x}", b"{}x", b"x{", b"fs1:{{}}", b"q{y}z{w}"]
    assert any(b"{" in k for k in keys[:5000])
    slot_node = [s % 3 if s % 7 else -1 for s in range(CLUSTER_SLOTS)]
    groups = group(keys, slot_node, 3)
    assert len(groups) == 4
    assert sorted(i for g in groups for i in g) == list(range(len(keys)))
    for node, idxs in enumerate(groups):
        assert idxs == sorted(idxs)  # batch order kept within a group
        for i in idxs:
            assert slot_node[key_slot(keys[i])] == (node if node < 3 else -1)


record_st = st.builds(
    FlowRecord,
    st.binary(min_size=16, max_size=16),
    st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)),
    st.integers(0, (1 << 63) - 1),
    st.text(min_size=1, max_size=8),
)


@given(record_st)
def test_encode_record_is_byte_identical(rec: FlowRecord) -> None:
    assert encode_record(rec) == rec.encode()


def _same_decode(data: bytes) -> None:
    try:
        want: FlowRecord | str = decode_record(data)
    except RecordError as exc:
        want = str(exc)
    try:
        got: FlowRecord | str = decode_fast(data)
    except RecordError as exc:
        got = str(exc)
    assert got == want
    assert type(got) is type(want)


@given(record_st)
def test_decode_fast_matches_reference_on_records(rec: FlowRecord) -> None:
    _same_decode(rec.encode())


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=60),
        st.tuples(
            st.one_of(st.integers(-2, 3), st.booleans(), st.floats(0, 2)),
            st.one_of(st.binary(min_size=15, max_size=17), st.text(max_size=3)),
            st.one_of(st.binary(min_size=3, max_size=17), st.none()),
            st.one_of(st.integers(-5, (1 << 64) - 1), st.floats(), st.text(max_size=2)),
            st.one_of(st.text(max_size=40), st.binary(max_size=5), st.integers(-(2**63), 2**63)),
        ).map(lambda t: __import__("msgpack").packb(list(t), use_bin_type=True)),
    )
)
def test_decode_fast_matches_reference_on_junk(data: bytes) -> None:
    _same_decode(data)


def test_decode_fast_multibyte_pop_limits() -> None:
    for pop in ("é" * 16, "é" * 17, "€" * 10, "€" * 11, "x" * 32, "x" * 33):
        _same_decode(FlowRecord(bytes(16), bytes(4), 1, pop).encode())


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


async def test_resp_connection_pipelines_in_order_across_chunks() -> None:
    conn = RespConnection(asyncio.get_running_loop(), "fake")
    tr = FakeTransport()
    conn.connection_made(tr)  # type: ignore[arg-type]
    f1 = conn.send(pack_command("GET", "a") + pack_command("GET", "b"), 2)
    f2 = conn.send(pack_command("SET", "c", "d"), 1)
    assert conn.owed == 3
    stream = b"$1\r\nx\r\n$-1\r\n-MOVED 3999 127.0.0.1:6381\r\n"
    for i in range(len(stream)):  # worst case: one byte at a time
        conn.data_received(stream[i : i + 1])
    assert await f1 == [b"x", None]
    (err,) = await f2
    assert isinstance(err, hiredis.ReplyError) and str(err).startswith("MOVED")
    assert conn.alive and not tr.aborted
    assert conn.owed == 0


async def test_resp_connection_aborts_on_desync() -> None:
    loop = asyncio.get_running_loop()
    for bad in (b"+OK\r\n+OK\r\n", b"!garbage\r\n"):
        conn = RespConnection(loop, "fake")
        tr = FakeTransport()
        conn.connection_made(tr)  # type: ignore[arg-type]
        fut = conn.send(b"PING\r\n", 1)
        conn.data_received(bad)
        assert tr.aborted and not conn.alive
        if bad.startswith(b"+"):  # first reply delivered; the one nobody asked for broke it
            assert await fut == [b"OK"]
        else:
            with pytest.raises(ConnectionError, match="protocol error"):
                await fut
        dead = conn.send(b"PING\r\n", 1)
        with pytest.raises(ConnectionError):
            await dead


async def test_resp_connection_lost_fails_waiters() -> None:
    conn = RespConnection(asyncio.get_running_loop(), "fake")
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    fut = conn.send(b"PING\r\n", 1)
    conn.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(ConnectionError, match="reset"):
        await fut


class FakeNode:
    def __init__(self, port: int) -> None:
        self.host, self.port, self.name = "127.0.0.1", port, f"127.0.0.1:{port}"


class FakeRedisPy:
    """Just what the store uses of redis-py's RedisCluster: slots_cache, initialize, pipeline."""

    def __init__(self, data: dict[bytes, bytes]) -> None:
        nodes = [FakeNode(1), FakeNode(2), FakeNode(3)]
        self.nodes_manager = self
        self.slots_cache = {s: [nodes[s * 3 // CLUSTER_SLOTS]] for s in range(CLUSTER_SLOTS)}
        self.data = data
        self.initialized = 0
        self.piped: list[bytes] = []

    async def initialize(self) -> None:
        self.initialized += 1

    def pipeline(self, transaction: bool) -> Any:
        rc = self

        class Pipe:
            def __init__(self) -> None:
                self.keys: list[bytes] = []

            def get(self, key: bytes) -> None:
                self.keys.append(key)

            async def execute(self, raise_on_error: bool) -> list[Any]:
                rc.piped += self.keys
                return [rc.data.get(k) for k in self.keys]

        return Pipe()

    async def aclose(self) -> None:
        pass


class ScriptedTransport(FakeTransport):
    """Answers each GET from `data`, or with the error reply `errors[key]`; never if stalled."""

    def __init__(self, conn: RespConnection, rc: FakeRedisPy, errors: dict[bytes, bytes]) -> None:
        super().__init__()
        self.conn, self.rc, self.errors, self.stalled = conn, rc, errors, False
        self.held: list[bytes] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.stalled:
            self.held.append(data)
            return
        self.answer(data)

    def release(self) -> None:
        self.stalled = False
        for data in self.held:
            self.answer(data)
        self.held.clear()

    def answer(self, data: bytes) -> None:
        reader = hiredis.Reader()
        reader.feed(data)
        out = []
        while (cmd := reader.gets()) is not False:
            assert cmd[0] == b"GET"
            key = cmd[1]
            if key in self.errors:
                out.append(b"-" + self.errors[key] + b"\r\n")
            elif key in self.rc.data:
                out.append(b"$%d\r\n%b\r\n" % (len(self.rc.data[key]), self.rc.data[key]))
            else:
                out.append(b"$-1\r\n")
        self.conn.loop.call_soon(self.conn.data_received, b"".join(out))


async def _scripted_store(
    data: dict[bytes, bytes], errors: dict[bytes, bytes]
) -> tuple[RedisClusterStore, FakeRedisPy, list[ScriptedTransport]]:
    rc = FakeRedisPy(data)
    store = RedisClusterStore(
        rc,  # type: ignore[arg-type]
        password=None,
        username=None,
        config=StoreConfig(),
        ssl_context=None,
        fast_path=True,
    )
    transports = []
    for node in store._masters:
        conn = RespConnection(asyncio.get_running_loop(), node.name)
        tr = ScriptedTransport(conn, rc, errors)
        conn.connection_made(tr)  # type: ignore[arg-type]
        node.conn = conn
        transports.append(tr)
    return store, rc, transports


async def test_redirect_replies_rerun_through_redis_py_and_refresh_the_map() -> None:
    ts, recs = tuples(400), records(400)
    keys = keys_of(ts)
    data = {k: r.encode() for k, r in zip(keys[:300], recs, strict=False)}
    kinds = [b"MOVED 1 127.0.0.1:2", b"ASK 1 127.0.0.1:2", b"TRYAGAIN x", b"CLUSTERDOWN x"]
    errors = {keys[i]: kinds[i % 4] for i in range(0, 400, 7)}
    store, rc, transports = await _scripted_store(data, errors)
    assert store.masters() == [("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)]
    got = await store.lookup_many(ts)
    assert got == recs[:300] + [None] * 100
    assert all(len(tr.written) == 1 for tr in transports)  # one write per master
    assert sorted(rc.piped) == sorted(errors)  # exactly the redirected items, via redis-py
    assert store.counters["redirected_items"] == len(errors)
    for kind in ("moved", "ask", "tryagain", "clusterdown"):
        assert store.counters[kind] > 0
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert rc.initialized == 1  # one refresh of the slot map, however many redirects
    await store.close()


async def test_unexpected_error_reply_raises_store_unavailable() -> None:
    ts = tuples(50)
    keys = keys_of(ts)
    store, _, _ = await _scripted_store({}, {keys[3]: b"LOADING Redis is loading"})
    with pytest.raises(StoreUnavailable, match="LOADING"):
        await store.lookup_many(ts)
    assert store.counters["error_replies"] == 1
    await store.close()


async def test_deadlines_fire_in_order_never_early() -> None:
    """One timer serves every deadline: a short deadline taken after a long one still fires
    on time, and none fires before its time."""
    ts = tuples(30)
    store, _, transports = await _scripted_store({}, {})
    for tr in transports:
        tr.stalled = True

    async def timed(deadline_ms: float) -> float:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="deadline"):
            await store.lookup_many(ts, deadline_ms=deadline_ms)
        return time.monotonic() - t0

    tasks = [asyncio.create_task(timed(ms)) for ms in (300, 120, 10, 60, 10.5)]
    took = await asyncio.gather(*tasks)
    for ms, t in zip((300, 120, 10, 60, 10.5), took, strict=True):
        assert ms / 1000 <= t < ms / 1000 + 0.05, (ms, t)
    assert store.counters["timeouts"] == 5
    assert not store._wheel and not store._wheel_buckets and store._tick is None
    await store.close()


async def test_timeout_keeps_the_stream_in_sync_and_a_stall_aborts() -> None:
    ts, recs = tuples(60), records(60)
    keys = keys_of(ts)
    data = {k: r.encode() for k, r in zip(keys[:30], recs, strict=False)}
    store, _, transports = await _scripted_store(data, {})
    for tr in transports:
        tr.stalled = True
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="deadline"):
        await store.lookup_many(ts[:30], deadline_ms=20)
    assert 0.02 <= time.monotonic() - t0 < 0.02 + SLACK_S
    assert store.counters["timeouts"] == 1
    # The late replies of the abandoned call arrive first and are dropped in order: the
    # connection stays usable and answers the next call correctly.
    assert not any(tr.aborted for tr in transports)
    for tr in transports:
        tr.release()
    assert await store.lookup_many(ts[30:] + ts[:30]) == [None] * 30 + recs[:30]
    # Stalled for longer than the stall limit: the next deadline aborts the connections.
    for tr in transports:
        tr.stalled = True
    with pytest.raises(StoreUnavailable):
        await store.lookup_many(ts, deadline_ms=20)
    assert not any(tr.aborted for tr in transports)
    await asyncio.sleep(0.25)
    with pytest.raises(StoreUnavailable):
        await store.lookup_many(ts, deadline_ms=20)
    assert all(tr.aborted for tr in transports)
    assert store.counters["stalled"] == 3
    await store.close()


# -- against the cluster ---------------------------------------------------------------------


@pytest.fixture
async def store(redis_cluster: Any) -> AsyncIterator[RedisClusterStore]:
    s = await RedisClusterStore.connect(
        redis_cluster.seeds, password=redis_cluster.password or None, config=CONFIG
    )
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def ref(redis_cluster: Any) -> AsyncIterator[RedisClusterStore]:
    s = await RedisClusterStore.connect(
        redis_cluster.seeds,
        password=redis_cluster.password or None,
        config=CONFIG,
        fast_path=False,
    )
    try:
        yield s
    finally:
        await s.close()


def node_client(host: str, port: int, cluster: Any) -> redis.Redis:
    return redis.Redis(host, port, password=cluster.password or None, socket_timeout=5)


def masters(cluster: Any) -> list[dict[str, Any]]:
    """Masters from CLUSTER NODES: id, host, port, slot ranges [(lo, hi), ...]."""
    host, port = cluster.seeds[0]
    with node_client(host, port, cluster) as c:
        text = c.execute_command("CLUSTER", "NODES")
    if isinstance(text, bytes):
        text = text.decode()
    out = []
    lines = text.splitlines() if isinstance(text, str) else []
    for line in lines:
        f = line.split()
        if "master" not in f[2] or "fail" in f[2]:
            continue
        h, p = f[1].split("@")[0].rsplit(":", 1)
        ranges = []
        for r in f[8:]:
            if r.startswith("["):
                continue
            lo, _, hi = r.partition("-")
            ranges.append((int(lo), int(hi or lo)))
        out.append({"id": f[0], "host": h, "port": int(p), "ranges": ranges})
    return out


def owner(ms: list[dict[str, Any]], slot: int) -> dict[str, Any]:
    return next(m for m in ms if any(lo <= slot <= hi for lo, hi in m["ranges"]))


async def test_one_batch_lands_on_every_master(
    store: RedisClusterStore, redis_cluster: Any
) -> None:
    ms = masters(redis_cluster)
    assert len(ms) == 3
    assert sorted(store.masters()) == sorted((m["host"], m["port"]) for m in ms)
    ts, recs = tuples(300), records(300)
    await store.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)])
    per_master = {m["port"]: 0 for m in ms}
    for t, rec in zip(ts, recs, strict=True):
        key = t.key()
        m = owner(ms, key_slot(key))
        with node_client(m["host"], m["port"], redis_cluster) as c:
            assert c.execute_command("CLUSTER", "KEYSLOT", key) == key_slot(key)
            assert c.get(key) == rec.encode()  # a plain (non-cluster) GET: it is on that node
        per_master[m["port"]] += 1
    assert all(n > 0 for n in per_master.values()), per_master


async def test_fast_path_agrees_with_redis_py(
    store: RedisClusterStore, ref: RedisClusterStore
) -> None:
    """Mirror key sets (vip_port 1 for the fast path, 2 for redis-py), same operations."""
    base = tuples(600)

    def mirror(port: int) -> list[FiveTuple]:
        return [FiveTuple(t.proto, t.client_ip, t.client_port, t.vip_ip, port) for t in base]

    fast_ts, ref_ts = mirror(1), mirror(2)
    first, second = records(600, "one"), records(600, "two")
    for s, ts in ((store, fast_ts), (ref, ref_ts)):
        await s.delete(ts)
        assert await s.pin_many([(t, r, 60_000) for t, r in zip(ts[:300], first, strict=False)])
    results: dict[str, list[Any]] = {"fast": [], "ref": []}
    junk = b"\x93junk"
    for name, s, ts in (("fast", store, fast_ts), ("ref", ref, ref_ts)):
        await s._rc.set(ts[400].key(), junk, px=60_000)
        out = results[name]
        out.append(await s.pin_many([(t, r, 50_000) for t, r in zip(ts, second, strict=True)]))
        out.append(await s.lookup_many(ts + tuples(50)))
        out.append(await s.touch_many([(t, 70_000) for t in ts[::3]]))
        out.append(await s.release_many(ts[::5], 20_000))  # long: no expiry mid-test
        out.append(await s.delete(ts[::7]))
        out.append(await s.lookup_many(ts))
        out.append([await s.ttl_ms(t) is None for t in ts[:50]])
        await s.delete(ts)
    assert results["fast"] == results["ref"]
    assert store.counters["bad_records"] == ref.counters["bad_records"] == 1
    assert store.counters["redirected_items"] == 0


async def test_non_string_value_is_garbage(store: RedisClusterStore) -> None:
    """A hash where a record belongs: lookups say None, a pin replaces it."""
    ts, recs = tuples(3), records(3)
    for t in ts:
        await store._rc.hset(t.key(), "f", "v")
    assert await store.lookup_many(ts) == [None] * 3
    assert await store.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)]) == recs
    assert await store.lookup_many(ts) == recs
    assert store.counters["bad_records"] == 6
    await store.delete(ts)


def _tuples_in_slot(slot: int, n: int) -> list[FiveTuple]:
    found: list[FiveTuple] = []
    while len(found) < n:
        batch = tuples(20_000)
        found += [t for t, k in zip(batch, keys_of(batch), strict=True) if key_slot(k) == slot]
    return found[:n]


async def test_moved_and_ask_during_a_real_slot_migration(
    store: RedisClusterStore, redis_cluster: Any
) -> None:
    ms = masters(redis_cluster)
    slot = 4242
    src = owner(ms, slot)
    dst = next(m for m in ms if m is not src)
    ts = _tuples_in_slot(slot, 8)
    old, new = ts[:4], ts[4:]
    old_recs, new_recs = records(4, "old"), records(4, "new")
    others = tuples(200)  # elsewhere in the keyspace: must stay on the fast path
    await store.pin_many([(t, r, 60_000) for t, r in zip(old, old_recs, strict=True)])
    await store.pin_many([(t, r, 60_000) for t, r in zip(others, records(200), strict=True)])
    a = node_client(src["host"], src["port"], redis_cluster)
    b = node_client(dst["host"], dst["port"], redis_cluster)
    try:
        b.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src["id"])
        a.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst["id"])
        # Migrating: keys still on the source answer there, missing ones get ASK.
        got = await store.lookup_many(old + new + others)
        assert got[:8] == old_recs + [None] * 4
        assert store.counters["ask"] >= 4
        pinned = await store.pin_many([(t, r, 60_000) for t, r in zip(new, new_recs, strict=True)])
        assert pinned == new_recs
        assert b.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 4  # ASKING → target
        # Move the old keys over: now they are found through ASK as well.
        args: list[Any] = [dst["host"], dst["port"], "", 0, 5000]
        if redis_cluster.password:
            args += ["AUTH", redis_cluster.password]
        a.execute_command("MIGRATE", *args, "KEYS", *[t.key() for t in old])
        asks = store.counters["ask"]
        assert await store.lookup_many(old + new) == old_recs + new_recs
        assert store.counters["ask"] >= asks + 8
        # Finish: the slot belongs to the target everywhere; the fast path's map is stale.
        for m in [dst, src] + [m for m in ms if m is not src and m is not dst]:
            with node_client(m["host"], m["port"], redis_cluster) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst["id"])
        moved = store.counters["moved"]
        assert await store.lookup_many(old + new) == old_recs + new_recs
        assert store.counters["moved"] > moved
        await store.refresh_topology()
        moved, redirected = store.counters["moved"], store.counters["redirected_items"]
        assert await store.lookup_many(old + new) == old_recs + new_recs
        assert await store.touch_many([(t, 60_000) for t in old]) == [True] * 4
        assert store.counters["moved"] == moved
        assert store.counters["redirected_items"] == redirected
    finally:
        # Put the slot back on its source (keys deleted first: a node refuses to give away
        # a slot it holds keys of).
        await store.delete(old + new, deadline_ms=10_000)
        for c in (a, b):
            with contextlib.suppress(redis.ResponseError):
                c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        for m in [src] + [m for m in ms if m is not src]:
            with node_client(m["host"], m["port"], redis_cluster) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", src["id"])
        a.close()
        b.close()


async def test_abandoned_calls_never_shift_answers(store: RedisClusterStore) -> None:
    """Calls that give up (tiny deadlines) interleaved with calls that wait: every answer
    that is returned belongs to its own call, on the same connections."""
    groups = [(tuples(97), records(97, f"g{i}")) for i in range(8)]
    for ts, recs in groups:
        await store.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)])
    conns = {id(n.conn) for n in store._masters}

    async def one(i: int) -> str:
        ts, recs = groups[i % len(groups)]
        try:
            got = await store.lookup_many(ts, deadline_ms=0.01 if i % 3 == 0 else 3000)
        except StoreUnavailable:
            return "timeout"
        assert got == recs
        return "ok"

    outcomes = await asyncio.gather(*(one(i) for i in range(120)))
    assert "ok" in outcomes and "timeout" in outcomes
    assert {id(n.conn) for n in store._masters} == conns  # kept: nothing was out of sync
    for ts, recs in groups:
        assert await store.lookup_many(ts) == recs


async def test_close_leaves_nothing_behind(redis_cluster: Any) -> None:
    loop = asyncio.get_running_loop()
    before = asyncio.all_tasks(loop)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = await RedisClusterStore.connect(
            redis_cluster.seeds, password=redis_cluster.password or None, config=CONFIG
        )
        await s.lookup_many(tuples(100))
        await s.close()
        await s.close()  # idempotent
        del s
        gc.collect()
        await asyncio.sleep(0.05)
    assert asyncio.all_tasks(loop) <= before
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


async def test_unreachable_seeds_fail_fast() -> None:
    cfg = StoreConfig(connect_timeout_ms=300)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await RedisClusterStore.connect([("127.0.0.1", 1)], config=cfg)
    assert time.monotonic() - t0 < 0.3 + 0.2


# -- destructive: keep these last ------------------------------------------------------------


async def _timed(coro: Any) -> float:
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await coro
    return time.monotonic() - t0


async def _until_ok(store: RedisClusterStore, ts: list[FiveTuple], timeout: float) -> None:
    """Poll until the store answers again (it reconnects by itself)."""
    end = time.monotonic() + timeout
    while True:
        try:
            await store.lookup_many(ts, deadline_ms=500)
            return
        except StoreUnavailable:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


async def test_deadline_on_a_stalled_master(redis_cluster: Any) -> None:
    # Replica reads off: the stalled master's keys must fail, not be read from its replica
    # (that is tested in test_store_partial.py).
    off = StoreConfig(
        lookup_deadline_ms=3000,
        write_deadline_ms=3000,
        connect_timeout_ms=3000,
        read_from_replicas=ReplicaReads.OFF,
    )
    s = await RedisClusterStore.connect(
        redis_cluster.seeds, password=redis_cluster.password or None, config=off
    )
    try:
        ts, recs = tuples(64), records(64)
        await s.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)])
        ms = {(m["host"], m["port"]) for m in masters(redis_cluster)}
        index = next(i for i, addr in enumerate(redis_cluster.seeds) if tuple(addr) in ms)
        redis_cluster.kill_node(index, "STOP")
        try:
            for deadline in (5, 20, 50, 5):
                # Stalled node: each call gives up at its deadline; the connection stays
                # (its stream is in sync: late replies will be dropped in order).
                took = await _timed(s.lookup_many(ts, deadline_ms=deadline))
                assert took < deadline / 1000 + SLACK_S
                took = await _timed(
                    s.pin_many(
                        [(t, r, 1000) for t, r in zip(ts, recs, strict=True)],
                        deadline_ms=deadline,
                    )
                )
                assert took < deadline / 1000 + SLACK_S
            assert s.counters["timeouts"] >= 8
            # Nothing received for longer than the stall limit: the next timeout aborts the
            # connection; re-dialling the stopped node then times out too (AUTH stalls).
            await asyncio.sleep(0.25)
            for _ in range(3):
                took = await _timed(s.lookup_many(ts, deadline_ms=20))
                assert took < 0.02 + SLACK_S
            assert s.counters["stalled"] >= 1
        finally:
            redis_cluster.restart_node(index)
        await _until_ok(s, ts, 15)
        assert await s.lookup_many(ts) == recs  # a new connection, in sync
    finally:
        await s.close()


async def test_cluster_down_fails_fast_then_recovers(redis_cluster: Any) -> None:
    s = await RedisClusterStore.connect(
        redis_cluster.seeds, password=redis_cluster.password or None, config=CONFIG
    )
    try:
        ts, recs = tuples(200), records(200)
        assert await s.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)])
        redis_cluster.stop()
        try:
            slow_deadline: list[float] = []  # how long calls with a 50 ms deadline took
            for _ in range(20):
                for deadline in (5.0, 50.0):
                    took = await _timed(s.lookup_many(ts, deadline_ms=deadline))
                    assert took < deadline / 1000 + SLACK_S
                    took2 = await _timed(
                        s.pin_many(
                            [(t, r, 1000) for t, r in zip(ts, recs, strict=True)],
                            deadline_ms=deadline,
                        )
                    )
                    assert took2 < deadline / 1000 + SLACK_S
                    if deadline == 50.0:
                        slow_deadline += [took, took2]
            # Refused connections and the re-dial backoff fail calls at once, not at their
            # deadline.
            assert statistics.median(slow_deadline) < 0.025, slow_deadline
            assert s.counters["fast_fail"] > 0
            await _timed(s.touch_many([(ts[0], 1000)], deadline_ms=50))
            await _timed(s.release_many([ts[0]], 100, deadline_ms=50))
            await _timed(s.delete([ts[0]], deadline_ms=50))
        finally:
            redis_cluster.start()
        await _until_ok(s, ts, 30)
        # A new cluster (empty): pin and read back through the recovered store.
        assert await s.lookup_many(ts) == [None] * len(ts)
        assert await s.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)]) == recs
        assert await s.lookup_many(ts) == recs
    finally:
        await s.close()
