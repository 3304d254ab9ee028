"""Issue 7: one master that cannot answer fails only its own keys (scripted nodes, then the
real cluster).

A lookup batch spread over every master, with one master stopped (SIGSTOP: it keeps its
sockets and never answers, so calls meet their deadline) or killed (SIGKILL: connections
refused): with replica reads off, that master's keys are `LOOKUP_FAILED` and the others are
answered; with `read_from_replicas = "on-failure"` its replica answers them (READONLY), and
reads return to the master once it answers again. Writes never go to a replica.

So that the outcome does not depend on how fast the machine is, the stopped master's replica
is told not to fail over (`cluster-replica-no-failover`) and every node to keep serving
while a master is down (`cluster-require-full-coverage no`); the fixture resumes or restarts
the node, waits until the cluster is healthy and puts both settings back, even on failure.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hiredis
import pytest

from flowstate.errors import StoreUnavailable
from flowstate.flow import CLUSTER_SLOTS, FiveTuple, Proto, key_slot
from flowstate.record import FlowRecord
from flowstate.store._resp import RespConnection
from flowstate.store.base import LOOKUP_FAILED, ReplicaReads, StoreConfig
from flowstate.store.redis_cluster import RedisClusterStore

#: The deadline a stopped master's keys wait for; generous for a loaded machine (the test
#: asserts answers, not latency).
LOOKUP_MS = 500
OFF = StoreConfig(
    lookup_deadline_ms=LOOKUP_MS,
    write_deadline_ms=LOOKUP_MS,
    connect_timeout_ms=3000,
    read_from_replicas=ReplicaReads.OFF,
)
ON = StoreConfig(
    lookup_deadline_ms=LOOKUP_MS,
    write_deadline_ms=LOOKUP_MS,
    connect_timeout_ms=3000,
    read_from_replicas=ReplicaReads.ON_FAILURE,
)
_rng = random.Random(77)


def tuples(n: int) -> list[FiveTuple]:
    return [
        FiveTuple(Proto.TCP, _rng.randbytes(4), _rng.randrange(65536), _rng.randbytes(4), 443)
        for _ in range(n)
    ]


def records(n: int) -> list[FlowRecord]:
    return [
        FlowRecord(_rng.randbytes(16), _rng.randbytes(4), _rng.randrange(1 << 50), "pop0")
        for _ in range(n)
    ]


# -- the executor's logic, on scripted connections (no cluster) ------------------------------


class _Addr:
    def __init__(self, port: int) -> None:
        self.host, self.port, self.name = "127.0.0.1", port, f"127.0.0.1:{port}"


class _FakeRedisPy:
    """What the store reads of redis-py: a slot map of 3 masters (ports 1-3), each with a
    replica (ports 11-13)."""

    def __init__(self) -> None:
        pairs = [[_Addr(p), _Addr(p + 10)] for p in (1, 2, 3)]
        self.nodes_manager = self
        self.slots_cache = {s: pairs[s * 3 // CLUSTER_SLOTS] for s in range(CLUSTER_SLOTS)}

    async def initialize(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _Node:
    """A scripted node: answers GETs from `data` (after `delay_s`), or holds them (`stalled`)."""

    def __init__(self, conn: RespConnection, data: dict[bytes, bytes]) -> None:
        self.conn, self.data = conn, data
        self.delay_s = 0.0
        self.stalled = False
        self.gets = 0
        self.aborted = False

    def write(self, payload: bytes) -> None:
        if self.stalled:
            return
        reader = hiredis.Reader()
        reader.feed(payload)
        out = []
        while (cmd := reader.gets()) is not False:
            assert cmd[0] == b"GET", cmd
            self.gets += 1
            v = self.data.get(cmd[1])
            out.append(b"$-1\r\n" if v is None else b"$%d\r\n%b\r\n" % (len(v), v))
        self.conn.loop.call_later(self.delay_s, self.conn.data_received, b"".join(out))

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.conn.loop.call_soon(self.conn.connection_lost, None)


async def _scripted(
    mode: ReplicaReads,
) -> tuple[RedisClusterStore, dict[int, _Node], list[FiveTuple], list[FlowRecord]]:
    """A store on scripted masters and replicas holding the same 300 records."""
    ts, recs = tuples(300), records(300)
    data = {t.key(): r.encode() for t, r in zip(ts, recs, strict=True)}
    store = RedisClusterStore(
        _FakeRedisPy(),  # type: ignore[arg-type]
        password=None,
        username=None,
        config=StoreConfig(read_from_replicas=mode),
        ssl_context=None,
        fast_path=True,
    )
    nodes = {}
    for node in store._nodes():
        conn = RespConnection(asyncio.get_running_loop(), node.name)
        nodes[node.port] = _Node(conn, data)
        conn.connection_made(nodes[node.port])  # type: ignore[arg-type]
        node.conn = conn
    return store, nodes, ts, recs


def _on_master(ts: list[FiveTuple], port: int) -> set[int]:
    """Indices of the flows `_FakeRedisPy` puts on the master at `port`."""
    return {i for i, t in enumerate(ts) if key_slot(t.key()) * 3 // CLUSTER_SLOTS == port - 1}


async def test_a_slow_master_fails_its_keys_but_is_not_read_around() -> None:
    """Late answers (the node is alive, its connection in sync) are no reason to read a
    replica that may lag: the items fail this time, the master stays in use."""
    store, nodes, ts, recs = await _scripted(ReplicaReads.ON_FAILURE)
    store.silent_s = 60.0  # however loaded the machine, the late node never seems silent
    try:
        mine = _on_master(ts, 1)
        nodes[1].delay_s = 0.1
        got = await store.lookup_many(ts, partial=True, deadline_ms=30)
        assert got == _expect(recs, mine)
        assert store.counters["masters_failed"] == 0 and nodes[11].gets == 0
        nodes[1].delay_s = 0
        assert await store.lookup_many(ts, deadline_ms=5000) == recs
        assert nodes[11].gets == 0 and not nodes[1].aborted
    finally:
        await store.close()


async def test_a_stalled_master_is_read_around_from_the_next_call() -> None:
    for mode in ReplicaReads:
        store, nodes, ts, recs = await _scripted(mode)
        try:
            mine = _on_master(ts, 2)
            nodes[2].stalled = True
            # Silent past the stall limit: aborted at the deadline; no time left this call.
            got = await store.lookup_many(ts, partial=True, deadline_ms=300)
            assert got == _expect(recs, mine)
            assert nodes[2].aborted
            got = await store.lookup_many(ts, partial=True, deadline_ms=300)
            if mode is ReplicaReads.OFF:
                assert got == _expect(recs, mine) and nodes[12].gets == 0
            else:
                assert got == recs and nodes[12].gets == len(mine)
                assert store.counters["replica_reads"] == len(mine)
                assert store.counters["masters_failed"] == 1
        finally:
            await store.close()


async def test_a_silent_master_is_read_around_before_its_connection_stalls() -> None:
    """Silent for `silent_s` (50 ms) at a deadline: its replica answers from the next call on,
    within a forwarder's lookup patience (100 ms), before the 200 ms stall would abort."""
    store, nodes, ts, recs = await _scripted(ReplicaReads.ON_FAILURE)
    try:
        mine = _on_master(ts, 2)
        nodes[2].stalled = True
        got = await store.lookup_many(ts, partial=True, deadline_ms=60)  # never fires early
        assert got == _expect(recs, mine)
        assert store.counters["masters_failed"] == 1
        assert await store.lookup_many(ts, partial=True, deadline_ms=5000) == recs
        assert nodes[12].gets == len(mine)
    finally:
        await store.close()


