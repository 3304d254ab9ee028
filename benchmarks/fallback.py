"""Fallback cost: packets/s of new and unknown flows while the store is down (Maglev only).

Established flows never touch the store, so what an outage can slow down is the first packet
of a flow: a SYN (Maglev picks in C; the pin write fails and is kept for write-back) or a
mid-flow packet the forwarder has no entry for (a route change: the packet waits for a
lookup that cannot succeed, `lookup_patience_ms` = 100 as shipped, then Maglev decides).

Lab: `store_lab.StoreLab`. Every measurement sends packets of fresh flows (each packet the
first of its flow), so every packet takes that path. Peers, interleaved round by round:

* `ack_up` / `ack_down`: mid-flow packets (ACK) of unknown flows, store reachable (the GET
  finds nothing, Maglev, write-back pin) / unreachable (nftables drops the forwarder's
  packets to Redis: timeouts, then backoff).
* `syn_up` / `syn_down` (full runs): SYNs of new flows, the same two store states.
* `ack_refused` (full runs): as `ack_down`, but Redis answers with TCP resets, like stopped
  nodes (connection refused: every call fails at once).

Per peer the headline is the loss-free rate, found as fastpath finds it
(`fastpath.search_loss_free`: highest forwarded rate whose offered rate lost <= 1%), after
an overload probe (`OVERLOAD_PPS` asked). An "up" peer that follows a "down" one gets a
restarted forwarder and a flushed store, so it never pays for the outage's write-back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import fastpath, pyspy
from benchmarks.fastpath_lab import Window
from benchmarks.framework import (
    Benchmark,
    Context,
    Plan,
    Report,
    RunOptions,
    Stats,
    interleave,
    ratio,
    register,
)
from benchmarks.store_lab import OVERLOAD_PPS, StoreLab, shared_lab

SIZE = 64


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    flags: str
    store: str
    """"up", or how it is cut off: "drop" (unreachable) or "reject" (refused)."""
    quick: bool
    describe: str


#: "up" peers first: a round restarts the forwarder once, when it goes from down to up.
PEERS = (
    Peer("ack_up", "ack", "up", True, "ACK of an unknown flow, store reachable"),
    Peer("syn_up", "syn", "up", False, "SYN of a new flow, store reachable"),
    Peer("ack_down", "ack", "drop", True, "ACK of an unknown flow, store unreachable"),
    Peer("syn_down", "syn", "drop", False, "SYN of a new flow, store unreachable"),
    Peer("ack_refused", "ack", "reject", False, "ACK of an unknown flow, store refuses"),
)


def _settings(options: RunOptions) -> fastpath.Settings:
    seconds = options.pick_seconds(0.4, 0.8)
    return fastpath.Settings(
        rounds=options.pick_rounds(1, 2),
        seconds=seconds,
        probe_seconds=seconds,
        ramp=0.2,
        search_steps=3 if options.quick else 5,
        retries=0 if options.quick else 1,
        peers=(),
    )


def _peers(options: RunOptions) -> tuple[Peer, ...]:
    return tuple(p for p in PEERS if p.quick or not options.quick)


@dataclass
class PeerResult:
    loss_free_pps: float
    generator_limited: bool
    overload: Window
    counters: dict[str, int]


@register
class FallbackBenchmark(Benchmark):
    name = "fallback"
    summary = "pps of new/unknown flows with the store down (Maglev only) vs reachable"

    def plan(self, options: RunOptions) -> Plan:
        s = _settings(options)
        peers = _peers(options)
        probe = s.probe_seconds + s.ramp + 0.2
        per_peer = 1.0 + (1 + s.search_steps + s.retries) * probe
        restarts = 2.0 * s.rounds
        return Plan(
            steps=1 + s.rounds * len(peers), seconds=6 + restarts + s.rounds * len(peers) * per_peer
        )

    def run(self, ctx: Context) -> Report:
        settings = _settings(ctx.options)
        peers = _peers(ctx.options)
        with shared_lab() as lab:
            state = {"store": "none"}
            try:
                ctx.step("lab up: Redis Cluster (6 nodes)")
                found = interleave(
                    peers,
                    settings.rounds,
                    lambda peer, rnd: self._measure(ctx, lab, state, peer, rnd, settings),
                    name=lambda peer: peer.name,
                )
                profile = self._profile(ctx, lab, state, found, settings)
            finally:
                lab.store_down(None)
        report = build_report(found, peers, settings)
        if profile:
            report.data["profiles"] = profile
            report.notes.append(
                "profiles (py-spy --native at 90% of the loss-free rate): "
                + ", ".join(p["file"] for p in profile.values())
            )
        return report

    def _profile(
        self,
        ctx: Context,
        lab: StoreLab,
        state: dict[str, str],
        found: dict[str, list[PeerResult]],
        settings: fastpath.Settings,
    ) -> dict[str, dict[str, Any]]:
        """With --profile: py-spy of the daemon on unknown flows, store up and down."""
        out = ctx.options.out
        if not ctx.options.profile or out is None:
            return {}
        if not pyspy.available():
            ctx.note("--profile: py-spy is not installed")
            return {}
        out.mkdir(parents=True, exist_ok=True)
        done: dict[str, dict[str, Any]] = {}
        for peer in PEERS:
            if peer.name not in ("ack_up", "ack_down") or peer.name not in found:
                continue
            pps = int(0.9 * Stats.of([r.loss_free_pps for r in found[peer.name]]).median)
            self._enter(lab, state, peer)
            assert lab.daemon is not None
            raw = out / f"pyspy-fallback-{peer.name}.raw"
            recording = pyspy.Recording(lab.daemon.pid, 3.0, raw, delay=0.4)
            sink = lab.sink_for(SIZE)
            try:
                window = lab.measure(sink, SIZE, 3.6, settings.ramp, pps)
            finally:
                sink.close()
            recording.wait()
            path = out / f"profile-fallback-{peer.name}.txt"
            path.write_text(
                f"# fallback {peer.name}: {peer.describe}; paced at {pps:,} pps, forwarded "
                f"{window.forwarded_pps:,.0f} pps, loss {window.loss:.1%}, daemon "
                f"{window.forwarder_cpu:.2f} CPU {recording.error}\n\n" + pyspy.summarize(raw)
            )
            ctx.note(f"profile of {peer.name} at {pps:,} pps: {path}")
            done[peer.name] = {"file": str(path), "pps": pps}
        return done

    def _enter(self, lab: StoreLab, state: dict[str, str], peer: Peer) -> None:
        """Put the store in `peer`'s state (see the module docstring)."""
        if peer.store == "up" and state["store"] != "up":
            # A fresh forwarder and store: nothing of an earlier outage left to write back.
            lab.store_down(None)
            lab.stop_daemon()
            lab.cluster.flushall()
            lab.start_store_daemon()
            lab.fresh_flows(200)
            lab.warm()
        elif peer.store != "up" and state["store"] != peer.store:
            lab.store_down(peer.store)
            # Let the forwarder find out (its connections stall, are aborted, back off).
            lab.tx_flags = "ack"
            lab.fresh_flows(5000)
            with lab.blast(SIZE, 5000):
                time.sleep(0.6)
        state["store"] = peer.store
        lab.tx_flags = peer.flags

    def _measure(
        self,
        ctx: Context,
        lab: StoreLab,
        state: dict[str, str],
        peer: Peer,
        rnd: int,
        settings: fastpath.Settings,
    ) -> PeerResult:
        self._enter(lab, state, peer)
        before = lab.worker_counters()
        sink = lab.sink_for(SIZE)
        try:
            overload = lab.measure(sink, SIZE, settings.seconds, settings.ramp)
            best, limited, _probes = fastpath.search_loss_free(lab, sink, SIZE, settings, overload)
        finally:
            sink.close()
        after = lab.worker_counters()
        keys = (
            "misses",
            "miss_queue_full",
            "lookup_failed",
            "lookup_retries",
            "fallbacks",
            "new",
            "pins",
            "pin_failed",
            "timeouts",
            "fast_fail",
        )
        counters = {k: after[k] - before[k] for k in keys}
        flag = " (generator-limited)" if limited else ""
        ctx.step(
            f"round {rnd + 1}/{settings.rounds} {peer.name}: loss-free {best:,.0f} pps{flag}; "
            f"overload {overload.forwarded_pps:,.0f} of {overload.generated_pps:,.0f}"
        )
        return PeerResult(best, limited, overload, counters)


