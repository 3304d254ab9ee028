"""Prometheus metrics of the forwarder: the store latency histogram and the /metrics endpoint.

Counters are not kept twice: a scrape renders the same `stats` snapshot the control API returns
(engine verdicts, core, rings, store client, store latency) for every worker, labelled by POP and
worker. Worker 0 serves the endpoint and asks the other workers over their control sockets.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from forwarder.packet import Verdict

log = logging.getLogger("flowstate.forwarder")

#: Engine counters that count frames by verdict (the other engine counters are table stats).
VERDICTS = frozenset(v.name.lower() for v in Verdict)
#: Store operations timed by the driver (`Forwarder._timed`).
STORE_OPS = ("lookup", "pin", "touch", "release")
#: Upper bounds (s) of the latency buckets: lookups have a deadline of a few ms, writes of tens.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
#: Help of the store client's counters that say more than their name (the others: "Store
#: client: " and the name); `flowstate_store_client_<name>_total`.
STORE_CLIENT_HELP = {
    "masters_failed": "Store client: times a master was marked failed (its slots read from a "
    "replica until it answers again)",
    "replica_reads": "Store client: lookups a replica answered for a failed master",
    "replica_failures": "Store client: batches a failed master's replica did not answer either",
    "failed_items": "Store client: lookups answered LOOKUP_FAILED (neither master nor replica "
    "answered in time)",
}
#: Longest request head the metrics endpoint reads.
_MAX_HEAD = 8192


class LatencyHistogram:
    """Fixed-bucket histogram of one operation's latency; O(log buckets) per observation."""

    __slots__ = ("counts", "errors", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.errors = 0

    def observe(self, seconds: float, ok: bool = True) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        if not ok:
            self.errors += 1

    def snapshot(self) -> dict[str, Any]:
        """``{"le": bounds, "counts": per bucket (+Inf last), "sum", "count", "errors"}``."""
        return {
            "le": list(LATENCY_BUCKETS),
            "counts": list(self.counts),
            "sum": self.sum,
            "count": sum(self.counts),
            "errors": self.errors,
        }


class StoreLatency:
    """One histogram per store operation; `observe` is the driver's `store_observer` hook."""

    def __init__(self) -> None:
        self.ops = {op: LatencyHistogram() for op in STORE_OPS}

    def observe(self, op: str, seconds: float, ok: bool) -> None:
        hist = self.ops.get(op)
        if hist is None:
            hist = self.ops[op] = LatencyHistogram()
        hist.observe(seconds, ok)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {op: h.snapshot() for op, h in self.ops.items()}


def quantile(snapshot: dict[str, Any], q: float) -> float | None:
    """Estimate quantile `q` (0..1) from a histogram snapshot by linear interpolation inside
    the bucket (as PromQL's histogram_quantile does); None when empty."""
    counts: list[int] = snapshot["counts"]
    total = sum(counts)
    if total == 0:
        return None
    bounds: list[float] = snapshot["le"]
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(bounds):  # +Inf bucket: the largest finite bound is all we know
                return bounds[-1]
            lo = bounds[i - 1] if i else 0.0
            return lo + (bounds[i] - lo) * (rank - seen) / n
        seen += n
    return bounds[-1]


def diff_histogram(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """The observations between two snapshots of one histogram (for rates over an interval)."""
    if old is None or len(old["counts"]) != len(new["counts"]):
        return new
    return {
        "le": new["le"],
        "counts": [max(0, a - b) for a, b in zip(new["counts"], old["counts"], strict=True)],
        "sum": max(0.0, new["sum"] - old["sum"]),
        "count": max(0, new["count"] - old["count"]),
        "errors": max(0, new["errors"] - old["errors"]),
    }


# --- rendering -----------------------------------------------------------------------------------


class _Snapshot(Collector):
    """Turns `stats` answers (one dict per worker) into metric families."""

    def __init__(self, pop: str, workers: Sequence[dict[str, Any]]) -> None:
        self.pop = pop
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["pop", "worker"]
        packets = CounterMetricFamily(
            "flowstate_packets",
            "Frames by data-path verdict (forward, new, miss, pass_*, reply_too_big, drop_*)",
            labels=[*labels, "verdict"],
        )
        flows = GaugeMetricFamily("flowstate_flows", "Flows in the local table", labels=labels)
        capacity = GaugeMetricFamily(
            "flowstate_flow_table_capacity", "Slots of the local flow table", labels=labels
        )
        vips = GaugeMetricFamily("flowstate_vips", "VIPs configured in the engine", labels=labels)
        table: dict[str, CounterMetricFamily] = {}
        core: dict[str, CounterMetricFamily] = {}
        client: dict[str, CounterMetricFamily] = {}
        rings: dict[str, CounterMetricFamily] = {}
        latency = HistogramMetricFamily(
            "flowstate_store_latency_seconds",
            "Latency of store calls by operation (lookup, pin, touch, release)",
            labels=[*labels, "op"],
        )
        failures = CounterMetricFamily(
            "flowstate_store_call_failures",
            "Store calls that failed or passed their deadline, by operation",
            labels=[*labels, "op"],
        )
        connected = GaugeMetricFamily(
            "flowstate_store_connected", "1 while the store client is connected", labels=labels
        )
        uptime = GaugeMetricFamily(
            "flowstate_uptime_seconds", "Seconds since the worker started", labels=labels
        )
        weight = GaugeMetricFamily(
            "flowstate_backend_weight",
            "Backend weight now (0 while draining)",
            labels=[*labels, "vip", "backend"],
        )
        draining = GaugeMetricFamily(
            "flowstate_backend_draining",
            "1 while the backend takes no new flows (drained)",
            labels=[*labels, "vip", "backend"],
        )
        healthy = GaugeMetricFamily(
            "flowstate_backend_healthy",
            "1 while health checks pass, 0 while the backend is down (absent: not checked)",
            labels=[*labels, "vip", "backend"],
        )

        def family(
            cache: dict[str, CounterMetricFamily], name: str, doc: str, extra: list[str]
        ) -> Any:
            fam = cache.get(name)
            if fam is None:
                fam = cache[name] = CounterMetricFamily(name, doc, labels=[*labels, *extra])
            return fam

        for w in self.workers:
            lv = [self.pop, str(w.get("worker", 0))]
            engine: dict[str, int] = w.get("engine", {})
            for name, value in engine.items():
                if name == "flows":
                    flows.add_metric(lv, value)
                elif name == "capacity":
                    capacity.add_metric(lv, value)
                elif name in ("evicted", "expired"):
                    family(
                        table, f"flowstate_flows_{name}", f"Flows {name} from the local table", []
                    ).add_metric(lv, value)
                elif name in VERDICTS:
                    packets.add_metric([*lv, name], value)
                elif name == "vips":
                    vips.add_metric(lv, value)
                else:  # the C engine's own counters: installs, tx_packets, tx_bytes, tx_errors
                    family(
                        table, f"flowstate_engine_{name}", f"Engine: {name.replace('_', ' ')}", []
                    ).add_metric(lv, value)
            for name, value in w.get("core", {}).items():
                family(
                    core, f"flowstate_core_{name}", f"Slow path: {name.replace('_', ' ')}", []
                ).add_metric(lv, value)
            for name, value in w.get("forwarder", {}).items():
                family(
                    core, f"flowstate_forwarder_{name}", f"Driver: {name.replace('_', ' ')}", []
                ).add_metric(lv, value)
            store = w.get("store", {})
            connected.add_metric(lv, 1.0 if store.get("connected") else 0.0)
            for name, value in store.get("counters", {}).items():
                family(
                    client,
                    f"flowstate_store_client_{name}",
                    STORE_CLIENT_HELP.get(name, f"Store client: {name.replace('_', ' ')}"),
                    [],
                ).add_metric(lv, value)
            for ring in w.get("rings", []):
                for name, value in ring.get("counters", {}).items():
                    family(
                        rings,
                        f"flowstate_ring_{name}",
                        f"Packet ring: {name.replace('_', ' ')}",
                        ["interface"],
                    ).add_metric([*lv, ring["interface"]], value)
            for op, snap in w.get("store_latency", {}).items():
                cumulative, buckets = 0, []
                for bound, n in zip([*snap["le"], float("inf")], snap["counts"], strict=True):
                    cumulative += n
                    buckets.append((_le(bound), cumulative))
                latency.add_metric([*lv, op], buckets, snap["sum"])
                failures.add_metric([*lv, op], snap["errors"])
            uptime.add_metric(lv, w.get("uptime_s", 0.0))
            for vip in w.get("backends", []):
                for b in vip["backends"]:
                    bl = [*lv, vip["vip"], b["address"]]
                    weight.add_metric(bl, b["weight"] if b["state"] == "active" else 0)
                    draining.add_metric(bl, 0 if b["state"] == "active" else 1)
                    if b.get("healthy") is not None:
                        healthy.add_metric(bl, 1 if b["healthy"] else 0)
        yield packets
        yield flows
        yield capacity
        yield vips
        yield from table.values()
        yield from core.values()
        yield latency
        yield failures
        yield connected
        yield from client.values()
        yield from rings.values()
        yield uptime
        yield weight
        yield draining
        yield healthy


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def render(pop: str, workers: Sequence[dict[str, Any]]) -> bytes:
    """The Prometheus text exposition of per-worker `stats` snapshots."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(pop, workers))
    return generate_latest(registry)


# --- the endpoint --------------------------------------------------------------------------------

#: Gathers the per-worker snapshots to render: (pop, workers).
Gather = Callable[[], Awaitable[tuple[str, list[dict[str, Any]]]]]


class MetricsServer:
    """A minimal HTTP/1.0 server on the event loop: ``GET /metrics`` (the only page)."""

    def __init__(self, gather: Gather) -> None:
        self._gather = gather
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > _MAX_HEAD:
                    raise ValueError("request head too long")
                method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                if method not in ("GET", "HEAD"):
                    status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
                elif path == "/metrics":
                    pop, workers = await self._gather()
                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, render(pop, workers)
                elif path == "/":
                    status, ctype, body = "200 OK", "text/plain", b"flowstate: see /metrics\n"
                else:
                    status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
                writer.write(
                    f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                )
                if method != "HEAD":
                    writer.write(body)
                await writer.drain()
        except (
            TimeoutError,
            OSError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # a broken scrape is the scraper's problem; nothing to log per request
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                await self._server.wait_closed()
            self._server = None
