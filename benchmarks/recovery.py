"""Route-change recovery: how long the first packet of a flow waits at a POP that never saw it.

Lab: `store_lab.StoreLab` (generator → forwarder with a real Redis Cluster store → sink),
store settings as shipped (lookup deadline 5 ms, patience 100 ms). Each round takes fresh
flows, pins them in Redis beforehand with `RedisClusterStore.pin_many` (as another POP
would have), each to a backend that is *not* Maglev's choice, so a packet that reaches
the pinned backend proves the record was read. Then pktgen sends one ACK per flow, paced
(`PACE_PPS`, one flow at a time): every packet is a local miss, held while the forwarder
GETs the flow from Redis, then tunnelled. Peers, interleaved round by round:

* `flowstate`: per flow, kernel receive timestamp of its packet on f-in (the forwarder's
  wire) to that of the tunnelled packet on s0 (SO_TIMESTAMPNS, both CLOCK_REALTIME), p50 and
  p99. The same flows sent again (now in the local table) give the forwarder's own floor
  (`hit`), and a burst of other pinned flows sent back to back shows batching (`burst`).
* `store_get`: the raw GET round trip of the same keys from the forwarder's namespace: a
  plain blocking client (hiredis parser, one GET at a time, to the key's master), paced
  like the flows.

Headline `ratio_p99` = recovery p99 / GET p99 (medians over rounds); the target is <= 3.
"""

from __future__ import annotations

import asyncio
import ipaddress
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.fastpath_lab import BACKENDS
from benchmarks.framework import (
    Benchmark,
    BenchmarkError,
    Context,
    Plan,
    Report,
    RunOptions,
    Stats,
    interleave,
    ratio,
    register,
)
from benchmarks.store_lab import (
    Capture,
    FlowSet,
    StoreLab,
    client_of_encap,
    client_of_ingress,
    encap_filter,
    shared_lab,
    tcp_to_vip_filter,
)
from flowstate.record import FlowRecord
from flowstate.store._resp import pack_command
from flowstate.store.redis_cluster import RedisClusterStore
from forwarder.maglev import MaglevTable
from forwarder.metrics import diff_histogram, quantile

TARGET_P99 = 3.0
PACE_PPS = 2000
BURST_PPS = 200_000
PEERS = ("flowstate", "store_get")
_BACKENDS = tuple(ipaddress.IPv6Address(b).packed for b in BACKENDS)


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    flows: int

    @classmethod
    def of(cls, options: RunOptions) -> Settings:
        # --seconds scales the flows per round (each takes 1/PACE_PPS s).
        flows = 300 if options.quick else 1000
        if options.seconds is not None:
            flows = max(50, int(options.seconds * PACE_PPS))
        return cls(rounds=options.pick_rounds(2, 4), flows=flows)


@dataclass
class Phase:
    """One batch of flows sent: per-flow latency (us) and what the forwarder did."""

    latencies_us: list[float] = field(default_factory=list)
    sent: int = 0
    followed: int = 0
    """Flows whose first packet went to the backend of their stored record."""

    @property
    def missing(self) -> int:
        return self.sent - len(self.latencies_us)

    def quantile(self, q: float) -> float:
        return _pick(sorted(self.latencies_us), q)

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies_us)
        return {
            "flows": self.sent,
            "forwarded": len(lat),
            "followed_record": self.followed,
            "us": {f"p{int(q * 100)}": round(_pick(lat, q), 1) for q in (0.5, 0.9, 0.99)}
            | {"max": round(lat[-1], 1) if lat else 0.0},
        }


@dataclass
class FlowstateRound:
    miss: Phase
    hit: Phase
    burst: Phase
    counters: dict[str, int]
    lookup_latency_ms: dict[str, float | None]


