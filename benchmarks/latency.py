"""Latency added: request/response round trips of one TCP connection, with and without flowstate.

```
 client ── rt ──────────── fwd  (flowstate-forwarder impl=c on VIP_C, impl=python on VIP_PY;
  c-rt      │ rt-f ═ f-rt        kernel routing of ROUTED_ADDR)
            └─ br0 ─┬─ f-fab
                    └─ b1-fab ── b1  (backend-setup: VIPs on lo, seg6local decap; pingpong serve)
```

`pingpong.c` (compiled at run time) is both ends: one connection, 64-byte requests echoed
back one at a time, each round trip timed by the client. Peers, interleaved round by round,
all to the same server process over the same namespaces and veths:

* `direct`: to the backend's fabric address: client → rt → br0 → b1, reply b1 → rt → client.
* `routed`: to an address of b1 that rt routes through fwd and fwd routes (kernel IPv4
  forwarding) to b1: the forwarder's extra hop without flowstate.
* `flowstate_c`: to VIP_C: rt → fwd, where the daemon (impl=c, one worker on its own CPU)
  tunnels it to b1, which decapsulates and replies straight to the client (DSR).
* `flowstate_python`: the same through a second daemon, impl=python, serving VIP_PY.

The daemons use the in-process store: an established flow's packets never wait on the
store (the connection's SYN, the only packet that involves it, is not timed).
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import pktgen, snapshot
from benchmarks.fastpath_lab import NICE, cpus, prioritise
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
from tests.netns import Topology, netns_unavailable, remove_stale_namespaces, wait_until

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).with_name("pingpong.c")
VIP_C, VIP_PY = "192.0.2.10", "192.0.2.11"
CLIENT = "10.1.0.2"
BACKEND = "10.3.0.21"
ROUTED_ADDR = "10.5.0.21"
SOURCE6, BACKEND6, DECAP6 = "fd00:3::10", "fd00:3::21", "fd00:b::1"
PORT = 7000
SIZE = 64
TARGET_P50 = 1.3
PEERS = ("direct", "routed", "flowstate_c", "flowstate_python")
TARGETS = {
    "direct": BACKEND,
    "routed": ROUTED_ADDR,
    "flowstate_c": VIP_C,
    "flowstate_python": VIP_PY,
}


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    requests: int

    @classmethod
    def of(cls, options: RunOptions) -> Settings:
        requests = 600 if options.quick else 2000
        if options.seconds is not None:
            requests = max(100, int(options.seconds * 1000))
        return cls(rounds=options.pick_rounds(3, 5), requests=requests)


def build_pingpong() -> Path:
    """The compiled pingpong, cached by the source's hash next to pktgen's build."""
    return pktgen.compile_cached(SOURCE, "the latency benchmark")


class LatencyLab:
    """The namespaces, the backend's server and the two daemons (see the module docstring)."""

    def __init__(self, topo: Topology, binary: Path, workdir: Path, pythonpath: str) -> None:
        self.topo = topo
        self.binary = binary
        self.workdir = workdir
        self.pythonpath = pythonpath
        _, self.fwd_cpu = cpus()
        self.client, self.rt, self.fwd, self.b1 = (
            topo.add_netns(r) for r in ("client", "rt", "fwd", "b1")
        )
        self.daemons: dict[str, subprocess.Popen[str]] = {}
        self._build()

    def _build(self) -> None:
        client, rt, fwd, b1 = self.client, self.rt, self.fwd, self.b1
        self.topo.veth(
            client, "c-rt", rt, "rt-c", a_addrs=[f"{CLIENT}/24"], b_addrs=["10.1.0.1/24"]
        )
        self.topo.veth(fwd, "f-rt", rt, "rt-f", a_addrs=["10.2.0.2/24"], b_addrs=["10.2.0.1/24"])
        rt.ip("link", "add", "br0", "type", "bridge")
        rt.ip("link", "set", "br0", "up")
        rt.add_address("br0", "10.3.0.1/24")
        rt.enable_forwarding(ipv6=False)
        client.add_route("default", "10.1.0.1")
        for ns, dev, addrs in (
            (fwd, "f-fab", ["10.3.0.10/24", f"{SOURCE6}/64"]),
            (b1, "b1-fab", [f"{BACKEND}/24", f"{BACKEND6}/64"]),
        ):
            peer = f"br-{ns.role}"
            self.topo.veth(ns, dev, rt, peer, a_addrs=addrs)
            rt.ip("link", "set", peer, "master", "br0")
            ns.disable_offloads(dev, ("gro", "lro", "tso", "gso"))
        for dev in ("c-rt",):
            client.disable_offloads(dev, ("gro", "lro", "tso", "gso"))
        for dev in ("rt-c", "rt-f"):
            rt.disable_offloads(dev, ("gro", "lro", "tso", "gso"))
        # rt hands the VIPs and ROUTED_ADDR to fwd; fwd routes ROUTED_ADDR on to b1 itself.
        for dest in (VIP_C, VIP_PY, ROUTED_ADDR):
            rt.add_route(f"{dest}/32", "10.2.0.2")
        fwd.add_route("default", "10.3.0.1")
        fwd.add_route(f"{ROUTED_ADDR}/32", BACKEND)
        fwd.add_route(f"{DECAP6}/128", BACKEND6)
        for vip in (VIP_C, VIP_PY):
            fwd.ip("route", "add", "blackhole", f"{vip}/32")
        fwd.set_sysctl("net.ipv4.ip_forward", 1)
        for key in ("all", "default", "f-rt", "f-fab"):
            fwd.set_sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
        b1.add_route("default", "10.3.0.1")
        b1.ip("addr", "add", f"{ROUTED_ADDR}/32", "dev", "lo")
        setup = REPO / "deploy" / "backend-setup"
        args = ["--vip", VIP_C, "--vip", VIP_PY, "--decap-addr", DECAP6, "--dev", "b1-fab"]
        b1.run(["bash", str(setup), *args, "--mss", "1400"])
        self.topo.settle()
        server = b1.popen([str(self.binary), "serve", "--port", str(PORT), "--size", str(SIZE)])
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise BenchmarkError(f"pingpong serve did not start: {server.stderr}")

    def config_text(self, name: str, impl: str, vip: str) -> str:
        return (
            f'pop = "bench"\ninterfaces = ["f-rt"]\nsource_ipv6 = "{SOURCE6}"\n'
            f'impl = "{impl}"\nworkers = 1\n[store]\nkind = "memory"\n'
            f'[control]\nsocket = "{self.workdir}/{name}.sock"\nmetrics = ""\n'
            f'[[vip]]\naddress = "{vip}"\nport = {PORT}\nprotocol = "tcp"\n'
            f'[[vip.backend]]\naddress = "{DECAP6}"\n'
        )

    def start_daemons(self) -> None:
        """Both daemons, pinned to the forwarder CPU (only one carries traffic at a time).

        PYTHONSAFEPATH: `python -m` would otherwise put its working directory (the
        repository, whose `forwarder/` may hold another build) before the snapshot."""
        for name, impl, vip in (
            ("flowstate_c", "c", VIP_C),
            ("flowstate_python", "python", VIP_PY),
        ):
            cfg = self.workdir / f"{name}.toml"
            cfg.write_text(self.config_text(name, impl, vip))
            log = self.workdir / f"{name}.log"
            cmd = ["taskset", "-c", str(self.fwd_cpu), *NICE, sys.executable, "-m"]
            cmd += ["forwarder.daemon", "--config", str(cfg), "--log-level", "warning"]
            with log.open("w") as out:
                proc = self.fwd.popen(
                    cmd,
                    env={"PYTHONPATH": self.pythonpath, "PYTHONSAFEPATH": "1"},
                    stdout=out.fileno(),
                    stderr=out.fileno(),
                )
            prioritise(proc.pid)
            self.daemons[name] = proc
        for name in self.daemons:
            if not wait_until(functools.partial(self._answers, name), timeout=30, interval=0.2):
                raise BenchmarkError(f"{name} does not forward:\n{self.log(name)}")

    def _answers(self, name: str) -> bool:
        proc = self.daemons[name]
        if proc.poll() is not None:
            raise BenchmarkError(f"{name} exited:\n{self.log(name)}")
        with contextlib.suppress(BenchmarkError):
            self.ping_pong(TARGETS[name], 5, warmup=0, timeout_ms=300)
            return True
        return False

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def ping_pong(
        self, host: str, count: int, warmup: int = 50, timeout_ms: int = 2000
    ) -> list[float]:
        """Round trips (us) of one connection to `host`, after `warmup` requests."""
        cmd = [str(self.binary), "client", "--host", host, "--port", str(PORT)]
        cmd += ["--count", str(count), "--warmup", str(warmup), "--size", str(SIZE)]
        cmd += ["--timeout-ms", str(timeout_ms)]
        out = self.client.run(cmd, check=False, timeout=60)
        lines = out.stdout.split()
        if out.returncode != 0 or lines[:2] != ["ok", str(count)]:
            raise BenchmarkError(f"pingpong to {host} failed: {out.stderr.strip()}")
        return [int(x) / 1000 for x in lines[2:]]

    def stop(self) -> None:
        for proc in self.daemons.values():
            self.fwd.stop(proc, timeout=5.0)
        self.daemons.clear()


