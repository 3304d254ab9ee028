"""New flows pinned per second: SYNs of distinct flows into the forwarder, records in Redis.

Lab: `store_lab.StoreLab` (generator → forwarder with a real 6-node Redis Cluster store →
sink). `store.max_writes_per_s` is set to 10M for this benchmark (default 50k caps pins: a
SYN-flood guard, not what is measured here). Peers, interleaved round by round:

* `flowstate`: pktgen sends one SYN per fresh flow (never seen by the forwarder nor the
  store) at a paced rate; the forwarder forwards each SYN (C) and pins it (`SET NX PX`,
  pipelined, batches of up to 512). Pinned = records that appeared in Redis (`DBSIZE` summed
  over the masters). The headline `pins_per_s` is the highest offered SYN rate at which at
  least 99% of the SYNs were in Redis `PIN_GRACE_S` after the last one was sent (a search
  over paced rates, like fastpath's loss-free rate). Also measured: the rate pinned while
  the generator sends flat out (overload), and at each probe
  the pinning latency (SYN on the forwarder's wire → record readable in Redis; a sample of
  flows, found by polling) and the backlog (SYNs sent - records present) when sending ends.
* `redis_benchmark`: `redis-benchmark --cluster -P 64 -c 50 -t set` from the forwarder's
  namespace, same cluster, same path: the store's limit. `redis_benchmark_like` adds
  `-r 100000000 -d 40` (random keys, record-sized values), closer to flowstate's writes.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import pyspy
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
    MAX_FLOWS_PER_RUN,
    VIP_PACKED,
    Capture,
    Cluster,
    StoreLab,
    client_of_ingress,
    shared_lab,
    tcp_to_vip_filter,
)
from flowstate.flow import FiveTuple, Proto

TARGET = 0.3
MAX_WRITES_PER_S = 10_000_000
#: Share of the SYNs that must be in Redis for a rate to count as carried.
PINNED_THRESHOLD = 0.99
#: How long after the last SYN the records may take to appear (the pinning latency budget).
PIN_GRACE_S = 0.3
MIN_PROBE_PPS = 5_000
#: Paced rate of the probe whose CPU per pinned flow is comparable across runs and code
#: versions (the carried rate's is not: it differs from run to run, and the cost per flow
#: falls with the rate as batches grow). Low enough for a generator on a loaded machine.
FIXED_PPS = 20_000
#: Latency sample: SYNs whose client address has these bits clear (1 in 256).
SAMPLE_MASK = 0xFF
POLL_S = 0.001
PEERS = ("flowstate", "redis_benchmark", "redis_benchmark_like")
LIKE_FOR_LIKE = ("-r", "100000000", "-d", "40")


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    probe_seconds: float
    search_steps: int
    rb_requests: int
    peers: tuple[str, ...]

    @classmethod
    def of(cls, options: RunOptions) -> Settings:
        return cls(
            rounds=options.pick_rounds(1, 3),
            probe_seconds=options.pick_seconds(0.6, 1.2),
            search_steps=3 if options.quick else 5,
            rb_requests=300_000 if options.quick else 1_000_000,
            peers=PEERS[:2] if options.quick else PEERS,
        )


@dataclass
class Probe:
    """One paced (or overload) run of SYNs of fresh flows."""

    target_pps: int
    sent: int
    seconds: float
    pinned_at_end: int
    """Records present when the generator finished."""
    pinned: int
    """Records present PIN_GRACE_S later."""
    write_failures: int
    forwarder_cpu: float = 0.0
    """CPU seconds per second the daemon used while the generator ran."""
    latencies_ms: list[float] = field(default_factory=list)
    unpinned_samples: int = 0

    @property
    def offered_pps(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def pins_per_s(self) -> float:
        """Records that appeared while the generator ran, per second."""
        return self.pinned_at_end / self.seconds if self.seconds else 0.0

    @property
    def pinned_share(self) -> float:
        return self.pinned / self.sent if self.sent else 0.0

    @property
    def backlog(self) -> int:
        return max(0, self.sent - self.pinned_at_end)

    @property
    def passed(self) -> bool:
        return self.pinned_share >= PINNED_THRESHOLD

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "target_pps": self.target_pps,
            "offered_pps": round(self.offered_pps),
            "pins_per_s": round(self.pins_per_s),
            "pinned_share": round(self.pinned_share, 4),
            "backlog_at_end": self.backlog,
            "write_failures": self.write_failures,
            "forwarder_cpu": round(self.forwarder_cpu, 3),
            "latency_ms": _quantiles(lat),
            "latency_samples": len(lat),
            "unpinned_samples": self.unpinned_samples,
        }


@dataclass
class RoundResult:
    overload: Probe
    best: Probe | None
    probes: list[Probe]
    fixed: Probe | None = None
    """The FIXED_PPS probe."""

    @property
    def generator_limited(self) -> bool:
        """No probe found a rate the forwarder could not pin: the best is a lower bound."""
        return all(p.passed for p in self.probes)


def _quantiles(sorted_ms: list[float]) -> dict[str, float] | None:
    if not sorted_ms:
        return None
    return {f"p{q}": round(_pick(sorted_ms, q / 100), 3) for q in (50, 90, 99)} | {
        "max": round(sorted_ms[-1], 3)
    }


def _pick(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class PinLatency:
    """SYN-to-record latency of a sample of flows, from the forwarder's namespace.

    A capture on f-in keeps 1 in 256 SYNs (BPF) with their kernel receive time; a thread
    polls Redis for their keys every POLL_S. A record found by a poll is taken to have
    appeared halfway between that poll and the previous one that missed it.
    """

    def __init__(self, lab: StoreLab) -> None:
        self._capture = Capture(lab.fwd, "f-in", tcp_to_vip_filter(SAMPLE_MASK, syn_only=True))
        self._cluster = Cluster(lab.fwd, lab.seeds, lab.password)
        self._lock = threading.Lock()
        self._found: list[float] = []
        self._lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending: dict[bytes, tuple[int, int]] = {}  # key → (SYN time, last poll that missed)
        while not self._stop.wait(POLL_S):
            for stamp, frame in self._capture.take():
                client, port = client_of_ingress(frame)
                sport = int.from_bytes(frame[34:36], "big")
                key = FiveTuple(Proto.TCP, client, sport, VIP_PACKED, port).key()
                pending.setdefault(key, (stamp, stamp))
            if not pending:
                continue
            keys = list(pending)
            sent = time.time_ns()
            try:
                values = self._cluster.get_many(keys)
            except (OSError, BenchmarkError):
                return
            found: list[float] = []
            for key, value in zip(keys, values, strict=True):
                syn, missed = pending[key]
                if value is not None:
                    found.append(((missed + sent) / 2 - syn) / 1e6)
                    del pending[key]
                elif sent - syn > 3e9:
                    del pending[key]
                    with self._lock:
                        self._lost += 1
                else:
                    pending[key] = (syn, sent)
            with self._lock:
                self._found += found

    def take(self) -> tuple[list[float], int]:
        """(latencies in ms found since the last call, samples never pinned)."""
        with self._lock:
            found, self._found = self._found, []
            lost, self._lost = self._lost, 0
        return found, lost

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)
        self._capture.close()
        self._cluster.close()


def run_syns(lab: StoreLab, pps: int, seconds: float, latency: PinLatency | None) -> Probe:
    """SYNs of fresh flows at `pps` (0: flat out) for `seconds`; what Redis holds when the
    generator stops and PIN_GRACE_S later. Waits for the forwarder's pinning to go idle
    first, so that no earlier run's backlog is counted."""
    drain(lab)
    count = MAX_FLOWS_PER_RUN if pps == 0 else max(1000, min(MAX_FLOWS_PER_RUN, int(pps * seconds)))
    lab.fresh_flows(count)
    cluster = lab.cluster
    before = lab.worker_counters()
    db0 = cluster.dbsize()
    if latency is not None:
        latency.take()
    batch = 256 if pps == 0 else max(16, min(256, pps // 1000))
    with lab.sending("syn", count, pps, batch) as gen:
        start = lab.wait_sending(gen)
        cpu0 = lab.daemon_cpu_seconds()
        try:
            out, _ = gen.communicate(timeout=seconds if pps == 0 else seconds * 4 + 10)
        except subprocess.TimeoutExpired:
            lab.gen.stop(gen)  # SIGTERM: it prints its report and exits
            out, _ = gen.communicate()
    elapsed = time.monotonic() - start
    cpu = (lab.daemon_cpu_seconds() - cpu0) / elapsed
    db_end = cluster.dbsize()
    time.sleep(PIN_GRACE_S)
    db_grace = cluster.dbsize()
    after = lab.worker_counters()
    if lab.daemon_died():
        raise BenchmarkError(f"forwarder exited:\n{lab.daemon_log_text()}")
    report = _generator_report(out)
    failures = sum(after[k] - before[k] for k in ("pin_failed", "writes_rate_limited"))
    sent = int(report.get("sent", 0))
    # From the first frame out to the generator's exit (pktgen's own time includes building
    # its frames), so that pins/s and offered/s are rates while sending.
    probe = Probe(pps, sent, elapsed, db_end - db0, db_grace - db0, failures, cpu)
    if latency is not None:
        probe.latencies_ms, probe.unpinned_samples = latency.take()
    return probe


def drain(lab: StoreLab, quiet_s: float = 0.6, timeout: float = 15.0) -> None:
    """Wait until neither Redis nor the forwarder's pin counters change for `quiet_s` (the
    pins of a failed write batch are written back after up to 0.5 s)."""

    def state() -> tuple[int, int, int]:
        c = lab.worker_counters()
        return lab.cluster.dbsize(), c["pins"], c["pin_failed"]

    last = state()
    quiet_since = time.monotonic()
    deadline = quiet_since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = state()
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return


def _generator_report(stdout: str) -> dict[str, Any]:
    import json

    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise BenchmarkError(f"pktgen printed no report: {stdout!r}")


def search_pin_rate(
    measure: Callable[[int], Probe], start: float, top: float, steps: int
) -> tuple[Probe | None, list[Probe]]:
    """Highest paced SYN rate that passes (`Probe.passed`): geometric bisection below `top`,
    starting at `start`."""
    probes: list[Probe] = []
    lo, hi = 0.0, top
    best: Probe | None = None
    target = min(max(start, MIN_PROBE_PPS), top)
    for _ in range(steps):
        probe = measure(int(max(MIN_PROBE_PPS, target)))
        probes.append(probe)
        rate = probe.target_pps
        if probe.passed:
            if best is None or probe.pins_per_s > best.pins_per_s:
                best = probe
            lo = max(lo, rate)
        else:
            hi = min(hi, rate)
        if lo >= 0.95 * top or hi <= MIN_PROBE_PPS:
            break
        target = math.sqrt(lo * hi) if lo else hi / 2
    return best, probes


@register
class NewFlowsBenchmark(Benchmark):
    name = "new_flows"
    summary = "SYNs/s pinned in Redis Cluster by the forwarder vs redis-benchmark -P 64 SET"

    def plan(self, options: RunOptions) -> Plan:
        s = Settings.of(options)
        probe = s.probe_seconds + PIN_GRACE_S + 0.4
        rb = (len(s.peers) - 1) * (0.5 + s.rb_requests / 400_000)
        per_round = (2 + s.search_steps) * probe + rb
        return Plan(steps=1 + s.rounds * len(s.peers), seconds=7 + s.rounds * per_round)

    def run(self, ctx: Context) -> Report:
        settings = Settings.of(ctx.options)
        with shared_lab(store={"max_writes_per_s": MAX_WRITES_PER_S}) as lab:
            lab.start_store_daemon()
            lab.fresh_flows(200)
            lab.warm()
            latency = PinLatency(lab)
            try:
                ctx.step("lab up: Redis Cluster (6 nodes), forwarder (impl=c) connected")
                found = interleave(
                    settings.peers,
                    settings.rounds,
                    lambda peer, rnd: self._measure(ctx, lab, latency, peer, rnd, settings),
                )
                rounds = [r for r in found["flowstate"] if isinstance(r, RoundResult)]
                profile = self._profile(ctx, lab, rounds)
            finally:
                latency.close()
        report = build_report(found, settings)
        if profile:
            report.data["profile"] = profile
            report.notes.append(
                f"profile (py-spy --native at {profile['pps']:,} SYN/s): {profile['file']}"
            )
        return report

    def _profile(self, ctx: Context, lab: StoreLab, rounds: list[RoundResult]) -> dict[str, Any]:
        """With --profile: py-spy of the daemon pinning at 90% of the median carried rate."""
        out = ctx.options.out
        if not ctx.options.profile or out is None:
            return {}
        if not pyspy.available():
            ctx.note("--profile: py-spy is not installed")
            return {}
        best = [r.best.offered_pps for r in rounds if r.best is not None]
        if not best or lab.daemon is None:
            return {}
        pps = int(0.9 * statistics.median(best))
        out.mkdir(parents=True, exist_ok=True)
        raw = out / "pyspy-new_flows.raw"
        recording = pyspy.Recording(lab.daemon.pid, 3.0, raw, delay=0.5)
        probe = run_syns(lab, pps, 4.0, None)
        recording.wait()
        path = out / "profile-new_flows.txt"
        head = (
            f"# new_flows: forwarder (impl=c) pinning SYNs of new flows, paced at {pps:,}/s: "
            f"offered {probe.offered_pps:,.0f}/s, {probe.pinned_share:.1%} pinned, daemon "
            f"{probe.forwarder_cpu:.2f} CPU {recording.error}\n\n"
        )
        path.write_text(head + pyspy.summarize(raw))
        ctx.note(f"profile at {pps:,} SYN/s: {path}")
        return {"file": str(path), "pps": pps, "forwarder_cpu": round(probe.forwarder_cpu, 3)}

    def _measure(
        self,
        ctx: Context,
        lab: StoreLab,
        latency: PinLatency,
        peer: str,
        rnd: int,
        settings: Settings,
    ) -> RoundResult | float:
        tag = f"round {rnd + 1}/{settings.rounds} {peer}"
        if peer == "redis_benchmark":
            lab.cluster.flushall()
            rate = lab.redis_benchmark(settings.rb_requests)
            ctx.step(f"{tag}: {rate:,.0f} SET/s")
            return rate
        if peer == "redis_benchmark_like":
            lab.cluster.flushall()
            rate = lab.redis_benchmark(settings.rb_requests, *LIKE_FOR_LIKE)
            ctx.step(f"{tag} ({' '.join(LIKE_FOR_LIKE)}): {rate:,.0f} SET/s")
            return rate
        lab.cluster.flushall()
        overload = run_syns(lab, 0, settings.probe_seconds, None)
        best, probes = search_pin_rate(
            lambda pps: run_syns(lab, pps, settings.probe_seconds, latency),
            start=overload.offered_pps / 2,
            top=max(overload.offered_pps, 2 * MIN_PROBE_PPS),
            steps=settings.search_steps,
        )
        shown = f"{best.offered_pps:,.0f} SYN/s all pinned" if best else "no rate passed"
        if all(p.passed for p in probes):
            shown += " (generator-limited)"
        ctx.step(
            f"{tag}: {shown}; overload {overload.offered_pps:,.0f} SYN/s → "
            f"{overload.pins_per_s:,.0f} pins/s"
        )
        fixed = run_syns(lab, FIXED_PPS, settings.probe_seconds, None)
        return RoundResult(overload, best, probes, fixed)


# ---- report ----------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def _cell(st: Stats) -> str:
    return f"{_fmt(st.median)} [{_fmt(st.min)}-{_fmt(st.max)}]"


def build_report(found: dict[str, list[Any]], settings: Settings) -> Report:
    rounds: list[RoundResult] = found["flowstate"]
    limited = any(r.generator_limited for r in rounds)
    rb = Stats.of(found["redis_benchmark"])
    like = Stats.of(found["redis_benchmark_like"]) if "redis_benchmark_like" in found else None
    pins = Stats.of([r.best.offered_pps if r.best else 0.0 for r in rounds])
    overload = Stats.of([r.overload.pins_per_s for r in rounds])
    best_probes = [r.best for r in rounds if r.best is not None]
    lat_all = sorted(x for p in best_probes for x in p.latencies_ms)
    lat_p50 = [_pick(sorted(p.latencies_ms), 0.5) for p in best_probes if p.latencies_ms]
    lat_p99 = [_pick(sorted(p.latencies_ms), 0.99) for p in best_probes if p.latencies_ms]
    backlog = [float(p.backlog) for p in best_probes]
    # Forwarder CPU per pinned flow at the carried rate, and what one core would pin if that
    # cost stayed linear: a figure the generator's limit does not cap.
    cpu_us = [1e6 * p.forwarder_cpu / p.offered_pps for p in best_probes if p.offered_pps]
    cpu_per_pin = Stats.of(cpu_us) if cpu_us else None
    fixed = [r.fixed for r in rounds if r.fixed is not None and r.fixed.offered_pps]
    cpu_fixed = Stats.of([1e6 * p.forwarder_cpu / p.offered_pps for p in fixed]) if fixed else None
    per_core = 1e6 / cpu_per_pin.median if cpu_per_pin and cpu_per_pin.median else 0.0
    r_main = round(ratio(pins, rb), 3)
    data: dict[str, Any] = {
        "metric": (
            f"pins_per_s: highest offered rate of SYNs of new flows with >= "
            f"{PINNED_THRESHOLD:.0%} of them in Redis {PIN_GRACE_S} s after the last one and no "
            "failed write (median/min/max over rounds); redis_benchmark: SET requests/s"
        ),
        "pins_per_s": pins.to_json(0),
        "overload_pins_per_s": overload.to_json(0),
        "redis_benchmark_set_per_s": rb.to_json(0),
        "redis_benchmark_like_set_per_s": like.to_json(0) if like else None,
        "ratio_vs_redis_benchmark": r_main,
        "ratio_vs_redis_benchmark_like": round(ratio(pins, like), 3) if like else None,
        "ratio_overload_vs_redis_benchmark": round(ratio(overload, rb), 3),
        "generator_limited": limited,
        "pin_latency_ms": _quantiles(lat_all),
        "pin_latency_p50_ms": Stats.of(lat_p50).to_json(3) if lat_p50 else None,
        "pin_latency_p99_ms": Stats.of(lat_p99).to_json(3) if lat_p99 else None,
        "backlog_at_end": Stats.of(backlog).to_json(0) if backlog else None,
        "forwarder_cpu_us_per_pin": cpu_per_pin.to_json(2) if cpu_per_pin else None,
        "forwarder_cpu_us_per_pin_at_fixed_rate": cpu_fixed.to_json(2) if cpu_fixed else None,
        "fixed_rate": {
            "target_pps": FIXED_PPS,
            "probes": [p.to_json() for p in fixed],
        },
        "implied_pins_per_core": round(per_core),
        "ratio_implied_per_core_vs_redis_benchmark": round(per_core / rb.median, 3)
        if rb.median
        else 0.0,
        "target": TARGET,
        "setup": {
            "rounds": settings.rounds,
            "probe_seconds": settings.probe_seconds,
            "search_steps": settings.search_steps,
            "max_writes_per_s": MAX_WRITES_PER_S,
            "pin_grace_s": PIN_GRACE_S,
            "redis": "deploy/redis-cluster, 3 masters + 3 replicas, in its own namespace",
            "redis_benchmark": "redis-benchmark --cluster -P 64 -c 50 -t set "
            f"-n {settings.rb_requests} (like: + {' '.join(LIKE_FOR_LIKE)})",
            "latency_sample": f"1 SYN in {SAMPLE_MASK + 1}, polled every {POLL_S * 1000:g} ms",
        },
        "rounds": [
            {
                "overload": r.overload.to_json(),
                "best": r.best.to_json() if r.best else None,
                "probes": [p.to_json() for p in r.probes],
            }
            for r in rounds
        ],
    }
    lat_text = (
        f"p50 {statistics.median(lat_p50):.2f} ms, p99 {statistics.median(lat_p99):.2f} ms"
        if lat_p50
        else "n/a"
    )
    headers = ["peer", "rate [min-max]", "ratio vs redis-benchmark", "notes"]
    rows = [
        [
            "flowstate (SYNs pinned)",
            _cell(pins) + (" *" if limited else ""),
            f"{r_main:.2f}",
            f"SYN→record {lat_text}; backlog at end "
            f"{statistics.median(backlog) if backlog else 0:,.0f}",
        ],
        [
            "flowstate under overload",
            _cell(overload),
            f"{ratio(overload, rb):.2f}",
            f"generator flat out: {_fmt(Stats.of([r.overload.offered_pps for r in rounds]).median)}"
            " SYN/s offered",
        ],
        ["redis-benchmark -P 64 SET", _cell(rb), "1.00", "the store's limit"],
    ]
    if like is not None:
        rows.append(
            [
                "redis-benchmark -P 64 SET -r 1e8 -d 40",
                _cell(like),
                f"{ratio(like, rb):.2f}",
                "random keys, 40 B values",
            ]
        )
    verdict = "meets" if r_main >= TARGET else "MISSES"
    notes = [
        f"median [min-max] over {settings.rounds} interleaved rounds; store.max_writes_per_s "
        f"= {MAX_WRITES_PER_S:,} for this benchmark (default 50,000 caps pins)",
        f"target >= {TARGET}x redis-benchmark: {r_main:.2f} {verdict}",
    ]
    if limited:
        notes.append(
            "* generator-limited: every paced rate it could offer was pinned (a lower bound)"
        )
    if cpu_per_pin is not None:
        notes.append(
            f"forwarder CPU per pinned flow at the carried rate: {cpu_per_pin.median:.1f} us "
            f"-> one core would pin ~{per_core / 1000:.0f}k/s if linear "
            f"({per_core / rb.median if rb.median else 0:.2f}x redis-benchmark)"
        )
    if cpu_fixed is not None:
        notes.append(
            f"forwarder CPU per pinned flow at {FIXED_PPS:,} SYN/s paced (comparable across "
            f"runs): {cpu_fixed.median:.1f} us [{cpu_fixed.min:.1f}-{cpu_fixed.max:.1f}]"
        )
    return Report(
        "new_flows", data, headers, rows, notes, plot=lambda plt, out: plot_pins(plt, out, rounds)
    )


def plot_pins(plt: Any, out: Path, rounds: list[RoundResult]) -> list[Path]:
    """Pinned vs offered SYN rate of every probe, with the pin latency CDF."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    probes = [p for r in rounds for p in [*r.probes, r.overload]]
    ax.scatter(
        [p.offered_pps for p in probes],
        [p.pins_per_s for p in probes],
        c=["tab:green" if p.passed else "tab:red" for p in probes],
    )
    top = max([p.offered_pps for p in probes] + [1.0])
    ax.plot([0, top], [0, top], color="grey", linestyle=":")
    ax.set_xlabel("offered SYNs/s (new flows)")
    ax.set_ylabel("records written to Redis /s")
    ax.set_title("new_flows: green = all pinned")
    lat = sorted(x for r in rounds if r.best for x in r.best.latencies_ms)
    if lat:
        bx.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))])
        bx.set_xscale("log")
    bx.set_xlabel("SYN → record in Redis (ms)")
    bx.set_ylabel("CDF")
    bx.set_title("pin latency at the carried rate")
    fig.tight_layout()
    path = out / "new_flows.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