async def test_a_lost_connection_is_read_around_in_the_same_call() -> None:
    store, nodes, ts, recs = await _scripted(ReplicaReads.ON_FAILURE)
    try:
        mine = _on_master(ts, 3)
        nodes[3].stalled = True
        call = asyncio.ensure_future(store.lookup_many(ts, partial=True, deadline_ms=5000))
        await asyncio.sleep(0.01)
        nodes[3].conn.connection_lost(ConnectionResetError("reset by peer"))
        assert await call == recs  # time was left: its replica answered
        assert nodes[13].gets == len(mine)
    finally:
        await store.close()


# -- against the cluster ---------------------------------------------------------------------


@dataclass
class Victim:
    """The master the test takes down, by node index, with its slots and its replicas."""

    index: int
    ranges: list[tuple[int, int]]
    replicas: list[int]

    def owns(self, t: FiveTuple) -> bool:
        slot = key_slot(t.key())
        return any(lo <= slot <= hi for lo, hi in self.ranges)


def _nodes(cluster: Any) -> list[list[str]]:
    with cluster.client(0) as c:
        text = c.text("CLUSTER", "NODES")
    return [line.split() for line in text.splitlines() if line.strip()]


def _victim(cluster: Any) -> Victim:
    index = {f"{h}:{p}": i for i, (h, p) in enumerate(cluster.seeds)}
    nodes = _nodes(cluster)
    for f in nodes:
        if "master" not in f[2] or "fail" in f[2]:
            continue
        ranges = []
        for r in f[8:]:
            if not r.startswith("["):
                lo, _, hi = r.partition("-")
                ranges.append((int(lo), int(hi or lo)))
        replicas = [index[g[1].split("@")[0]] for g in nodes if g[3] == f[0]]
        if ranges and replicas:
            return Victim(index[f[1].split("@")[0]], ranges, replicas)
    raise AssertionError("no master with a replica in the test cluster")


