"""The forwarder's asyncio driver: packet rings, the store, timers, all around the sans-IO core.

One `Forwarder` runs one engine (one worker process). It reads rings when the kernel says they are
readable, hands misses and events to `ForwardingCore`, runs the store calls the core asks for with
their deadlines (never blocking the data path on Redis), and sends what the engine re-emits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import time
from array import array
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flowstate.errors import FlowstateError, StoreUnavailable
from flowstate.store import FlowStore, MemoryStore
from flowstate.store import StoreConfig as StoreDeadlines
from forwarder import maglev
from forwarder.config import BackendState, ForwarderConfig, StoreKind
from forwarder.core import CoreConfig, ForwardingCore, StoreWork, to_tuple, to_tuples
from forwarder.health import HealthMonitor, apply_health

log = logging.getLogger("flowstate.forwarder")

#: Frames taken from a ring per `run` call, and most `run` calls per readable event.
RX_BATCH = 256
RX_ROUNDS = 8
#: How often idle flows are swept, and how many table slots per sweep.
EXPIRE_EVERY_S, EXPIRE_BUDGET = 0.1, 4096
#: Store rounds (each: one lookup batch and write batches) in flight at once.
MAX_ROUNDS = 4
#: With MAX_ROUNDS in flight, the latest started this long ago, and flows waiting to be looked
#: up: one more round of lookups alone starts (at most one per LOOKUP_OVERFLOW_S). Without it
#: a store that stopped answering held the flows that arrived after the first few for a whole
#: lookup deadline before their own lookup was even sent, then for another one (in the lab's
#: redis-down fault: 1.1 s of 500 ms deadlines, past 2 s on a loaded machine).
LOOKUP_OVERFLOW_S = 0.05
#: Delay between reconnect attempts while the store is unreachable.
STORE_RETRY_S = 1.0
#: How long pins, touches and releases wait to fill a batch (`CoreConfig.write_linger_ms`):
#: a round costs a send and a receive per Redis master (~0.2 ms of CPU in all), so rounds of
#: a few pins each cost several times the pins' own work (measured: 17 us of CPU per pin in
#: rounds of 16, 4.5 us in rounds of 512).
WRITE_LINGER_MS = 5
#: At stop, how long writes still waiting may take to be written.
FLUSH_S = 0.5
#: The worker's collector thresholds once it forwards (see `settle_gc`). With Python's
#: default (700, 10, 10) a growing pin queue (a burst of new flows) ran a young collection
#: every ~700 flows queued and full ones of the whole heap (redis-py, asyncio, config).
GC_THRESHOLDS = (20_000, 20, 20)

_T = TypeVar("_T")
#: A VIP as (address, port, proto), and a backend of it: (VIP key, backend address).
VipKey = tuple[bytes, int, int]
BackendKey = tuple[VipKey, bytes]


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Plan:
    """Engine ids derived from a config: VIP ids by position, backend ids by sorted address,
    except that a reload (`previous`) keeps the ids of what is still configured."""

    vip_ids: dict[VipKey, int]
    backend_ids: dict[bytes, int]
    tables: dict[int, bytes]
    vip_backends: dict[int, list[int]]
    vip_usable: dict[int, list[int]] = field(default_factory=dict)
    """Per VIP, the backends a stored record may send a flow to (not `dead`)."""
    down: frozenset[BackendKey] = frozenset()
    """Backends health checks took out of new-flow selection."""
    dead: frozenset[BackendKey] = frozenset()
    """Backends down past the re-pin grace: their pinned flows move."""


def plan_engine(
    config: ForwarderConfig,
    previous: Plan | None = None,
    *,
    down: Collection[BackendKey] | None = None,
    dead: Collection[BackendKey] | None = None,
) -> Plan:
    """Assign stable ids (kept across reloads where the address is unchanged) and Maglev tables.

    `down` backends get no new flows, records naming `dead` ones are not followed (default:
    those of `previous`). Where every active backend of a VIP is down the checks are ignored
    for it (fail open: a broken check must not take a whole service down).
    """
    down = frozenset(down if down is not None else previous.down if previous else ())
    dead = frozenset(dead if dead is not None else previous.dead if previous else ())
    backend_ids = dict(previous.backend_ids) if previous else {}
    # Ids of removed backends are not given out again in the same plan: pins still queued
    # for them must not name a new backend.
    taken = set(backend_ids.values())
    wanted = sorted({b.address.packed for v in config.vips for b in v.backends})
    for ip in [ip for ip in backend_ids if ip not in wanted]:
        del backend_ids[ip]
    free = (i for i in range(0xFFFF) if i not in taken)
    for ip in wanted:
        if ip not in backend_ids:
            backend_ids[ip] = next(free)
    keys = [(v.address.packed, v.port, int(v.protocol)) for v in config.vips]
    kept = {k: previous.vip_ids[k] for k in keys if previous and k in previous.vip_ids}
    free_vips = (i for i in range(0x100) if i not in set(kept.values()))
    vip_ids: dict[VipKey, int] = {}
    tables: dict[int, bytes] = {}
    vip_backends: dict[int, list[int]] = {}
    vip_usable: dict[int, list[int]] = {}
    for key, vip in zip(keys, config.vips, strict=True):
        vip_id = vip_ids[key] = kept[key] if key in kept else next(free_vips)
        active = [
            (b.address.packed, b.weight) for b in vip.backends if b.state is BackendState.ACTIVE
        ]
        healthy = [(ip, w) for ip, w in active if (key, ip) not in down]
        if any(w for _ip, w in healthy) or not any(w for _ip, w in active):
            active = healthy
        table = maglev.MaglevTable.build(active, vip.maglev_size) if active else None
        if table is None or not table.backends:
            tables[vip_id] = b""
        else:
            ids = [backend_ids[ip] for ip, _w in table.backends]
            tables[vip_id] = array("H", (ids[i] for i in table.table)).tobytes()
        vip_backends[vip_id] = [backend_ids[b.address.packed] for b in vip.backends]
        usable = [
            backend_ids[b.address.packed]
            for b in vip.backends
            if (key, b.address.packed) not in dead
        ]
        vip_usable[vip_id] = usable or vip_backends[vip_id]
    return Plan(vip_ids, backend_ids, tables, vip_backends, vip_usable, down, dead)


def make_engine(config: ForwarderConfig) -> Any:
    """Build the configured engine (C or Python) with the flow table limits of `config`."""
    from forwarder.fastpath import load_engine

    t = config.timeouts
    return load_engine(str(config.impl))(
        source_ipv6=config.source_ipv6.packed,
        capacity=config.flow_table.capacity,
        tcp_idle_ms=t.tcp_idle_ms,
        udp_idle_ms=t.udp_idle_ms,
        fin_linger_ms=t.fin_linger_ms,
        touch_interval_ms=t.store_refresh_ms,
    )


def apply_plan(engine: Any, core: ForwardingCore, plan: Plan, config: ForwarderConfig) -> None:
    """Load VIPs, backends and Maglev tables into the engine and the core."""
    for ip, bid in plan.backend_ids.items():
        engine.set_backend(bid, ip)
    core.set_backend_ids(plan.backend_ids)
    lookup_first = {
        (v.address.packed, v.port, int(v.protocol)): v.udp_lookup_first for v in config.vips
    }
    for (ip, port, proto), vip_id in plan.vip_ids.items():
        first = lookup_first.get((ip, port, proto), False)
        engine.set_vip(vip_id, ip, port, proto, udp_lookup_first=first)
        engine.set_maglev(vip_id, plan.tables[vip_id])
        usable = plan.vip_usable.get(vip_id)
        picks = set(array("H", plan.tables[vip_id])) - {0xFFFF}  # as the engine's membership
        core.set_vip(vip_id, ip, port, proto, plan.vip_backends[vip_id], usable, picks)


async def open_store(config: ForwarderConfig) -> FlowStore:
    """Connect the configured store; raises StoreUnavailable if Redis does not answer."""
    sc = config.store
    if sc.kind is StoreKind.MEMORY:
        return MemoryStore(max_entries=max(1, config.flow_table.capacity))
    from flowstate.store.redis_cluster import RedisClusterStore

    secret = sc.read_password()
    tls = None
    if sc.tls:
        from flowstate.store import TlsSettings

        tls = TlsSettings(
            ca_file=None if sc.tls_ca_file is None else str(sc.tls_ca_file),
            cert_file=None if sc.tls_cert_file is None else str(sc.tls_cert_file),
            key_file=None if sc.tls_key_file is None else str(sc.tls_key_file),
        )
    return await RedisClusterStore.connect(
        [(e.host, e.port) for e in sc.seeds],
        password=secret.reveal() if secret else None,
        username=sc.username,
        config=StoreDeadlines(
            lookup_deadline_ms=sc.lookup_deadline_ms,
            write_deadline_ms=sc.write_deadline_ms,
            read_from_replicas=sc.read_from_replicas,
        ),
        tls=tls,
    )


class Forwarder:
    """One worker: rings + engine + core + store, driven by the event loop."""

    def __init__(
        self,
        config: ForwarderConfig,
        engine: Any,
        rings: Sequence[Any],
        *,
        store: FlowStore | None = None,
        store_factory: Callable[[], Any] | None = None,
        neighbours: Any = None,
        worker: int = 0,
        operations: bool = False,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        #: The config as the file gave it (at start or the last reload), before runtime changes.
        self.configured = config
        #: Where `reload` reads the config from (None: no reload).
        self.config_path = config_path
        #: Held while VIPs, backends and Maglev tables change (control API, health, reload).
        self.change_lock = asyncio.Lock()
        self.worker = worker
        #: Serve the control API and metrics from `run()` (the daemon does; embedders may not).
        self.operations = operations
        #: Called with (operation, seconds, ok) after every store call (metrics).
        self.store_observer: Callable[[str, float, bool], None] | None = None
        self.engine = engine
        self.rings = list(rings)
        self.store = store
        self._store_factory = store_factory
        self._neighbours = neighbours
        t = config.timeouts
        self.core = ForwardingCore(
            engine,
            CoreConfig(
                pop=config.pop,
                store_ttl_ms=t.store_ttl_ms,
                fin_linger_ms=t.fin_linger_ms,
                miss_queue_per_flow=config.flow_table.miss_queue_per_flow,
                miss_queue_total=config.flow_table.miss_queue_total,
                max_writes_per_s=config.store.max_writes_per_s,
                write_linger_ms=WRITE_LINGER_MS,
                lookup_patience_ms=int(config.store.lookup_patience_ms),
                fallback=config.store.fallback,
            ),
        )
        self.plan = plan_engine(config)
        apply_plan(engine, self.core, self.plan, config)
        self.health = HealthMonitor(config)
        self._wake = asyncio.Event()
        #: Round slots free (of MAX_ROUNDS), and set whenever a round ends (one frees).
        self._free_rounds = MAX_ROUNDS
        self._round_done = asyncio.Event()
        self._round_started = 0.0  # loop time of the latest round's start
        #: Lookup rounds started past MAX_ROUNDS (see LOOKUP_OVERFLOW_S).
        self.overflow_rounds = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        #: Started once the rings are read (the BGP heartbeat: it must not report before).
        self.when_forwarding: list[Callable[[], Awaitable[None]]] = []
        self.counters: dict[str, int] = {"rx_batches": 0, "store_reconnects": 0}

    # ---- data path -----------------------------------------------------------------------

    def _on_readable(self, ring: Any) -> None:
        # Drain up to RX_ROUNDS full batches per wake-up: under load one epoll round trip per
        # batch would cost more than the batch itself.
        for _ in range(RX_ROUNDS):
            now = monotonic_ms()
            result = ring.run(self.engine, now, RX_BATCH)
            self.counters["rx_batches"] += 1
            if result.misses or result.events:
                self.core.on_result(result, now)
                # Lookups start here, not in the store loop: waking it cost one more pass of
                # the event loop (and its own step) before the round's Task even started.
                # The store loop still takes what no free slot could (and the writes).
                if not (result.misses and self._start_lookups()) or result.events:
                    self._wake.set()
            if len(result.verdicts) < RX_BATCH:
                break

    def _start_lookups(self) -> bool:
        """Start a round of the flows waiting for a lookup at once, if the store is connected
        and a round slot is free (writes wait for the store loop: their linger and cap).
        Whether nothing is left for the store loop to look up."""
        store = self.store
        if store is None or not self._free_rounds or self._stopping.is_set():
            return False
        work = self.core.take_store_work(monotonic_ms(), writes=False)
        if work.lookups:
            self._free_rounds -= 1
            self._round_started = asyncio.get_running_loop().time()
            self._spawn(self._round(store, work))
        return not self.core.has_work(monotonic_ms(), writes=False)

    def _send(self, result: Any) -> None:
        if result is not None and result.tx and self.rings:
            self.rings[0].send(result.tx, self.engine)

    # ---- store ---------------------------------------------------------------------------

    async def _store_loop(self) -> None:
        while not self._stopping.is_set():
            store = self.store
            now = monotonic_ms()
            if not self.core.has_work(now, writes=store is not None):
                self._wake.clear()
                wait = 0.05
                due = self.core.writes_due_in(now) if store is not None else None
                if due is not None:
                    wait = min(wait, max(due, 1) / 1000)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            if store is not None and not self._free_rounds:
                # MAX_ROUNDS in flight: wait for one to finish, but flows waiting for a lookup
                # wait no longer than LOOKUP_OVERFLOW_S after the latest round started.
                since = asyncio.get_running_loop().time() - self._round_started
                waiting = self.core.has_work(now, writes=False)
                if waiting and since >= LOOKUP_OVERFLOW_S:
                    lookups = self.core.take_store_work(monotonic_ms(), writes=False)
                    self._round_started = asyncio.get_running_loop().time()
                    self.overflow_rounds += 1
                    self._spawn(self._run_work(store, lookups))
                    await asyncio.sleep(0)
                    continue
                # (no lookup waits: look again every LOOKUP_OVERFLOW_S for new ones)
                left = LOOKUP_OVERFLOW_S - since if waiting else LOOKUP_OVERFLOW_S
                self._round_done.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(left, 0.001)):
                        await self._round_done.wait()  # a round in flight finished
                continue
            work = self.core.take_store_work(monotonic_ms(), writes=store is not None)
            if store is None:
                # Not connected (yet): answer lookups by Maglev at once; writes wait.
                self._send(self.core.on_lookups(work.lookups, None, now))
                await asyncio.sleep(0.01)  # flows within their patience are asked again
                continue
            # Rounds overlap (a slow write batch never holds up the next tick's lookups),
            # up to MAX_ROUNDS in flight.
            self._free_rounds -= 1  # one is free: checked above, no await since
            self._round_started = asyncio.get_running_loop().time()
            self._spawn(self._round(store, work))
            await asyncio.sleep(0)

    async def _round(self, store: FlowStore, work: StoreWork) -> None:
        try:
            await self._run_work(store, work)
        finally:
            self._free_rounds += 1
            self._round_done.set()

    async def _run_work(self, store: FlowStore, work: StoreWork) -> None:
        async def lookups() -> None:
            tuples = to_tuples(work.lookups)
            try:
                records = await self._timed("lookup", store.lookup_many(tuples, partial=True))
            except StoreUnavailable:
                self._send(self.core.on_lookups(work.lookups, None, monotonic_ms()))
                return
            self._send(self.core.on_lookups(work.lookups, records, monotonic_ms()))

        async def pins() -> None:
            flows = [f for f, _, _ in work.pins]
            tuples = to_tuples(flows)
            items = [(t, rec, ttl) for t, (_, rec, ttl) in zip(tuples, work.pins, strict=True)]
            # The engine hashes the flows into their keys (in C), not the store (in Python).
            keys = self.engine.flow_keys(flows)
            try:
                if work.overwrites:  # records of dead backends: NX would keep them
                    await self._timed(
                        "delete", store.delete([to_tuple(f) for f in work.overwrites])
                    )
                stored = await self._timed("pin", store.pin_many(items, keys=keys))
            except StoreUnavailable:
                self.core.on_pins(work, None, monotonic_ms())
                return
            self.core.on_pins(work, stored, monotonic_ms())

        async def touches() -> None:
            ttl = self.config.timeouts.store_ttl_ms
            with contextlib.suppress(StoreUnavailable):
                await self._timed(
                    "touch", store.touch_many([(to_tuple(f), ttl) for f in work.touches])
                )

        async def releases() -> None:
            linger = self.config.timeouts.fin_linger_ms
            with contextlib.suppress(StoreUnavailable):
                await self._timed(
                    "release", store.release_many([to_tuple(f) for f in work.releases], linger)
                )

        jobs = []
        if work.lookups:
            jobs.append(lookups())
        if work.pins:
            jobs.append(pins())
        if work.touches:
            jobs.append(touches())
        if work.releases:
            jobs.append(releases())
        if len(jobs) == 1:  # a round of pins alone (new flows): no gather Task per round
            await jobs[0]
        else:
            await asyncio.gather(*jobs)

    async def _flush_writes(self, store: FlowStore) -> None:
        """At stop: write what still waits (pins above all: a flow pinned nowhere may move
        when the next forwarder has other backends), within FLUSH_S."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_S):
                for _ in range(8):
                    work = self.core.take_store_work(monotonic_ms(), flush=True)
                    if not work:
                        return
                    await self._run_work(store, work)

    async def _timed(self, op: str, call: Awaitable[_T]) -> _T:
        """Await one store call and report its latency to `store_observer`."""
        start = time.perf_counter()
        ok = False
        try:
            result = await call
            ok = True
            return result
        finally:
            if self.store_observer is not None:
                self.store_observer(op, time.perf_counter() - start, ok)

    async def _connect_loop(self) -> None:
        """Connect (and reconnect) the store in the background; forwarding never waits on it."""
        while self.store is None and self._store_factory is not None:
            try:
                self.store = await self._store_factory()
                log.info("store connected")
            except (StoreUnavailable, FlowstateError, OSError) as exc:
                self.counters["store_reconnects"] += 1
                log.warning("store unavailable, forwarding on Maglev fallback: %s", exc)
                await asyncio.sleep(STORE_RETRY_S)

    # ---- housekeeping --------------------------------------------------------------------

    async def _expire_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(EXPIRE_EVERY_S)
            self.engine.expire(monotonic_ms(), EXPIRE_BUDGET)

    def _on_links(self, changed: dict[bytes, Any]) -> None:
        """Hand changed next-hop link info (or its loss) to the engine."""
        for ip, link in changed.items():
            bid = self.plan.backend_ids.get(ip)
            if bid is None:
                continue
            self.engine.set_backend(
                bid,
                ip,
                dst_mac=link.dst_mac,
                src_mac=link.src_mac,
                ifindex=link.ifindex,
                mtu=link.mtu,
            )
            backend = ipaddress.IPv6Address(ip)
            if link.resolved:
                hop = ipaddress.ip_address(link.next_hop) if link.next_hop else backend
                log.info(
                    "backend %s: next hop %s on %s (%s)",
                    backend,
                    hop,
                    link.ifname,
                    link.dst_mac.hex(":"),
                )
            else:
                log.warning("backend %s: no next hop yet (%s)", backend, link.reason)

    async def _resolve_links_first(self) -> None:
        """Resolve next hops before the first packet (a probe is usually answered in ms)."""
        assert self._neighbours is not None
        for _ in range(10):
            self._on_links(await self._neighbours.refresh())
            if all(link.resolved for link in self._neighbours.links().values()):
                return
            await asyncio.sleep(0.1)

    # ---- lifecycle -----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Forward until `stop()`."""
        loop = asyncio.get_running_loop()
        ops = None
        if self.operations:
            from forwarder.control import start_operations

            ops = await start_operations(self)  # OSError if a live forwarder holds the socket
        if self.store is None and self._store_factory is not None:
            # One attempt before the first packet, so that a restarted forwarder finds its
            # flows in the store instead of guessing with Maglev; then retry in the background.
            try:
                self.store = await self._store_factory()
                log.info("store connected")
            except (StoreUnavailable, FlowstateError, OSError) as exc:
                log.warning("store unavailable, forwarding on Maglev fallback: %s", exc)
        if self._neighbours is not None:
            await self._resolve_links_first()
        for ring in self.rings:
            loop.add_reader(ring.fileno(), self._on_readable, ring)
        self._spawn(self._connect_loop())
        self._spawn(self._store_loop())
        self._spawn(self._expire_loop())
        self._spawn(self.health.run(lambda: apply_health(self)))
        if self._neighbours is not None:
            self._spawn(self._neighbours.run(self._on_links))
        for start in self.when_forwarding:
            self._spawn(start())
        try:
            await self._stopping.wait()
        finally:
            if ops is not None:
                await ops.close()
            for ring in self.rings:
                loop.remove_reader(ring.fileno())
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.store is not None:
                try:
                    await self._flush_writes(self.store)
                finally:
                    await self.store.close()
            log.info("counters at exit: %s", self.all_counters())

    def all_counters(self) -> dict[str, int]:
        """Engine, slow path and driver counters in one flat dict (engine names first)."""
        out = dict(self.engine.counters())
        for ring in self.rings:
            for name, value in ring.counters().items():
                out[name] = out.get(name, 0) + value
        out.update(self.core.counters)
        out.update(self.counters)
        return out

    def stop(self) -> None:
        self._stopping.set()

    def request_reload(self) -> None:
        """SIGHUP: re-read the config file in the background (the outcome goes to the log)."""
        from forwarder.reload import reload_config

        self._spawn(reload_config(self))