def _pick(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Recovery:
    """The lab's instruments for this benchmark: captures on f-in and s0, the pinning."""

    def __init__(self, lab: StoreLab) -> None:
        self.lab = lab
        self.ingress = Capture(lab.fwd, "f-in", tcp_to_vip_filter())
        self.egress = Capture(lab.sink, "s0", encap_filter())
        self.keys: list[bytes] = []

    def close(self) -> None:
        self.ingress.close()
        self.egress.close()

    def pin_elsewhere(self, flows: FlowSet) -> list[bytes]:
        """Pin every flow of `flows` in Redis to a backend Maglev would not pick; returns the
        pinned backend of each flow."""
        table = MaglevTable.build([(b, 100) for b in _BACKENDS], 65537)
        now_ms = int(time.time() * 1000)
        items = []
        pinned = []
        for i in range(flows.count):
            t = flows.tuple(i)
            choice = table.lookup(t.hash64())
            backend = _BACKENDS[(_BACKENDS.index(choice) + 1) % len(_BACKENDS)] if choice else b""
            pinned.append(backend)
            items.append((t, FlowRecord(backend, t.vip_ip, now_ms, "elsewhere"), 600_000))

        async def pin() -> None:
            store = await RedisClusterStore.connect(self.lab.seeds, password=self.lab.password)
            try:
                await store.pin_many(items, deadline_ms=10_000)
            finally:
                await store.close()

        with self.lab.fwd.entered():  # the store's sockets live in the forwarder's namespace
            asyncio.run(pin())
        return pinned

    def send(self, flows: FlowSet, pinned: list[bytes], pps: int) -> Phase:
        """One packet per flow at `pps` (0: back to back); per-flow f-in → s0 latency."""
        self.ingress.take()
        self.egress.take()
        lab = self.lab
        with lab.sending("ack", flows.count, pps, 1 if pps else 256) as gen:
            gen.communicate(timeout=flows.count / max(pps, 1000) * 3 + 10)
        deadline = time.monotonic() + 2.0
        arrived: dict[int, tuple[int, bytes]] = {}
        first_in: dict[int, int] = {}
        while time.monotonic() < deadline:
            time.sleep(0.05)
            for stamp, frame in self.ingress.take():
                client, port = client_of_ingress(frame)
                if port == flows.port:
                    first_in.setdefault(flows.index(client), stamp)
            for stamp, frame in self.egress.take():
                client, port, backend = client_of_encap(frame)
                if port == flows.port:
                    arrived.setdefault(flows.index(client), (stamp, backend))
            if len(arrived) >= flows.count and len(first_in) >= flows.count:
                break
        phase = Phase(sent=flows.count)
        for i, (stamp, backend) in arrived.items():
            if i in first_in and 0 <= i < flows.count:
                phase.latencies_us.append((stamp - first_in[i]) / 1000)
                phase.followed += backend == pinned[i]
        return phase

    def get_round_trips(self, pps: int) -> list[float]:
        """One GET per key of `keys`, one at a time at `pps` (the flows' pace, so that both
        peers sample the shared machine over as long), each to the key's master (us)."""
        cluster = self.lab.cluster
        out = []
        begin = time.perf_counter()
        for n, key in enumerate(self.keys):
            master = cluster.master_of(key)
            payload = pack_command("GET", key)
            delay = begin + n / pps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            start = time.perf_counter_ns()
            master.send(payload)
            (reply,) = master.read(1)
            out.append((time.perf_counter_ns() - start) / 1000)
            if reply is None:
                raise BenchmarkError("a pinned flow is missing from Redis")
        return out


def _lookup_histogram(lab: StoreLab) -> dict[str, Any]:
    hist: dict[str, Any] = lab.stats()["workers"][0]["store_latency"]["lookup"]
    return hist


@register
class RecoveryBenchmark(Benchmark):
    name = "recovery"
    summary = "first packet of a flow new to the POP: time to forward vs the store's GET RTT"

    def plan(self, options: RunOptions) -> Plan:
        s = Settings.of(options)
        per_round = 3.5 * s.flows / PACE_PPS + 1.0  # miss, hit and GET passes, burst, pinning
        return Plan(steps=1 + s.rounds * len(PEERS), seconds=6 + s.rounds * per_round)

    def run(self, ctx: Context) -> Report:
        settings = Settings.of(ctx.options)
        with shared_lab() as lab:
            lab.start_store_daemon()
            lab.fresh_flows(200)
            lab.warm()
            rec = Recovery(lab)
            try:
                ctx.step("lab up: Redis Cluster (6 nodes), forwarder (impl=c) connected")
                found = interleave(
                    PEERS,
                    settings.rounds,
                    lambda peer, rnd: self._measure(ctx, lab, rec, peer, rnd, settings),
                )
            finally:
                rec.close()
        return build_report(found, settings)

    def _measure(
        self,
        ctx: Context,
        lab: StoreLab,
        rec: Recovery,
        peer: str,
        rnd: int,
        settings: Settings,
    ) -> FlowstateRound | list[float]:
        tag = f"round {rnd + 1}/{settings.rounds} {peer}"
        if peer == "store_get":
            rtts = rec.get_round_trips(PACE_PPS)
            s = sorted(rtts)
            ctx.step(f"{tag}: GET p50 {_pick(s, 0.5):.0f} us, p99 {_pick(s, 0.99):.0f} us")
            return rtts
        before = lab.worker_counters()
        hist0 = _lookup_histogram(lab)
        flows = lab.fresh_flows(settings.flows)
        pinned = rec.pin_elsewhere(flows)
        miss = rec.send(flows, pinned, PACE_PPS)
        hit = rec.send(flows, pinned, PACE_PPS)
        hist1 = _lookup_histogram(lab)
        burst_flows = lab.fresh_flows(settings.flows)
        burst_pinned = rec.pin_elsewhere(burst_flows)
        burst = rec.send(burst_flows, burst_pinned, BURST_PPS)
        rec.keys = [flows.tuple(i).key() for i in range(flows.count)]  # store_get's next keys
        after = lab.worker_counters()
        keys = ("lookups", "lookup_hits", "lookup_failed", "lookup_not_found", "fallbacks")
        counters = {k: after[k] - before[k] for k in (*keys, "timeouts")}
        window = diff_histogram(hist1, hist0)
        lookup_ms = {
            f"p{int(q * 100)}": (None if (v := quantile(window, q)) is None else v * 1000)
            for q in (0.5, 0.99)
        }
        ctx.step(
            f"{tag}: first packet p50 {miss.quantile(0.5):.0f} us, p99 "
            f"{miss.quantile(0.99):.0f} us ({miss.followed}/{miss.sent} via the stored record); "
            f"in-table p50 {hit.quantile(0.5):.0f} us; burst p99 {burst.quantile(0.99):.0f} us"
        )
        return FlowstateRound(miss, hit, burst, counters, lookup_ms)


# ---- report ----------------------------------------------------------------------------------


def _us(v: float) -> str:
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} us"