def _config_set(cluster: Any, index: int, name: str, value: str) -> None:
    with cluster.client(index) as c:
        c.call("CONFIG", "SET", name, value)


@pytest.fixture
def victim(redis_cluster: Any) -> Iterator[Victim]:
    """A master with a replica, its failover disabled; resumed (or restarted) afterwards."""
    if not redis_cluster.managed:
        pytest.skip("stops a node: needs the cluster started by deploy/redis-cluster")
    redis_cluster.wait_healthy()
    v = _victim(redis_cluster)
    all_nodes = range(len(redis_cluster.seeds))
    try:
        for i in all_nodes:
            _config_set(redis_cluster, i, "cluster-require-full-coverage", "no")
        for i in v.replicas:
            _config_set(redis_cluster, i, "cluster-replica-no-failover", "yes")
        yield v
    finally:
        redis_cluster.restart_node(v.index)  # SIGCONT or start, then wait until healthy
        for i in v.replicas:
            _config_set(redis_cluster, i, "cluster-replica-no-failover", "no")
        for i in all_nodes:
            _config_set(redis_cluster, i, "cluster-require-full-coverage", "yes")


async def _connect(cluster: Any, config: StoreConfig) -> RedisClusterStore:
    return await RedisClusterStore.connect(
        cluster.seeds, password=cluster.password or None, config=config
    )


async def _knows_replicas(store: RedisClusterStore, cluster: Any, v: Victim) -> None:
    """Wait until the store's slot map lists the victim's replicas (a new cluster announces
    them in CLUSTER SLOTS only after a few seconds)."""
    want = {tuple(cluster.seeds[i]) for i in v.replicas}
    end = time.monotonic() + 30
    while set(store.replicas().get(tuple(cluster.seeds[v.index]), [])) != want:
        assert time.monotonic() < end, f"the store never learnt the replicas {want}"
        await asyncio.sleep(0.2)
        await store.refresh_topology()


async def _pinned_batch(
    store: RedisClusterStore, cluster: Any, v: Victim
) -> tuple[list[FiveTuple], list[FlowRecord], set[int]]:
    """300 flows over every master, pinned and replicated; the indices of the victim's."""
    await _knows_replicas(store, cluster, v)
    ts, recs = tuples(300), records(300)
    pinned = await store.pin_many(
        [(t, r, 120_000) for t, r in zip(ts, recs, strict=True)], deadline_ms=10_000
    )
    assert pinned == recs
    with cluster.client(v.index) as c:  # the replica has them before the master goes
        assert c.call("WAIT", len(v.replicas), 5000) == len(v.replicas)
    mine = {i for i, t in enumerate(ts) if v.owns(t)}
    assert 0 < len(mine) < len(ts)
    return ts, recs, mine