def _pick(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@register
class LatencyBenchmark(Benchmark):
    name = "latency"
    summary = "TCP request/response RTT through the forwarder vs straight to the backend"

    def plan(self, options: RunOptions) -> Plan:
        s = Settings.of(options)
        # The four peers' round trips add up to ~0.2 ms per request (impl=python's ~0.1 ms).
        per_round = s.requests * 0.0002 + 0.3
        return Plan(steps=1 + s.rounds, seconds=3 + s.rounds * per_round)

    def run(self, ctx: Context) -> Report:
        problem = netns_unavailable()
        if problem is not None:
            raise BenchmarkError(f"latency needs network namespaces: {problem}")
        remove_stale_namespaces()
        settings = Settings.of(ctx.options)
        binary = build_pingpong()
        tree = snapshot.snapshot()
        with (
            tempfile.TemporaryDirectory(prefix="fs-bench-lat-") as workdir,
            Topology("latency") as topo,
        ):
            lab = LatencyLab(topo, binary, Path(workdir), snapshot.pythonpath(tree))
            try:
                lab.start_daemons()
                ctx.step("lab up: client, router, forwarder (impl=c and impl=python), backend")

                def measure(peer: str, rnd: int) -> list[float]:
                    rtts = lab.ping_pong(TARGETS[peer], settings.requests)
                    if peer == PEERS[-1]:
                        ctx.step(f"round {rnd + 1}/{settings.rounds}: {len(PEERS)} peers")
                    return rtts

                found = interleave(PEERS, settings.rounds, measure)
            finally:
                lab.stop()
        return build_report(found, settings)


# ---- report ----------------------------------------------------------------------------------


def _us(v: float) -> str:
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} us"


