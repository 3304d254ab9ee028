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
raises `StoreUnavailable`; lookups answer master by master instead (`LOOKUP_FAILED` for the
items of a master that failed, read from one of its replicas when `read_from_replicas` allows:
see `_cluster_client` and `FlowStore.lookup_many`). A connection whose reply stream could be
out of sync, or that has stalled, is aborted and re-dialled lazily (a caller that merely timed
out leaves it in sync: see `_cluster_client`); dialling a node that just failed backs off, so a
down cluster fails fast instead of every call waiting for a connect.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio.cluster as rcluster
import redis.exceptions as rexc

from flowstate.errors import RecordError, StoreUnavailable, UsageError
from flowstate.flow import KEY_PREFIX, FiveTuple
from flowstate.record import FlowRecord
from flowstate.store._cluster_client import ClusterClient
from flowstate.store._codec import decode_fast, encode_record, keys_of
from flowstate.store._resp import pack_command
from flowstate.store.base import (
    LOOKUP_FAILED,
    FlowStore,
    LookupResult,
    PinItem,
    ScanEntry,
    StoreConfig,
    TlsSettings,
    check_pin_keys,
)

_KEY_LEN = len(KEY_PREFIX) + 16
_GET_HEAD = b"*2\r\n$3\r\nGET\r\n$%d\r\n" % _KEY_LEN
_GET_SEP = b"\r\n" + _GET_HEAD
_SETNX_HEAD = b"*7\r\n$3\r\nSET\r\n$%d\r\n" % _KEY_LEN
#: After the key: value length, value, then `_ttl_arg` (NX PX ttl GET).
_SETNX_TAIL = b"\r\n$%d\r\n%b\r\n$2\r\nNX\r\n$2\r\nPX%b$3\r\nGET\r\n"
_SET_FMT = b"*5\r\n$3\r\nSET\r\n$%d\r\n%%b\r\n$%%d\r\n%%b%%b" % _KEY_LEN
_PEXPIRE_FMT = b"*3\r\n$7\r\nPEXPIRE\r\n$%d\r\n%%b%%b" % _KEY_LEN
_RELEASE_FMT = b"*4\r\n$7\r\nPEXPIRE\r\n$%d\r\n%%b%%b*2\r\n$6\r\nEXISTS\r\n$%d\r\n%%b\r\n" % (
    _KEY_LEN,
    _KEY_LEN,
)
_DEL_HEAD = b"*2\r\n$3\r\nDEL\r\n$%d\r\n" % _KEY_LEN
_PTTL_HEAD = b"*2\r\n$4\r\nPTTL\r\n$%d\r\n" % _KEY_LEN


def _ms(value: int) -> bytes:
    if type(value) is not int or value <= 0:
        raise UsageError(f"TTL must be a positive integer of ms, got {value!r}")
    return b"%d" % value


def _ttl_arg(value: int) -> bytes:
    s = _ms(value)
    return b"\r\n$%d\r\n%b\r\n" % (len(s), s)


