"""`RedisClusterStore`: the `FlowStore` API on a Redis Cluster (Redis >= 7.0).

Two paths share one set of semantics:

* the **fast path** (default): a slot → master map, one pipelined hiredis connection per
  master (`_resp.RespConnection`); a batch is grouped by master and each group is written
  with one write and parsed by one `hiredis.Reader`. Replies that say the map is stale
  (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) send just those items through redis-py, which
  follows redirections, and schedule a refresh of the slot map;
* the **reference path** (`fast_path=False`): every batch goes through redis-py's cluster
  pipeline. Tests check that both answer alike; it is also the fallback of the fast path.

Every call is bounded by its deadline: a timeout, refused connection, reset or cluster down
raises `StoreUnavailable`. A connection whose reply stream could be out of sync, or that
has stalled, is aborted and re-dialled lazily (a caller that merely timed out leaves it in
sync: see `_wait`); dialling a node that just failed backs off, so a down cluster fails
fast instead of every call waiting for a connect.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import redis.asyncio.cluster as rcluster
import redis.exceptions as rexc

from flowstate.errors import RecordError, StoreUnavailable, UsageError
from flowstate.flow import CLUSTER_SLOTS, KEY_PREFIX, FiveTuple
from flowstate.record import FlowRecord
from flowstate.store._codec import decode_fast, encode_records, group_by_node, keys_of
from flowstate.store._resp import (
    HiredisReplyError,
    RespConnection,
    open_connection,
    pack_command,
)
from flowstate.store.base import FlowStore, PinItem, ScanEntry, StoreConfig

_KEY_LEN = len(KEY_PREFIX) + 16
_GET_HEAD = b"*2\r\n$3\r\nGET\r\n$%d\r\n" % _KEY_LEN
_GET_SEP = b"\r\n" + _GET_HEAD
_SETNX_FMT = b"*7\r\n$3\r\nSET\r\n$%d\r\n%%b\r\n$%%d\r\n%%b%%b" % _KEY_LEN
_SET_FMT = b"*5\r\n$3\r\nSET\r\n$%d\r\n%%b\r\n$%%d\r\n%%b%%b" % _KEY_LEN
_PEXPIRE_FMT = b"*3\r\n$7\r\nPEXPIRE\r\n$%d\r\n%%b%%b" % _KEY_LEN
_RELEASE_FMT = b"*4\r\n$7\r\nPEXPIRE\r\n$%d\r\n%%b%%b*2\r\n$6\r\nEXISTS\r\n$%d\r\n%%b\r\n" % (
    _KEY_LEN,
    _KEY_LEN,
)
_DEL_HEAD = b"*2\r\n$3\r\nDEL\r\n$%d\r\n" % _KEY_LEN
_PTTL_HEAD = b"*2\r\n$4\r\nPTTL\r\n$%d\r\n" % _KEY_LEN

#: Error replies meaning "not here / not now": the item is re-run through redis-py.
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
#: A connection owing replies that received nothing for this long is aborted at the next
#: deadline that passes on it.
_STALL_S = 0.2
#: ... or that owes more replies than this (requests pile up faster than it answers).
_MAX_OWED = 250_000
_BACKOFF_MIN = 0.02
_BACKOFF_MAX = 1.0
_REFRESH_MIN_INTERVAL = 0.1
_REFRESH_FAIL_INTERVAL = 0.5

#: Builds the payload of a group of items (by index).
Build = Callable[[list[int]], bytes]
#: Queues the commands of one item (by index) on a redis-py cluster pipeline.
Ref = Callable[[Any, int], None]


def _ms(value: int) -> bytes:
    if type(value) is not int or value <= 0:
        raise UsageError(f"TTL must be a positive integer of ms, got {value!r}")
    return b"%d" % value


def _ttl_arg(value: int) -> bytes:
    s = _ms(value)
    return b"\r\n$%d\r\n%b\r\n" % (len(s), s)


class _Node:
    """One master: its address, its fast connection and the state of re-dialling it."""

    __slots__ = ("backoff", "conn", "dial", "host", "name", "port", "retry_at")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.conn: RespConnection | None = None
        self.dial: asyncio.Task[RespConnection] | None = None
        self.retry_at = 0.0
        self.backoff = _BACKOFF_MIN


class _Deadline(Exception):
    pass


class RedisClusterStore(FlowStore):
    """Flow pinnings in a Redis Cluster. Build it with `await RedisClusterStore.connect(...)`."""

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
        self._masters: list[_Node] = []
        self._slot_node: list[int] = [-1] * CLUSTER_SLOTS
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_after = 0.0
        self._closed = False
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
            ),
            0,
        )
        self._load_topology()

    @classmethod
    async def connect(
        cls,
        seeds: Sequence[tuple[str, int]],
        *,
        password: str | None = None,
        username: str | None = None,
        config: StoreConfig = StoreConfig(),  # noqa: B008 (frozen, immutable)
        ssl_context: ssl.SSLContext | None = None,
        fast_path: bool = True,
    ) -> RedisClusterStore:
        """Discover the cluster from `seeds` within `config.connect_timeout_ms`.

        Raises `StoreUnavailable` if no seed answers with a usable topology in time.
        `ssl_context` is reserved for TLS (not supported yet: raises `UsageError`).
        """
        if ssl_context is not None:
            raise UsageError("TLS to Redis is not supported yet")
        if not seeds:
            raise UsageError("at least one seed host:port is needed")
        timeout = config.connect_timeout_ms / 1000
        rc = rcluster.RedisCluster(
            startup_nodes=[rcluster.ClusterNode(h, p) for h, p in seeds],
            password=password,
            username=username,
            socket_connect_timeout=timeout,
            socket_timeout=max(timeout, config.scan_deadline_ms / 1000),
            require_full_coverage=False,
        )
        try:
            async with asyncio.timeout(timeout):
                await rc.initialize()
        except (TimeoutError, OSError, rexc.RedisError, rexc.RedisClusterException) as exc:
            await rc.aclose()
            raise StoreUnavailable(f"cannot discover the cluster from {seeds}: {exc!r}") from None
        except BaseException:
            await rc.aclose()
            raise
        return cls(
            rc,
            password=password,
            username=username,
            config=config,
            ssl_context=ssl_context,
            fast_path=fast_path,
        )

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
            slot_node[slot] = i
        self._masters = masters
        self._slot_node = slot_node

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
        except (TimeoutError, OSError, rexc.RedisError, rexc.RedisClusterException):
            self.counters["refresh_failures"] += 1
        finally:
            self._refresh_after = self._loop.time() + (
                _REFRESH_MIN_INTERVAL if ok else _REFRESH_FAIL_INTERVAL
            )
            self._refresh_task = None

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

    # -- connections -----------------------------------------------------------------------

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
        try:
            conn = await open_connection(
                node.host,
                node.port,
                timeout=self.config.connect_timeout_ms / 1000,
                password=self._password,
                username=self._username,
                ssl_context=self._ssl,
            )
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

    async def _wait(
        self, pend: list[tuple[RespConnection, asyncio.Future[list[Any]]]], deadline_at: float
    ) -> list[list[Any]]:
        """Await the replies of every sent group, until the deadline.

        At the deadline the caller gives up. Its requests stay queued on their connections,
        whose replies are then parsed and dropped in order, so the reply stream stays in
        sync and the connection is kept: aborting it would also fail every other caller's
        requests in flight on it (measured with 5 ms deadlines under load: throughput fell
        10x, each timeout cascading into reconnects). A connection on which nothing at all
        has arrived for `_STALL_S` while replies are owed, or that owes more than `_MAX_OWED`
        replies, is aborted (and re-dialled lazily).
        """

        def expire() -> None:
            now = self._loop.time()
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

        timer = self._loop.call_at(deadline_at, expire)
        try:
            return [await fut for _, fut in pend]
        except _Deadline:
            self.counters["timeouts"] += 1
            raise StoreUnavailable("deadline exceeded waiting for Redis") from None
        except ConnectionError as exc:
            self.counters["connection_errors"] += 1
            self._schedule_refresh()
            raise StoreUnavailable(str(exc)) from None
        finally:
            timer.cancel()

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

    # -- FlowStore -------------------------------------------------------------------------

    async def pin_many(
        self, items: Sequence[PinItem], *, deadline_ms: float | None = None
    ) -> list[FlowRecord]:
        deadline_at = self._deadline(deadline_ms, self.config.write_deadline_ms)
        keys = keys_of([t for t, _, _ in items])
        vals = encode_records([rec for _, rec, _ in items])
        ttls = [ttl for _, _, ttl in items]
        if set(map(type, ttls)) - {int}:
            for ttl in ttls:
                _ms(ttl)  # raises UsageError on the first TTL that is not an int
        tails = {
            ttl: b"\r\n$2\r\nNX\r\n$2\r\nPX%b$3\r\nGET\r\n" % _ttl_arg(ttl) for ttl in set(ttls)
        }
        fmt = _SETNX_FMT
        cmds = [
            fmt % (k, len(v), v, tails[ttl]) for k, v, ttl in zip(keys, vals, ttls, strict=True)
        ]

        def build(idxs: list[int]) -> bytes:
            return b"".join([cmds[i] for i in idxs])

        def ref(pipe: Any, i: int) -> None:
            pipe.set(keys[i], vals[i], nx=True, px=items[i][2], get=True)

        replies = await self._exec(keys, 1, build, ref, deadline_at)
        out: list[FlowRecord] = []
        garbage: list[int] = []
        for i, r in enumerate(replies):
            if r is None:
                out.append(items[i][1])
            elif type(r) is bytes:
                try:
                    out.append(decode_fast(r))
                except RecordError:
                    self.counters["bad_records"] += 1
                    garbage.append(i)
                    out.append(items[i][1])
            elif isinstance(r, Exception) and str(r).startswith("WRONGTYPE"):
                self.counters["bad_records"] += 1
                garbage.append(i)
                out.append(items[i][1])
            else:
                raise self._unexpected(r)
        if garbage:
            await self._overwrite(
                [keys[i] for i in garbage],
                [vals[i] for i in garbage],
                [items[i][2] for i in garbage],
                deadline_at,
            )
        return out

    async def _overwrite(
        self, keys: list[bytes], vals: list[bytes], ttls: list[int], deadline_at: float
    ) -> None:
        cmds = [
            _SET_FMT % (k, len(v), v, b"\r\n$2\r\nPX" + _ttl_arg(t))
            for k, v, t in zip(keys, vals, ttls, strict=True)
        ]

        def build(idxs: list[int]) -> bytes:
            return b"".join([cmds[i] for i in idxs])

        def ref(pipe: Any, i: int) -> None:
            pipe.set(keys[i], vals[i], px=ttls[i])

        for r in await self._exec(keys, 1, build, ref, deadline_at):
            if r is not True and r != b"OK":
                raise self._unexpected(r)

    async def lookup_many(
        self, tuples: Sequence[FiveTuple], *, deadline_ms: float | None = None
    ) -> list[FlowRecord | None]:
        deadline_at = self._deadline(deadline_ms, self.config.lookup_deadline_ms)
        keys = keys_of(tuples)

        def build(idxs: list[int]) -> bytes:
            return _GET_HEAD + _GET_SEP.join([keys[i] for i in idxs]) + b"\r\n"

        def ref(pipe: Any, i: int) -> None:
            pipe.get(keys[i])

        replies = await self._exec(keys, 1, build, ref, deadline_at)
        out: list[FlowRecord | None] = []
        append = out.append
        decode = decode_fast
        for r in replies:
            if r is None:
                append(None)
            elif type(r) is bytes:
                try:
                    append(decode(r))
                except RecordError:
                    self.counters["bad_records"] += 1
                    append(None)
            elif isinstance(r, Exception) and str(r).startswith("WRONGTYPE"):
                self.counters["bad_records"] += 1
                append(None)
            else:
                raise self._unexpected(r)
        return out

    async def touch_many(
        self, items: Sequence[tuple[FiveTuple, int]], *, deadline_ms: float | None = None
    ) -> list[bool]:
        deadline_at = self._deadline(deadline_ms, self.config.write_deadline_ms)
        keys = keys_of([t for t, _ in items])
        ttls = [ttl for _, ttl in items]
        args = [_ttl_arg(ttl) for ttl in ttls]
        cmds = [_PEXPIRE_FMT % (k, a) for k, a in zip(keys, args, strict=True)]

        def build(idxs: list[int]) -> bytes:
            return b"".join([cmds[i] for i in idxs])

        def ref(pipe: Any, i: int) -> None:
            pipe.pexpire(keys[i], ttls[i])

        return [self._flag(r) for r in await self._exec(keys, 1, build, ref, deadline_at)]

    async def release_many(
        self, tuples: Sequence[FiveTuple], linger_ms: int, *, deadline_ms: float | None = None
    ) -> list[bool]:
        deadline_at = self._deadline(deadline_ms, self.config.write_deadline_ms)
        arg = _ttl_arg(linger_ms)[:-2] + b"\r\n$2\r\nLT\r\n"
        keys = keys_of(tuples)
        cmds = [_RELEASE_FMT % (k, arg, k) for k in keys]

        def build(idxs: list[int]) -> bytes:
            return b"".join([cmds[i] for i in idxs])

        def ref(pipe: Any, i: int) -> None:
            pipe.pexpire(keys[i], linger_ms, lt=True)
            pipe.exists(keys[i])

        replies = await self._exec(keys, 2, build, ref, deadline_at)
        out = []
        for _, exists in replies:
            out.append(self._flag(exists))
        return out

    def _flag(self, r: object) -> bool:
        if type(r) is int or type(r) is bool:
            return bool(r)
        raise self._unexpected(r)

    async def delete(self, tuples: Sequence[FiveTuple], *, deadline_ms: float | None = None) -> int:
        deadline_at = self._deadline(deadline_ms, self.config.write_deadline_ms)
        keys = keys_of(tuples)

        def build(idxs: list[int]) -> bytes:
            return b"".join([_DEL_HEAD + keys[i] + b"\r\n" for i in idxs])

        def ref(pipe: Any, i: int) -> None:
            pipe.delete(keys[i])

        return sum(self._count(r) for r in await self._exec(keys, 1, build, ref, deadline_at))

    def _count(self, r: object) -> int:
        if type(r) is int:
            return r
        raise self._unexpected(r)

    async def ttl_ms(self, t: FiveTuple) -> int | None:
        """Remaining TTL in ms; None if absent (or, never written by flowstate, persistent)."""
        deadline_at = self._deadline(None, self.config.write_deadline_ms)
        keys = [t.key()]

        def build(idxs: list[int]) -> bytes:
            return _PTTL_HEAD + keys[0] + b"\r\n"

        def ref(pipe: Any, i: int) -> None:
            pipe.pttl(keys[i])

        (r,) = await self._exec(keys, 1, build, ref, deadline_at)
        ms = self._count(r)
        return ms if ms >= 0 else None

    async def scan(
        self, match: bytes = KEY_PREFIX + b"*", *, count: int = 1000
    ) -> AsyncIterator[ScanEntry]:
        page_s = self.config.scan_deadline_ms / 1000
        for node in list(self._masters):
            cursor = b"0"
            while True:
                deadline_at = self._loop.time() + page_s
                conn = await self._conn(node, deadline_at)
                fut = conn.send(pack_command("SCAN", cursor, "MATCH", match, "COUNT", count), 1)
                ((reply,),) = await self._wait([(conn, fut)], deadline_at)
                if isinstance(reply, Exception):
                    raise self._unexpected(reply)
                cursor, keys = reply
                if keys:
                    payload = b"".join(
                        [pack_command("GET", k) + pack_command("PTTL", k) for k in keys]
                    )
                    fut = conn.send(payload, 2 * len(keys))
                    (rep,) = await self._wait([(conn, fut)], deadline_at)
                    for j, key in enumerate(keys):
                        raw, ttl = rep[2 * j], rep[2 * j + 1]
                        if raw is None or isinstance(raw, Exception):
                            continue  # expired meanwhile, or migrated away (MOVED/ASK)
                        ttl_ms = ttl if type(ttl) is int and ttl >= 0 else None
                        try:
                            yield ScanEntry(key, decode_fast(raw), ttl_ms)
                        except RecordError as exc:
                            yield ScanEntry(key, None, ttl_ms, str(exc))
                if cursor == b"0":
                    break

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [n.dial for n in self._pool.values() if n.dial]
        if self._refresh_task is not None:
            tasks.append(self._refresh_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(n.conn.aclose() for n in self._pool.values() if n.conn is not None),
            return_exceptions=True,
        )
        await self._rc.aclose()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