def open_rings(config: ForwarderConfig, fanout_group: int) -> list[Any]:
    """One receive ring per configured interface, of the configured implementation."""
    from forwarder.bpf import vip_filter

    program = vip_filter(sorted({v.address.packed for v in config.vips}))
    rings: list[Any] = []
    try:
        for ifname in config.interfaces:
            if config.impl == "c":
                from forwarder._fastpath import PacketRing

                rings.append(PacketRing(ifname, fanout_group=fanout_group, bpf=program))
            else:
                from forwarder.pyio import PyPacketRing

                rings.append(PyPacketRing(ifname, fanout_group=fanout_group, bpf=program))
    except BaseException:
        for ring in rings:
            ring.close()
        raise
    return rings


async def settle_gc() -> None:
    """Once started: move everything alive into the collector's permanent generation (the
    modules, config and connections live as long as the worker; no collection need walk them
    again) and collect less often (what the data path allocates per flow is freed by
    reference counts, not the collector)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(
    config: ForwarderConfig,
    *,
    fanout_group: int = 0,
    worker: int = 0,
    config_path: Path | None = None,
    heartbeat_fd: int | None = None,
) -> None:
    """Run one worker until SIGINT/SIGTERM; SIGHUP reloads `config_path`. With `heartbeat_fd`
    it reports its health there for the supervisor's BGP announcer (forwarder.bgp)."""
    import signal

    from forwarder import overrides
    from forwarder.neigh import NeighbourCache

    engine = make_engine(config)
    rings = open_rings(config, fanout_group)
    neighbours = NeighbourCache([b.address for v in config.vips for b in v.backends])
    # Runtime backend changes (drain, weight) made before a restart run again from the start.
    running, _ = overrides.reapply(config, writer=worker == 0)
    fwd = Forwarder(
        running,
        engine,
        rings,
        store_factory=lambda: open_store(config),
        neighbours=neighbours,
        worker=worker,
        operations=True,
        config_path=config_path,
    )
    fwd.configured = config
    fwd.when_forwarding.append(settle_gc)
    if heartbeat_fd is not None:
        from forwarder.bgp import heartbeat

        interval_s = config.bgp.check_interval_ms / 2000
        fwd.when_forwarding.append(lambda: heartbeat(fwd, heartbeat_fd, interval_s))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, fwd.stop)
    loop.add_signal_handler(signal.SIGHUP, fwd.request_reload)
    log.info("forwarding: %s", config.summary())
    try:
        await fwd.run()
    finally:
        for ring in rings:
            ring.close()
