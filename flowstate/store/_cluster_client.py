"""The machinery under `RedisClusterStore`: slot map, connections, deadlines, executor.

`ClusterClient` keeps a slot → master map (from redis-py's discovered topology), one
pipelined `RespConnection` per master, and runs a batch: group by master, one write per
group, replies matched in order; items answered MOVED / ASK / TRYAGAIN / CLUSTERDOWN are
re-run through redis-py's cluster pipeline (which follows redirections) and the map is
refreshed in the background. With `fast_path=False` every batch takes the redis-py path
(the reference the fast path is tested against).

Deadlines: see `ClusterClient._wait` (a caller that gives up leaves its connection in sync;
a desynchronised or stalled connection is aborted and re-dialled lazily) and
`ClusterClient._conn` (a node whose dial just failed is not re-dialled before a short
backoff, so calls fail fast while it is down).

Reads (`_exec_read`) answer item by item: the items of a master that cannot answer are
`LOOKUP_FAILED`, the others are answered. With `read_from_replicas = "on-failure"` a master
that failed a read (connect refused or timed out, connection lost, or silent: a deadline
passed with nothing received for `silent_s` while replies are owed; a merely slow answer
does not count) is marked failed: its items of the same call are re-sent to one of its
replicas if time is left, and later reads of its slots go to the replica at once (on a
READONLY connection of its own) until a background probe (PING every `_PROBE_S`) finds the
master answering again, or a new slot map no longer lists it as a master (failover).
"""

from __future__ import annotations

import asyncio
import heapq
import ssl
from collections.abc import Callable
from typing import Any

import redis.asyncio.cluster as rcluster
import redis.exceptions as rexc

from flowstate.errors import StoreUnavailable
from flowstate.flow import CLUSTER_SLOTS
from flowstate.store._codec import group_by_node
from flowstate.store._resp import HiredisReplyError, RespConnection, open_connection
from flowstate.store.base import LOOKUP_FAILED, ReplicaReads, StoreConfig

#: Error replies meaning "not here / not now": the item is re-run through redis-py.
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
#: A connection owing replies that received nothing for this long is aborted at the next
#: deadline that passes on it.
_STALL_S = 0.2
#: A read's deadline that passes with nothing received for this long on a connection owing
#: replies marks its master failed (reads go to a replica; the connection is kept until it
#: stalls). Below the default lookup patience (100 ms), so that the flows of a hung master
#: are answered by its replica when asked again, not by Maglev.
_SILENT_S = 0.05
#: ... or that owes more replies than this (requests pile up faster than it answers).
_MAX_OWED = 250_000
_BACKOFF_MIN = 0.02
_BACKOFF_MAX = 1.0
_REFRESH_MIN_INTERVAL = 0.1
_REFRESH_FAIL_INTERVAL = 0.5
#: How often a master that reads bypass is probed.
_PROBE_S = 0.2
_PING = b"*1\r\n$4\r\nPING\r\n"
_READONLY = b"*1\r\n$8\r\nREADONLY\r\n"

#: The groups one call sent: (connection, future of the group's replies).
_Pend = list[tuple[RespConnection, "asyncio.Future[list[Any]]"]]
#: Builds the payload of a group of items (by index).
Build = Callable[[list[int]], bytes]
#: Queues the commands of one item (by index) on a redis-py cluster pipeline.
Ref = Callable[[Any, int], None]
#: The items (by index) of one master in a read, the master, and the node read from (the
#: master or one of its replicas).
_Group = tuple[list[int], "_Node", "_Node"]