def _cell(st: Stats) -> str:
    return f"{_us(st.median)} [{_us(st.min)}-{_us(st.max)}]"


def build_report(found: dict[str, list[list[float]]], settings: Settings) -> Report:
    p50 = {p: Stats.of([_pick(sorted(r), 0.5) for r in found[p]]) for p in PEERS}
    p99 = {p: Stats.of([_pick(sorted(r), 0.99) for r in found[p]]) for p in PEERS}
    ratios = {
        f"{a}_vs_{b}": {
            "p50": round(ratio(p50[a], p50[b]), 3),
            "p99": round(ratio(p99[a], p99[b]), 3),
        }
        for a, b in (
            ("flowstate_c", "direct"),
            ("flowstate_python", "direct"),
            ("routed", "direct"),
            ("flowstate_c", "routed"),
        )
    }
    head = ratios["flowstate_c_vs_direct"]
    via_router = ratios["flowstate_c_vs_routed"]
    data: dict[str, Any] = {
        "metric": (
            f"round trip of a {SIZE}-byte request and its echo on one TCP connection (us), "
            "p50 and p99 per round; median/min/max over rounds"
        ),
        "p50_us": {p: s.to_json() for p, s in p50.items()},
        "p99_us": {p: s.to_json() for p, s in p99.items()},
        "ratio_p50": head["p50"],
        "ratio_p99": head["p99"],
        "ratios": ratios,
        "target_p50": TARGET_P50,
        "setup": {
            "rounds": settings.rounds,
            "requests_per_round": settings.requests,
            "size": SIZE,
            "peers": {
                "direct": "client → rt → backend, reply the same way",
                "routed": "client → rt → fwd (kernel forwarding) → backend, reply via rt",
                "flowstate_c": "client → rt → fwd (daemon impl=c) → tunnel → backend, DSR",
                "flowstate_python": "the same with impl=python",
            },
            "store": "memory (an established flow's packets never wait on the store)",
        },
    }
    headers = ["peer", "p50 [min-max]", "p99 [min-max]", "p50 / direct", "p99 / direct"]
    rows = []
    for p in PEERS:
        rows.append(
            [
                p,
                _cell(p50[p]),
                _cell(p99[p]),
                f"{ratio(p50[p], p50['direct']):.2f}",
                f"{ratio(p99[p], p99['direct']):.2f}",
            ]
        )
    verdict = "meets" if head["p50"] <= TARGET_P50 else "MISSES"
    notes = [
        f"median [min-max] over {settings.rounds} interleaved rounds of {settings.requests} "
        f"requests ({SIZE} B) on one connection per peer and round",
        f"target p50 <= {TARGET_P50}x direct: flowstate_c {head['p50']:.2f}x {verdict}",
        "flowstate_c vs routed (kernel forwarding on the same hop): p50 "
        f"{via_router['p50']:.2f}x, p99 {via_router['p99']:.2f}x",
    ]
    return Report(
        "latency", data, headers, rows, notes, plot=lambda plt, out: plot_latency(plt, out, found)
    )


def plot_latency(plt: Any, out: Path, found: dict[str, list[list[float]]]) -> list[Path]:
    """CDF of every round trip of every round, one line per peer."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for peer in PEERS:
        v = sorted(x for r in found[peer] for x in r)
        ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=peer)
    ax.set_xscale("log")
    ax.set_xlabel("round trip (us)")
    ax.set_ylabel("CDF")
    ax.set_title(f"latency: {SIZE}-byte request/response on one TCP connection")
    ax.legend()
    fig.tight_layout()
    path = out / "latency_cdf.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