def _expect(recs: list[FlowRecord], mine: set[int]) -> list[Any]:
    return [LOOKUP_FAILED if i in mine else r for i, r in enumerate(recs)]


async def test_stopped_master_fails_only_its_keys_or_its_replica_answers(
    redis_cluster: Any, victim: Victim
) -> None:
    off = await _connect(redis_cluster, OFF)
    on = await _connect(redis_cluster, ON)
    try:
        ts, recs, mine = await _pinned_batch(on, redis_cluster, victim)
        # All masters up: replicas are not read.
        assert await on.lookup_many(ts, partial=True) == recs
        assert on.counters["replica_reads"] == 0

        redis_cluster.kill_node(victim.index, "STOP")
        # Replica reads off: the stopped master's keys are unknown, the others answered.
        assert await off.lookup_many(ts, partial=True) == _expect(recs, mine)
        assert off.counters["replica_reads"] == 0 and off.counters["failed_items"] == len(mine)
        with pytest.raises(StoreUnavailable):  # without `partial`: the call fails
            await off.lookup_many(ts)
        # Its connection, stalled, was aborted: calls now re-dial it (the connect hangs) and
        # the other masters are asked meanwhile, not after.
        assert off.counters["stalled"] >= 1
        assert await off.lookup_many(ts, partial=True) == _expect(recs, mine)
        with pytest.raises(StoreUnavailable):  # nothing answered: the call fails
            await off.lookup_many([ts[i] for i in sorted(mine)], partial=True)

        # On failure: the first call meets the stall at its deadline (no time left for the
        # replica), so the master's keys may still fail there, and only there.
        got = await on.lookup_many(ts, partial=True)
        assert all(got[i] == recs[i] or (i in mine and got[i] is LOOKUP_FAILED) for i in range(300))
        # From then on its replica answers them.
        # (Deadlines that a loaded machine cannot miss: the stopped master is not asked.)
        before = on.counters["replica_reads"]
        got = await on.lookup_many(ts, partial=True, deadline_ms=5000)
        assert got == recs, on.counters
        assert await on.lookup_many(ts, deadline_ms=5000) == recs
        assert on.counters["replica_reads"] - before == 2 * len(mine)
        # Writes never go to a replica: those of the stopped master's keys fail.
        i = min(mine)
        with pytest.raises(StoreUnavailable):
            await on.pin_many([(ts[i], recs[i], 120_000)])
    finally:
        await off.close()
        redis_cluster.restart_node(victim.index)  # SIGCONT: the master answers again
    try:
        # The probe finds the master answering: reads go back to it (no more replica reads).
        end = time.monotonic() + 30
        while True:
            before = on.counters["replica_reads"]
            got = await on.lookup_many(ts, partial=True, deadline_ms=3000)
            if on.counters["replica_reads"] == before:
                break
            assert time.monotonic() < end, "reads never returned to the resumed master"
            await asyncio.sleep(0.1)
        assert got == recs
        assert on.counters["masters_failed"] >= 1
    finally:
        await on.close()


async def test_killed_master_fails_only_its_keys_or_its_replica_answers_at_once(
    redis_cluster: Any, victim: Victim
) -> None:
    off = await _connect(redis_cluster, OFF)
    on = await _connect(redis_cluster, ON)
    try:
        ts, recs, mine = await _pinned_batch(on, redis_cluster, victim)
        redis_cluster.kill_node(victim.index, "KILL")
        # Refused (not timed out): the same call re-sends its keys to the replica.
        assert await on.lookup_many(ts, partial=True) == recs
        assert on.counters["replica_reads"] == len(mine)
        assert await off.lookup_many(ts, partial=True) == _expect(recs, mine)
        assert off.counters["failed_items"] == len(mine)
        with pytest.raises(StoreUnavailable):
            await on.touch_many([(ts[min(mine)], 120_000)])
    finally:
        await off.close()
        await on.close()