def _cell(st: Stats) -> str:
    return f"{_us(st.median)} [{_us(st.min)}-{_us(st.max)}]"


def build_report(found: dict[str, list[Any]], settings: Settings) -> Report:
    rounds: list[FlowstateRound] = found["flowstate"]
    gets: list[list[float]] = found["store_get"]

    def per_round(phases: list[Phase], q: float) -> Stats:
        return Stats.of([p.quantile(q) for p in phases])

    miss50, miss99 = (
        per_round([r.miss for r in rounds], 0.5),
        per_round([r.miss for r in rounds], 0.99),
    )
    hit50, hit99 = per_round([r.hit for r in rounds], 0.5), per_round([r.hit for r in rounds], 0.99)
    burst50 = per_round([r.burst for r in rounds], 0.5)
    burst99 = per_round([r.burst for r in rounds], 0.99)
    get50 = Stats.of([_pick(sorted(g), 0.5) for g in gets])
    get99 = Stats.of([_pick(sorted(g), 0.99) for g in gets])
    r99, r50 = round(ratio(miss99, get99), 2), round(ratio(miss50, get50), 2)
    followed = sum(r.miss.followed for r in rounds)
    sent = sum(r.miss.sent for r in rounds)
    missing = sum(r.miss.missing + r.burst.missing for r in rounds)
    counters = {k: sum(r.counters[k] for r in rounds) for k in rounds[0].counters}
    lookup99 = [v for r in rounds if (v := r.lookup_latency_ms.get("p99")) is not None]
    lookup50 = [v for r in rounds if (v := r.lookup_latency_ms.get("p50")) is not None]
    data: dict[str, Any] = {
        "metric": (
            "recovery: f-in → s0 time of the first packet of flows pinned in Redis but unknown "
            "to the forwarder (kernel timestamps), p50/p99 per round; store_get: one GET round "
            "trip from the forwarder's namespace; median/min/max over rounds, us"
        ),
        "recovery_p50_us": miss50.to_json(),
        "recovery_p99_us": miss99.to_json(),
        "store_get_p50_us": get50.to_json(),
        "store_get_p99_us": get99.to_json(),
        "ratio_p99": r99,
        "ratio_p50": r50,
        "in_table_p50_us": hit50.to_json(),
        "in_table_p99_us": hit99.to_json(),
        "burst_p50_us": burst50.to_json(),
        "burst_p99_us": burst99.to_json(),
        "followed_record_share": round(followed / sent, 4) if sent else 0.0,
        "not_forwarded": missing,
        "forwarder_lookup_ms": {
            "p50": round(statistics.median(lookup50), 3) if lookup50 else None,
            "p99": round(statistics.median(lookup99), 3) if lookup99 else None,
            "note": "the forwarder's own lookup_many histogram (coarse buckets), interpolated",
        },
        "counters": counters,
        "target_p99": TARGET_P99,
        "setup": {
            "rounds": settings.rounds,
            "flows_per_round": settings.flows,
            "pace_pps": PACE_PPS,
            "burst_pps": BURST_PPS,
            "store": "as shipped: lookup_deadline_ms 5, lookup_patience_ms 100",
            "redis": "deploy/redis-cluster, 3 masters + 3 replicas, in its own namespace",
        },
        "rounds": [
            {"miss": r.miss.to_json(), "hit": r.hit.to_json(), "burst": r.burst.to_json()}
            for r in rounds
        ],
    }
    headers = ["path", "p50 [min-max]", "p99 [min-max]", "notes"]
    rows = [
        [
            "flowstate: first packet, flow new to the POP",
            _cell(miss50),
            _cell(miss99),
            f"{followed}/{sent} via the stored record; ratio p50 {r50:.1f}x, p99 {r99:.1f}x",
        ],
        ["store: raw GET round trip", _cell(get50), _cell(get99), "plain client, fwd namespace"],
        ["flowstate: same flows, in the local table", _cell(hit50), _cell(hit99), "the floor"],
        [
            f"flowstate: burst of {settings.flows} new flows",
            _cell(burst50),
            _cell(burst99),
            "back to back",
        ],
    ]
    verdict = "meets" if r99 <= TARGET_P99 else "MISSES"
    notes = [
        f"median [min-max] over {settings.rounds} interleaved rounds of {settings.flows} flows "
        f"at {PACE_PPS} flows/s; kernel receive timestamps on f-in and s0",
        f"target recovery p99 <= {TARGET_P99}x GET p99: {r99:.1f}x {verdict}",
        f"forwarder counters: {counters}",
    ]
    return Report(
        "recovery",
        data,
        headers,
        rows,
        notes,
        plot=lambda plt, out: plot_recovery(plt, out, rounds, gets),
    )


def plot_recovery(
    plt: Any, out: Path, rounds: list[FlowstateRound], gets: list[list[float]]
) -> list[Path]:
    """CDFs of the first-packet time, the in-table time, the burst and the GET round trip."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = {
        "first packet (record in Redis)": [x for r in rounds for x in r.miss.latencies_us],
        "burst of new flows": [x for r in rounds for x in r.burst.latencies_us],
        "in the local table": [x for r in rounds for x in r.hit.latencies_us],
        "raw GET round trip": [x for g in gets for x in g],
    }
    for label, values in series.items():
        v = sorted(values)
        if v:
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("microseconds")
    ax.set_ylabel("CDF")
    ax.set_title("recovery: first packet of a flow the POP never saw")
    ax.legend()
    fig.tight_layout()
    path = out / "recovery_cdf.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