class RedisClusterStore(ClusterClient, FlowStore):
    """Flow pinnings in a Redis Cluster. Build it with `await RedisClusterStore.connect(...)`."""

    @classmethod
    async def connect(
        cls,
        seeds: Sequence[tuple[str, int]],
        *,
        password: str | None = None,
        username: str | None = None,
        config: StoreConfig = StoreConfig(),  # noqa: B008 (frozen, immutable)
        tls: TlsSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        fast_path: bool = True,
    ) -> RedisClusterStore:
        """Discover the cluster from `seeds` within `config.connect_timeout_ms`.

        Raises `StoreUnavailable` if no seed answers with a usable topology in time.
        `tls` turns TLS on for every connection (redis-py's and the fast path's);
        `ssl_context` (only with `tls`) replaces the context the fast path would build from it.
        Bad TLS files raise `UsageError`.
        """
        if ssl_context is not None and tls is None:
            raise UsageError(
                "an SSLContext alone cannot configure redis-py's connections: pass tls="
                "TlsSettings(...) (and ssl_context only to override the fast path's context)"
            )
        if not seeds:
            raise UsageError("at least one seed host:port is needed")
        extra: dict[str, Any] = {}
        if tls is not None:
            try:
                ssl_context = ssl_context or tls.ssl_context()
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"TLS files unusable: {exc}") from None
            extra = tls.redis_py_kwargs()
        timeout = config.connect_timeout_ms / 1000
        rc = rcluster.RedisCluster(
            startup_nodes=[rcluster.ClusterNode(h, p) for h, p in seeds],
            password=password,
            username=username,
            socket_connect_timeout=timeout,
            socket_timeout=max(timeout, config.scan_deadline_ms / 1000),
            require_full_coverage=False,
            **extra,
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
        store = cls(
            rc,
            password=password,
            username=username,
            config=config,
            ssl_context=ssl_context,
            fast_path=fast_path,
        )
        if fast_path:
            try:
                await store.connect_all(config.connect_timeout_ms)
            except BaseException:
                await store.close()
                raise
        store.watch_topology()
        return store

    # -- FlowStore -------------------------------------------------------------------------

    async def pin_many(
        self,
        items: Sequence[PinItem],
        *,
        deadline_ms: float | None = None,
        keys: Sequence[bytes] | None = None,
    ) -> list[FlowRecord]:
        deadline_at = self._deadline(deadline_ms, self.config.write_deadline_ms)
        check_pin_keys(items, keys)
        keys = keys_of([t for t, _, _ in items]) if keys is None else list(keys)
        ttls = [ttl for _, _, ttl in items]
        if set(map(type, ttls)) - {int}:
            for ttl in ttls:
                _ms(ttl)  # raises UsageError on the first TTL that is not an int
        # A batch's records are mostly a few shared objects (the forwarder makes one per
        # backend and VIP per round): each distinct (record, TTL) is encoded once, with the
        # rest of its command after the key.
        tails: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        vals: list[bytes] = []
        cmds: list[bytes] = []
        head = _SETNX_HEAD
        for k, (_, rec, ttl) in zip(keys, items, strict=True):
            vt = tails.get((id(rec), ttl))
            if vt is None:
                v = encode_record(rec)
                vt = tails[id(rec), ttl] = (v, _SETNX_TAIL % (len(v), v, _ttl_arg(ttl)))
            vals.append(vt[0])
            cmds.append(head + k + vt[1])

        def build(idxs: list[int]) -> bytes:
            return b"".join([cmds[i] for i in idxs])

        def ref(pipe: Any, i: int) -> None:
            pipe.set(keys[i], vals[i], nx=True, px=items[i][2], get=True)

        replies = await self._exec(keys, 1, build, ref, deadline_at)
        if replies.count(None) == len(replies):  # every pin won (the common case): ours
            return [rec for _, rec, _ in items]
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

    async def _lookup(
        self, tuples: Sequence[FiveTuple], deadline_ms: float | None
    ) -> tuple[list[LookupResult], str | None]:
        deadline_at = self._deadline(deadline_ms, self.config.lookup_deadline_ms)
        keys = keys_of(tuples)

        def build(idxs: list[int]) -> bytes:
            return _GET_HEAD + _GET_SEP.join([keys[i] for i in idxs]) + b"\r\n"

        def ref(pipe: Any, i: int) -> None:
            pipe.get(keys[i])

        replies, why = await self._exec_read(keys, build, ref, deadline_at)
        out: list[LookupResult] = []
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
            elif r is LOOKUP_FAILED:
                append(r)
            elif isinstance(r, Exception) and str(r).startswith("WRONGTYPE"):
                self.counters["bad_records"] += 1
                append(None)
            else:  # e.g. LOADING, MASTERDOWN (a replica): this item is unanswered
                self.counters["failed_items"] += 1
                why = why or str(self._unexpected(r))
                append(LOOKUP_FAILED)
        return out, why

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
                        ttl_ms = ttl if type(ttl) is int and ttl >= 0 else None
                        if raw is None:
                            continue  # expired since SCAN listed it
                        if isinstance(raw, Exception):
                            if not str(raw).startswith("WRONGTYPE"):
                                continue  # migrated away meanwhile (MOVED/ASK)
                            entry = ScanEntry(key, None, ttl_ms, "not a string value")
                        else:
                            try:
                                entry = ScanEntry(key, decode_fast(raw), ttl_ms)
                            except RecordError as exc:
                                entry = ScanEntry(key, None, ttl_ms, str(exc))
                        yield entry
                if cursor == b"0":
                    break

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_wheel()
        nodes = self._nodes()
        tasks: list[asyncio.Task[Any]] = [n.dial for n in nodes if n.dial]
        tasks += [n.probe for n in nodes if n.probe]
        if self._refresh_task is not None:
            tasks.append(self._refresh_task)
        if self._watch is not None:
            tasks.append(self._watch)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(n.conn.aclose() for n in nodes if n.conn is not None),
            return_exceptions=True,
        )
        await self._rc.aclose()