class _Node:
    """One node: its address, its fast connection and the state of re-dialling it.

    Masters and replicas are separate `_Node`s (a replica's connection is READONLY and only
    carries reads), even for one address."""

    __slots__ = (
        "backoff",
        "conn",
        "dial",
        "failed",
        "host",
        "name",
        "port",
        "probe",
        "readonly",
        "replicas",
        "retry_at",
    )

    def __init__(self, host: str, port: int, *, readonly: bool = False) -> None:
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.conn: RespConnection | None = None
        self.dial: asyncio.Task[RespConnection] | None = None
        self.retry_at = 0.0
        self.backoff = _BACKOFF_MIN
        self.readonly = readonly
        #: Of a master: its replicas (from the slot map), as read-only nodes.
        self.replicas: list[_Node] = []
        #: Of a master: reads bypass it (to a replica) until `probe` finds it answering.
        self.failed = False
        self.probe: asyncio.Task[None] | None = None


class _Deadline(Exception):
    pass


class _Slow(StoreUnavailable):
    """A group's deadline passed on a connection that is not silent (the node answers, late)."""


class ClusterClient:
    """Topology, connections and the batch executor (see the module docstring)."""

    def __init__(
        self,
        rc: rcluster.RedisCluster,
        *,
        password: str | None,
        username: str | None,
        config: StoreConfig,
        ssl_context: ssl.SSLContext | None,
        fast_path: bool,
    ) -> None:
        self._rc = rc
        self._password = password
        self._username = username
        self.config = config
        self._ssl = ssl_context
        self.fast_path = fast_path
        self._loop = asyncio.get_running_loop()
        self._pool: dict[tuple[str, int], _Node] = {}
        self._rpool: dict[tuple[str, int], _Node] = {}  # replicas' read-only connections
        self._masters: list[_Node] = []
        self._slot_node: list[int] = [-1] * CLUSTER_SLOTS
        self._refresh_task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._refresh_after = 0.0
        self._closed = False
        #: See `_SILENT_S` (tests raise it to tell a slow master from a silent one).
        self.silent_s = _SILENT_S
        self._wheel: dict[int, dict[int, _Pend]] = {}
        self._wheel_buckets: list[int] = []
        self._tick: asyncio.TimerHandle | None = None
        self._tick_bucket: int | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "bad_records",
                "moved",
                "ask",
                "tryagain",
                "clusterdown",
                "redirected_items",
                "timeouts",
                "stalled",
                "connection_errors",
                "connects",
                "connect_failures",
                "fast_fail",
                "refreshes",
                "refresh_failures",
                "error_replies",
                "masters_failed",
                "replica_reads",
                "replica_failures",
                "failed_items",
            ),
            0,
        )
        self._load_topology()

    # -- topology --------------------------------------------------------------------------

    def _load_topology(self) -> None:
        cache = self._rc.nodes_manager.slots_cache
        masters: list[_Node] = []
        index: dict[str, int] = {}
        slot_node = [-1] * CLUSTER_SLOTS
        for slot, nodes in cache.items():
            if not nodes:
                continue
            primary = nodes[0]
            i = index.get(primary.name)
            if i is None:
                addr = (primary.host, int(primary.port))
                node = self._pool.get(addr)
                if node is None:
                    node = self._pool[addr] = _Node(*addr)
                i = index[primary.name] = len(masters)
                masters.append(node)
                node.replicas = [self._replica(r.host, int(r.port)) for r in nodes[1:]]
            slot_node[slot] = i
        self._masters = masters
        self._slot_node = slot_node
        for node in masters:
            if node.failed and node.probe is None:
                self._start_probe(node)

    def _replica(self, host: str, port: int) -> _Node:
        node = self._rpool.get((host, port))
        if node is None:
            node = self._rpool[(host, port)] = _Node(host, port, readonly=True)
        return node

    def _nodes(self) -> list[_Node]:
        """Every node a connection or task may be held for (masters and replicas)."""
        return [*self._pool.values(), *self._rpool.values()]

    def _schedule_refresh(self) -> None:
        if self._refresh_task is not None or self._closed:
            return
        if self._loop.time() < self._refresh_after:
            return
        self._refresh_task = self._loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        ok = False
        try:
            async with asyncio.timeout(self.config.connect_timeout_ms / 1000):
                await self._rc.nodes_manager.initialize()
            self._load_topology()
            self.counters["refreshes"] += 1
            ok = True
            self._dial_idle_masters()
        except (TimeoutError, OSError, rexc.RedisError, rexc.RedisClusterException):
            self.counters["refresh_failures"] += 1
        finally:
            self._refresh_after = self._loop.time() + (
                _REFRESH_MIN_INTERVAL if ok else _REFRESH_FAIL_INTERVAL
            )
            self._refresh_task = None

    def watch_topology(self) -> None:
        """Re-read the slot map every `config.topology_refresh_ms` from now on (until close)."""
        every_s = self.config.topology_refresh_ms / 1000
        if self._watch is None and every_s > 0 and not self._closed:
            self._watch = self._loop.create_task(self._watch_topology(every_s))

    async def _watch_topology(self, every_s: float) -> None:
        while not self._closed:
            await asyncio.sleep(every_s)
            self._schedule_refresh()

    def _dial_idle_masters(self) -> None:
        """Start connecting to masters without a live connection (new ones after a failover),
        so that the next batch does not pay the connect (with TLS, the handshake) inside its
        deadline; with replica reads, to their replicas as well (ready before a master
        fails)."""
        now = self._loop.time()
        nodes = self._masters
        if self.config.read_from_replicas is ReplicaReads.ON_FAILURE:
            nodes = [*nodes, *(r for m in nodes for r in m.replicas)]
        for node in nodes:
            idle = node.conn is None or not node.conn.alive
            if idle and node.dial is None and now >= node.retry_at:
                node.dial = self._loop.create_task(self._dial(node))
                node.dial.add_done_callback(_retrieve)

    async def refresh_topology(self) -> None:
        """Re-read the slot map now (tests, operators); normally done on MOVED by itself."""
        if self._refresh_task is not None:
            await asyncio.shield(self._refresh_task)
        self._refresh_after = 0.0
        self._schedule_refresh()
        if self._refresh_task is not None:
            await asyncio.shield(self._refresh_task)

    def masters(self) -> list[tuple[str, int]]:
        """Addresses of the masters in the fast path's slot map."""
        return [(n.host, n.port) for n in self._masters]

    def replicas(self) -> dict[tuple[str, int], list[tuple[str, int]]]:
        """Each master's replicas in the slot map (a replica the cluster has not announced
        yet, as right after it was created, is missing until a later refresh)."""
        return {(n.host, n.port): [(r.host, r.port) for r in n.replicas] for n in self._masters}

    # -- connections -----------------------------------------------------------------------

    async def connect_all(self, timeout_ms: float) -> None:
        """Dial every master now (not on first use), so a freshly started forwarder's first
        lookups do not all wait on connects. Raise StoreUnavailable only if no master answers:
        with some reachable, the others stay in back-off and their keys fail fast meanwhile."""
        deadline_at = self._loop.time() + timeout_ms / 1000
        results = await asyncio.gather(
            *(self._conn(node, deadline_at) for node in self._masters), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed and len(failed) == len(results):
            raise StoreUnavailable(f"no master reachable: {failed[0]}") from None
        self._dial_idle_masters()  # replicas, in the background

    async def _conn(self, node: _Node, deadline_at: float) -> RespConnection:
        conn = node.conn
        if conn is not None and conn.alive:
            return conn
        if self._closed:
            raise StoreUnavailable("store is closed")
        task = node.dial
        if task is None:
            if self._loop.time() < node.retry_at:
                self.counters["fast_fail"] += 1
                raise StoreUnavailable(f"{node.name} is down (backing off)")
            task = node.dial = self._loop.create_task(self._dial(node))
            task.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout_at(deadline_at):
                return await asyncio.shield(task)
        except TimeoutError:
            self.counters["timeouts"] += 1
            raise StoreUnavailable(f"{node.name}: connect did not finish in time") from None

    async def _dial(self, node: _Node) -> RespConnection:
        timeout = self.config.connect_timeout_ms / 1000
        try:
            conn = await open_connection(
                node.host,
                node.port,
                timeout=timeout,
                password=self._password,
                username=self._username,
                ssl_context=self._ssl,
            )
            if node.readonly:
                await _readonly(conn, timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.counters["connect_failures"] += 1
            node.retry_at = self._loop.time() + node.backoff
            node.backoff = min(node.backoff * 2, _BACKOFF_MAX)
            self._schedule_refresh()
            raise StoreUnavailable(f"cannot connect to {node.name}: {exc!r}") from None
        finally:
            node.dial = None
        if self._closed:
            await conn.aclose()
            raise StoreUnavailable("store is closed")
        self.counters["connects"] += 1
        node.backoff = _BACKOFF_MIN
        node.conn = conn
        return conn

    async def _wait(self, pend: _Pend, deadline_at: float) -> list[list[Any]]:
        """Await the replies of every sent group, until the deadline.

        At the deadline the caller gives up. Its requests stay queued on their connections,
        whose replies are then parsed and dropped in order, so the reply stream stays in
        sync and the connection is kept: aborting it would also fail every other caller's
        requests in flight on it (measured with 5 ms deadlines under load: throughput fell
        10x, each timeout cascading into reconnects). A connection on which nothing at all
        has arrived for `_STALL_S` while replies are owed, or that owes more than `_MAX_OWED`
        replies, is aborted (and re-dialled lazily).
        """

        entries = self._track(pend, deadline_at)
        try:
            return [await fut for _, fut in pend]
        except _Deadline:
            self.counters["timeouts"] += 1
            self._schedule_refresh()  # a master that stopped answering may have been replaced
            raise StoreUnavailable("deadline exceeded waiting for Redis") from None
        except ConnectionError as exc:
            self.counters["connection_errors"] += 1
            self._schedule_refresh()
            raise StoreUnavailable(str(exc)) from None
        finally:
            entries.pop(id(pend), None)

    # Deadlines are kept on a wheel of 1 ms buckets served by one timer, not a timer per call:
    # uvloop's call_at + cancel costs ~3.3 us, a quarter of a one-flow call. A call expires
    # at the first bucket boundary at or after its deadline (up to 1 ms late, never early).
    # A call leaves its bucket when it ends (not kept alive until its deadline passes).

    def _track(self, pend: _Pend, deadline_at: float) -> dict[int, _Pend]:
        bucket = int(deadline_at * 1000) + 1
        entries = self._wheel.get(bucket)
        if entries is None:
            entries = self._wheel[bucket] = {}
            heapq.heappush(self._wheel_buckets, bucket)
            if self._tick_bucket is None or bucket < self._tick_bucket:
                self._arm(bucket)
        entries[id(pend)] = pend
        return entries

    def _arm(self, bucket: int) -> None:
        if self._tick is not None:
            self._tick.cancel()
        self._tick_bucket = bucket
        when = max(bucket / 1000, self._loop.time() + 0.0001)
        self._tick = self._loop.call_at(when, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self._tick_bucket = None
        now = self._loop.time()
        now_ms = now * 1000
        buckets = self._wheel_buckets
        while buckets and buckets[0] <= now_ms:
            for pend in list(self._wheel.pop(heapq.heappop(buckets)).values()):
                self._expire(pend, now)
        if buckets:
            self._arm(buckets[0])

    def _expire(self, pend: _Pend, now: float) -> None:
        for conn, fut in pend:
            if not fut.done():
                fut.set_exception(_Deadline())
                fut.exception()
                if conn.alive and conn.stalled(now, _STALL_S, _MAX_OWED):
                    self.counters["stalled"] += 1
                    conn.abort(
                        f"{conn.name}: stalled ({conn.owed} replies owed, none for "
                        f"{(now - conn.last_rx) * 1000:.0f} ms)"
                    )

    def _stop_wheel(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._wheel.clear()
        self._wheel_buckets.clear()

    # -- the executor ----------------------------------------------------------------------

    def _deadline(self, deadline_ms: float | None, default_ms: float) -> float:
        ms = default_ms if deadline_ms is None else deadline_ms
        return self._loop.time() + ms / 1000

    async def _exec(
        self, keys: list[bytes], nrep: int, build: Build, ref: Ref, deadline_at: float
    ) -> list[Any]:
        """Run each item's `nrep` commands; return its reply (or list of replies if nrep > 1).

        Items whose reply is a redirection are re-run through redis-py.
        """
        if not keys:
            return []
        if self._closed:
            raise StoreUnavailable("store is closed")
        if not self.fast_path:
            return await self._exec_ref(list(range(len(keys))), nrep, ref, deadline_at)
        masters = self._masters
        groups = group_by_node(keys, self._slot_node, len(masters))
        redo = groups[-1]
        sent: list[tuple[list[int], RespConnection]] = []
        for i, idxs in enumerate(groups[:-1]):
            if idxs:
                node = masters[i]
                conn = node.conn
                if conn is None or not conn.alive:
                    conn = await self._conn(node, deadline_at)
                sent.append((idxs, conn))
        pend = [(conn, conn.send(build(idxs), len(idxs) * nrep)) for idxs, conn in sent]
        replies = await self._wait(pend, deadline_at)
        out: list[Any] = [None] * len(keys)
        err = HiredisReplyError
        for (idxs, _), rep in zip(sent, replies, strict=True):
            if nrep == 1:
                for i, r in zip(idxs, rep, strict=True):
                    if type(r) is err and self._is_redirect(r):
                        redo.append(i)
                    else:
                        out[i] = r
            else:
                for j, i in enumerate(idxs):
                    item = rep[j * nrep : (j + 1) * nrep]
                    if any(type(r) is err and self._is_redirect(r) for r in item):
                        redo.append(i)
                    else:
                        out[i] = item
        if redo:
            self.counters["redirected_items"] += len(redo)
            self._schedule_refresh()
            again = await self._exec_ref(redo, nrep, ref, deadline_at)
            for i, r in zip(redo, again, strict=True):
                out[i] = r
        return out

    def _is_redirect(self, r: Exception) -> bool:
        msg = str(r)
        for kind in _REDIRECTS:
            if msg.startswith(kind):
                self.counters[kind.lower()] += 1
                return True
        return False

    async def _exec_read(
        self, keys: list[bytes], build: Build, ref: Ref, deadline_at: float
    ) -> tuple[list[Any], str | None]:
        """Run one read command per item, answering item by item: each item's reply, or
        `LOOKUP_FAILED` where neither its master nor (with replica reads) a replica answered
        in time; and why the first failed item failed (None if none did).

        Raises `StoreUnavailable` only if the store is closed. The reference path
        (`fast_path=False`) fails or answers the batch as a whole.
        """
        if not keys:
            return [], None
        if self._closed:
            raise StoreUnavailable("store is closed")
        if not self.fast_path:
            try:
                return await self._exec_ref(list(range(len(keys))), 1, ref, deadline_at), None
            except StoreUnavailable as exc:
                self.counters["failed_items"] += len(keys)
                return [LOOKUP_FAILED] * len(keys), str(exc)
        masters = self._masters
        groups = group_by_node(keys, self._slot_node, len(masters))
        redo = groups[-1]
        on_failure = self.config.read_from_replicas is ReplicaReads.ON_FAILURE
        todo: list[_Group] = []
        for i, idxs in enumerate(groups[:-1]):
            if idxs:
                node = masters[i]
                target = node
                if node.failed and on_failure:
                    target = self._replica_of(node) or node
                todo.append((idxs, node, target))
        out: list[Any] = [None] * len(keys)
        errors: list[str] = []
        while todo:
            todo = await self._read_round(todo, build, deadline_at, out, redo, errors)
        if redo:
            self.counters["redirected_items"] += len(redo)
            self._schedule_refresh()
            try:
                again = await self._exec_ref(redo, 1, ref, deadline_at)
            except StoreUnavailable as exc:
                errors.append(str(exc))
                self.counters["failed_items"] += len(redo)
                for i in redo:
                    out[i] = LOOKUP_FAILED
            else:
                for i, r in zip(redo, again, strict=True):
                    out[i] = r
        return out, errors[0] if errors else None

    async def _read_round(
        self,
        todo: list[_Group],
        build: Build,
        deadline_at: float,
        out: list[Any],
        redo: list[int],
        errors: list[str],
    ) -> list[_Group]:
        """Send each group to its target, fill `out` (`redo`: redirected items); return the
        groups to send again (to a replica: their master failed and time is left)."""
        sent: list[_Group] = []
        pend: _Pend = []
        failed: list[tuple[_Group, BaseException]] = []
        dial: list[_Group] = []
        for g in todo:
            conn = g[2].conn
            if conn is not None and conn.alive:
                sent.append(g)
                pend.append((conn, conn.send(build(g[0]), len(g[0]))))
            else:
                dial.append(g)
        if dial:  # sent to the connected nodes first; dialled concurrently
            conns = await asyncio.gather(
                *(self._conn(g[2], deadline_at) for g in dial), return_exceptions=True
            )
            for g, c in zip(dial, conns, strict=True):
                if isinstance(c, RespConnection):
                    sent.append(g)
                    pend.append((c, c.send(build(g[0]), len(g[0]))))
                elif isinstance(c, StoreUnavailable):
                    failed.append((g, c))
                else:
                    raise c
        if sent:
            results = await self._wait_each(pend, deadline_at)
            err = HiredisReplyError
            for g, rep in zip(sent, results, strict=True):
                if isinstance(rep, BaseException):
                    failed.append((g, rep))
                    continue
                idxs, master, target = g
                for i, r in zip(idxs, rep, strict=True):
                    if type(r) is err and self._is_redirect(r):
                        redo.append(i)
                    else:
                        out[i] = r
                if target is not master:
                    self.counters["replica_reads"] += len(idxs)
        again: list[_Group] = []
        on_failure = self.config.read_from_replicas is ReplicaReads.ON_FAILURE
        for g, exc in failed:
            idxs, master, target = g
            if target is master:
                if on_failure and master.replicas and not isinstance(exc, _Slow):
                    self._master_failed(master)
                    replica = self._replica_of(master)
                    if replica is not None and self._loop.time() < deadline_at:
                        again.append((idxs, master, replica))
                        continue
            else:
                self.counters["replica_failures"] += 1
            errors.append(str(exc))
            self.counters["failed_items"] += len(idxs)
            for i in idxs:
                out[i] = LOOKUP_FAILED
        return again

    async def _wait_each(self, pend: _Pend, deadline_at: float) -> list[list[Any] | Exception]:
        """`_wait`, group by group: each group's replies, or the `StoreUnavailable` it failed
        with (deadline, connection lost); the others are not abandoned for it."""
        entries = self._track(pend, deadline_at)
        out: list[list[Any] | Exception] = []
        timeouts = 0
        try:
            for conn, fut in pend:
                try:
                    out.append(await fut)
                except _Deadline:
                    timeouts += 1
                    if not conn.alive:  # `_expire` aborted it: stalled
                        out.append(StoreUnavailable(f"{conn.name}: deadline exceeded, stalled"))
                    elif conn.stalled(self._loop.time(), self.silent_s, _MAX_OWED):
                        out.append(StoreUnavailable(f"{conn.name}: deadline exceeded, silent"))
                    else:
                        out.append(_Slow(f"{conn.name}: deadline exceeded"))
                except ConnectionError as exc:
                    self.counters["connection_errors"] += 1
                    out.append(StoreUnavailable(str(exc)))
        finally:
            entries.pop(id(pend), None)
        if timeouts:
            self.counters["timeouts"] += 1
        if len(out) != sum(type(r) is list for r in out):
            self._schedule_refresh()  # a master that stopped answering may have been replaced
        return out

    def _replica_of(self, master: _Node) -> _Node | None:
        """The replica to read `master`'s slots from: one already connected, else one that
        may be dialled now (not backing off), else None."""
        now = self._loop.time()
        best = None
        for r in master.replicas:
            if r.conn is not None and r.conn.alive:
                return r
            if best is None and (r.dial is not None or now >= r.retry_at):
                best = r
        return best

    def _master_failed(self, node: _Node) -> None:
        """Reads bypass `node` (a master with replicas) from now on, to a replica dialled now,
        until a probe finds it answering again."""
        if not node.failed:
            node.failed = True
            self.counters["masters_failed"] += 1
        replica = self._replica_of(node)
        idle = replica is not None and (replica.conn is None or not replica.conn.alive)
        if replica is not None and idle and replica.dial is None and not self._closed:
            replica.dial = self._loop.create_task(self._dial(replica))
            replica.dial.add_done_callback(_retrieve)
        if node.probe is None:
            self._start_probe(node)

    def _start_probe(self, node: _Node) -> None:
        if not self._closed:
            node.probe = self._loop.create_task(self._probe(node))
            node.probe.add_done_callback(_retrieve)

    async def _probe(self, node: _Node) -> None:
        """PING a failed master every `_PROBE_S` until it answers (reads return to it) or the
        slot map no longer lists it as a master (its slots have a new one)."""
        try:
            while node.failed and not self._closed:
                await asyncio.sleep(_PROBE_S)
                if node not in self._masters:
                    node.failed = False
                    return
                deadline_at = self._loop.time() + self.config.connect_timeout_ms / 1000
                try:
                    conn = await self._conn(node, deadline_at)
                    ((reply,),) = await self._wait([(conn, conn.send(_PING, 1))], deadline_at)
                except StoreUnavailable:
                    continue
                if not isinstance(reply, Exception):  # (LOADING and the like: not yet)
                    node.failed = False
        finally:
            node.probe = None

    async def _exec_ref(
        self, idxs: list[int], nrep: int, ref: Ref, deadline_at: float
    ) -> list[Any]:
        """The reference path: items `idxs` through redis-py's cluster pipeline."""
        pipe = self._rc.pipeline(transaction=False)
        for i in idxs:
            ref(pipe, i)
        try:
            async with asyncio.timeout_at(deadline_at):
                res = await pipe.execute(raise_on_error=False)
        except TimeoutError:
            self.counters["timeouts"] += 1
            raise StoreUnavailable("deadline exceeded waiting for Redis (redis-py)") from None
        except (OSError, rexc.RedisError, rexc.RedisClusterException) as exc:
            self.counters["connection_errors"] += 1
            raise StoreUnavailable(f"Redis Cluster unavailable: {exc!r}") from None
        for r in res:
            if isinstance(r, (OSError, rexc.ConnectionError, rexc.TimeoutError)):
                raise StoreUnavailable(f"Redis Cluster unavailable: {r!r}")
            if isinstance(r, (rexc.ClusterDownError, rexc.TryAgainError, rexc.ClusterError)):
                raise StoreUnavailable(f"Redis Cluster unavailable: {r!r}")
        if nrep == 1:
            return list(res)
        return [list(res[j * nrep : (j + 1) * nrep]) for j in range(len(idxs))]

    def _unexpected(self, r: object) -> StoreUnavailable:
        self.counters["error_replies"] += 1
        return StoreUnavailable(f"unexpected reply from Redis: {r!r}")


async def _readonly(conn: RespConnection, timeout: float) -> None:
    """READONLY on a fresh connection to a replica (reads of its master's slots)."""
    try:
        async with asyncio.timeout(timeout):
            (reply,) = await conn.send(_READONLY, 1)
        if isinstance(reply, Exception):
            raise ConnectionError(f"{conn.name}: READONLY refused: {reply}")
    except BaseException:
        conn.abort(f"{conn.name}: READONLY failed")
        raise


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