# ---- report ----------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def _cell(st: Stats) -> str:
    return f"{_fmt(st.median)} [{_fmt(st.min)}-{_fmt(st.max)}]"


def build_report(
    found: dict[str, list[PeerResult]], peers: tuple[Peer, ...], settings: fastpath.Settings
) -> Report:
    pps = {p: Stats.of([r.loss_free_pps for r in rs]) for p, rs in found.items()}
    over = {p: Stats.of([r.overload.forwarded_pps for r in rs]) for p, rs in found.items()}
    limited = {p: any(r.generator_limited for r in rs) for p, rs in found.items()}
    ratios = {
        f"{a}_vs_{b}": round(ratio(pps[a], pps[b]), 3)
        for a, b in (("ack_down", "ack_up"), ("syn_down", "syn_up"), ("ack_refused", "ack_up"))
        if a in pps and b in pps
    }
    counters = {
        p: {k: sum(r.counters[k] for r in rs) for k in rs[0].counters} for p, rs in found.items()
    }
    data: dict[str, Any] = {
        "metric": (
            "pps: forwarded packets/s of packets that each start an unknown flow, at the "
            f"highest offered rate with <= {fastpath.LOSS_THRESHOLD:.0%} loss (median/min/max "
            "over rounds); overload_pps: forwarded with the generator asked "
            f"{OVERLOAD_PPS:,} pps"
        ),
        "pps": {p: s.to_json(0) for p, s in pps.items()},
        "overload_pps": {p: s.to_json(0) for p, s in over.items()},
        "ratio_down_vs_up": ratios.get("ack_down_vs_ack_up"),
        "ratios": ratios,
        "generator_limited": limited,
        "counters": counters,
        "setup": {
            "rounds": settings.rounds,
            "probe_seconds": settings.probe_seconds,
            "search_steps": settings.search_steps,
            "peers": {p.name: p.describe for p in peers},
            "store_down": "nftables in the forwarder's namespace: drop (unreachable) or "
            "reject with tcp reset (refused) on its packets to the Redis nodes",
            "store": "as shipped: lookup_deadline_ms 5, lookup_patience_ms 100, fallback on",
        },
    }
    headers = ["peer", "loss-free pps [min-max]", "overload (forwarded)", "vs store up", "what"]
    rows = []
    for p in peers:
        if p.name not in pps:
            continue
        base = "ack_up" if p.flags == "ack" else "syn_up"
        rel = f"{ratio(pps[p.name], pps[base]):.2f}" if base in pps else "-"
        star = " *" if limited[p.name] else ""
        rows.append([p.name, _cell(pps[p.name]) + star, _fmt(over[p.name].median), rel, p.describe])
    notes = [
        f"median [min-max] over {settings.rounds} interleaved rounds; each packet is the first "
        "of a fresh flow; loss-free = <= 1% loss",
        "ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
    ]
    if any(limited.values()):
        notes.insert(1, "* generator-limited in at least one round (a lower bound)")
    for name in ("ack_up", "ack_down", "ack_refused"):
        c = counters.get(name)
        if c and c["misses"]:
            notes.append(
                f"{name}: {c['lookup_failed'] / c['misses']:.1f} failed lookups and "
                f"{c['miss_queue_full'] / c['misses']:.1%} queue-full drops per unknown-flow "
                f"packet, {c['fallbacks']:,} Maglev fallbacks"
            )
    return Report(
        "fallback", data, headers, rows, notes, plot=lambda plt, out: plot_fallback(plt, out, pps)
    )


def plot_fallback(plt: Any, out: Path, pps: dict[str, Stats]) -> list[Path]:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(pps)
    ax.bar(
        names,
        [pps[n].median for n in names],
        color=["tab:green" if n.endswith("_up") else "tab:red" for n in names],
    )
    ax.errorbar(
        names,
        [pps[n].median for n in names],
        yerr=[
            [pps[n].median - pps[n].min for n in names],
            [pps[n].max - pps[n].median for n in names],
        ],
        fmt="none",
        color="black",
    )
    ax.set_ylabel("loss-free packets/s (each the first of its flow)")
    ax.set_title("fallback: new/unknown flows with the store reachable (green) or not (red)")
    fig.tight_layout()
    path = out / "fallback.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
