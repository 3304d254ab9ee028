"""Faults in the anycast lab: what production throws at flowstate, with connections open and
routes moving, and what it cost (`deploy/lab run --fault NAME|all [--quick] [--json]`).

Each fault is a scenario of its own on one lab, in flowstate mode: fresh forwarders in every POP,
long-lived connections through the router, the fault, BGP route moves during and after it, and
a second wave of connections opened once the fault has begun (their pinnings are made during or
after it). Where the store matters, a backend change makes it matter: after a change Maglev's
answer differs for the flows of the changed backend, so a lost or unreadable pinning shows as
a reset instead of hiding behind a correct guess.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.labkit.netns import wait_until
from deploy.labkit.plan import HTTP_PORT, VIP4, VIP6
from deploy.labkit.pops import BackendSite, PerPop, PopSite, forwarder_config
from deploy.labkit.results import pops_between, route_moves
from deploy.labkit.scenario import (
    FIRST_POP,
    Event,
    ModeRun,
    RouteMonitor,
    ScenarioOptions,
    _ModeDriver,
    _Traffic,
)
from deploy.labkit.topology import Lab
from deploy.redis_cluster_lib import ClusterSpec, NodeStatus, node_pid, probe

__all__ = [
    "CI_FAULTS",
    "FAULTS",
    "FaultOptions",
    "FaultRun",
    "drop_reasons",
    "fault_table",
    "flatten_stats",
    "run_fault",
    "summarize_fault",
]

FAULTS: dict[str, str] = {
    "redis-master-kill": "a Redis master SIGKILLed: its replica takes over; routes move during "
    "and after the failover",
    "redis-down": "every Redis node hung (SIGSTOP) for the outage: Maglev fallback, a backend "
    "change, then recovery, write-back and a route move",
    "pop-cut": "the active POP's fabric link cut (Redis and backends unreachable) while its "
    "route is withdrawn and moved",
    "forwarder-kill": "the active POP's forwarder SIGKILLed and restarted while the POP stays "
    "announced and keeps receiving traffic",
    "backend-kill": "a backend's server SIGKILLed: health checks take it out of new-flow "
    "selection; other connections untouched",
}
CI_FAULTS = tuple(FAULTS)
"""Faults the CI test runs (short versions)."""

KILLED_BACKEND = 3
"""The backend whose server the backend-kill fault kills."""
CHANGED_BACKEND = 2
"""The backend drained where a fault needs a backend change."""
RING_DROPS = ("rx_kernel_drops", "rx_truncated", "tx_errors", "tx_no_route", "tx_too_big")
CORE_DROPS = ("miss_queue_full", "dropped_no_store")
STORE_COUNTERS = (
    "lookups",
    "lookup_hits",
    "lookup_not_found",
    "lookup_failed",
    "fallbacks",
    "record_rejected",
    "pins",
    "pin_failed",
    "writeback_conflicts",
    "writeback_dropped",
)
STORE_CLIENT_COUNTERS = ("timeouts", "connection_errors", "connect_failures", "fast_fail", "moved")
REPLICA_COUNTERS = ("masters_failed", "replica_reads", "replica_failures", "failed_items")
"""The store client's reads around failed masters (`read_from_replicas`), also per POP."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class FaultOptions:
    connections: int = 200
    late_connections: int = 40
    """Connections opened once the fault has begun (pinned during or after it)."""
    udp_flows: int = 10
    interval: float = 0.05
    gap: float = 5.0
    """Seconds between two steps of a fault."""
    warmup: float = 2.0
    outage: float = 30.0
    """How long the whole Redis Cluster stays down (redis-down)."""
    stall: float = 2.0
    impl: str = "c"

    def traffic(self, connections: int, udp_flows: int) -> ScenarioOptions:
        return ScenarioOptions(
            connections=connections,
            udp_flows=udp_flows,
            interval=self.interval,
            gap=self.gap,
            warmup=self.warmup,
            stall=self.stall,
            impl=self.impl,
        )


@dataclass
class FaultRun(ModeRun):
    """What one fault's run produced, before summarizing (`flows` of both waves, each with a
    "wave": 1 or 2)."""

    fault: str = ""
    totals: dict[str, int] = field(default_factory=dict)
    """Every forwarder process's last counters ("engine.", "core.", "ring.", "store."), summed."""
    rss_max_kb: dict[str, int] = field(default_factory=dict)
    """Per POP: the largest resident size a forwarder of it had."""
    per_pop: dict[str, dict[str, int]] = field(default_factory=dict)
    """`totals`, per POP."""
    checks: dict[str, Any] = field(default_factory=dict)
    killed_backend: str | None = None


# ---- counters ------------------------------------------------------------------------------


def flatten_stats(stats: dict[str, Any]) -> dict[str, int]:
    """A `stats` answer as one flat dict of integer counters, summed over the workers."""
    out: dict[str, int] = {}

    def add(key: str, value: object) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value

    for worker in stats.get("workers", []):
        for kind in ("engine", "core", "forwarder"):
            for name, value in worker.get(kind, {}).items():
                add(f"{kind}.{name}", value)
        for ring in worker.get("rings", []):
            for name, value in ring.get("counters", {}).items():
                add(f"ring.{name}", value)
        for name, value in worker.get("store", {}).get("counters", {}).items():
            add(f"store.{name}", value)
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class CounterSampler(PerPop):
    """Polls every POP's forwarder (control API `stats`) and keeps the last counters of each
    forwarder process, so a SIGKILLed forwarder's counters are kept up to its last sample.

    It counts between `resume()` and `take()`: what the forwarders see while a fault's lab is
    torn down (stray packets of closed connections reach whichever POP is still announced) is
    not the fault's."""

    def __init__(self, pops: list[PopSite], interval: float = 0.5) -> None:
        super().__init__(pops, interval, "counter-sampler")
        self._last: dict[tuple[str, int], dict[str, int]] = {}
        self._rss: dict[str, int] = {}
        self._paused = True
        self._generation = 0
        self._lock = threading.Lock()

    def each(self, pop: PopSite) -> None:
        self.sample(pop)

    def sample(self, pop: PopSite) -> None:
        """Take `pop`'s forwarder's counters now (nothing if it does not run or answer)."""
        proc = pop.forwarder
        generation = self._generation
        if proc is None or proc.poll() is not None or self._paused:
            return
        rss = _rss_kb(proc.pid)
        try:
            stats = pop.control("stats", {"local": True})
        except Exception:  # a forwarder starting, stopping or killed: the next sample counts
            return
        with self._lock:
            if self._paused or generation != self._generation:
                return  # taken meanwhile: this sample belongs to no fault
            self._last[(pop.name, proc.pid)] = flatten_stats(stats)
            self._rss[pop.name] = max(self._rss.get(pop.name, 0), rss)

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def take(self) -> tuple[dict[str, int], dict[str, int], dict[str, dict[str, int]]]:
        """(counters summed over every process seen, max RSS per POP, counters per POP); then
        pause and forget them until `resume()`."""
        with self._lock:
            self._paused = True
            self._generation += 1
            total: dict[str, int] = {}
            per_pop: dict[str, dict[str, int]] = {}
            for (pop, _pid), counters in self._last.items():
                mine = per_pop.setdefault(pop, {})
                for key, value in counters.items():
                    total[key] = total.get(key, 0) + value
                    mine[key] = mine.get(key, 0) + value
            rss = dict(self._rss)
            self._last.clear()
            self._rss.clear()
        return total, rss, per_pop


def drop_reasons(counters: dict[str, int]) -> dict[str, int]:
    """Frames dropped, by reason: the engine's drop verdicts, the rings' receive/transmit
    losses and the slow path's queue overflows (only reasons that occurred)."""
    out: dict[str, int] = {}
    for key, value in sorted(counters.items()):
        kind, _, name = key.partition(".")
        dropped = (
            (kind == "engine" and name.startswith("drop_"))
            or (kind == "ring" and name in RING_DROPS)
            or (kind == "core" and name in CORE_DROPS)
        )
        if dropped and value:
            out[name] = out.get(name, 0) + value
    return out


# ---- Redis Cluster handles -----------------------------------------------------------------


def _cluster(lab: Lab) -> ClusterSpec:
    spec = ClusterSpec.load(lab.workdir / "redis")
    if spec is None:
        raise RuntimeError("the lab has no Redis Cluster")
    return spec


def _masters(spec: ClusterSpec) -> list[NodeStatus]:
    """Live, answering nodes that are masters."""
    return [st for st in probe(spec) if st.answering and st.role == "master"]


def _failed_over(spec: ClusterSpec, dead_id: str) -> bool:
    """Whether every live node agrees the cluster is ok and `dead_id` owns no slots."""
    live = [st for st in probe(spec) if st.answering]
    if not live or any(st.cluster_state != "ok" for st in live):
        return False
    owners = {v[0] for st in live for v in st.view if v[2] == "master" and v[4]}
    return dead_id not in owners and len(owners) == spec.masters


def _master_in(lab: Lab, pop: PopSite) -> None:
    """Make a node in `pop` a master (a clean manual failover of one of its replicas) unless
    one is: cutting that POP off must take a master with it (earlier faults move them)."""
    spec = _cluster(lab)

    def local() -> list[NodeStatus]:
        return [st for st in probe(spec) if st.netns == pop.ns.name and st.answering]

    if any(st.role == "master" for st in local()):
        return
    replica = local()[0]
    with spec.connect(spec.nodes[replica.index]) as client:
        client.call("CLUSTER", "FAILOVER")
    if not wait_until(lambda: any(st.role == "master" for st in local()), 30, 0.2):
        raise RuntimeError(f"{replica.addr} did not take over its master's slots")
    lab._redis("wait", "--timeout", "60")


def _signal_all(spec: ClusterSpec, sig: signal.Signals) -> int:
    """Send `sig` to every node of the cluster at once; how many were signalled."""
    pids = [pid for n in spec.nodes if (pid := node_pid(spec, n)) is not None]
    for pid in pids:
        os.kill(pid, sig)
    return len(pids)


# ---- the driver ----------------------------------------------------------------------------


def _health_config(text: str, backends: dict[int, BackendSite]) -> str:
    """`text` with HTTP health checks of every backend's fabric address (the lab's servers
    listen there; the decap address is a route, not a socket)."""
    for site in backends.values():
        line = f'address = "{site.decap}"\n'
        text = text.replace(line, f'{line}check_address = "{site.fabric4}"\n')
    # Pinned flows of a dead backend stay for the whole fault: its connections are dead anyway,
    # and a short grace on a loaded machine would move flows of a backend that only was slow.
    return text + (
        '\n[health]\nkind = "http"\npath = "/"\nport = 80\ninterval_ms = 300\n'
        "timeout_ms = 250\nrise = 2\nfall = 3\nrepin_after_ms = 600000\n"
    )


class _FaultDriver(_ModeDriver):
    """The scenario driver in flowstate mode, plus the faults and two waves of clients."""

    def __init__(
        self,
        lab: Lab,
        opts: FaultOptions,
        run: FaultRun,
        sampler: CounterSampler,
        log: Log,
        *,
        health: bool = False,
    ) -> None:
        super().__init__(lab, "flowstate", opts.traffic(opts.connections, opts.udp_flows), run, log)
        self.fault_run = run
        self.fopts = opts
        self.sampler = sampler
        self.health = health
        self.waves: list[_Traffic] = []
        self.undo: list[Callable[[], None]] = []
        """Restores what the fault broke (run in reverse, also on failure)."""

    # ---- serving processes (flowstate mode only) -----------------------------------------

    def start_serving(self, pop: PopSite) -> None:
        started = time.monotonic()
        config = forwarder_config(pop, self.settings, self.backends)
        if self.health:
            config = _health_config(config, self.lab.backends)
        pop.start_forwarder(config, self.lab.redis_user_password)
        if not pop.warm_store():
            self.log(f"    warning: {pop.name}: the store did not answer the warm-up lookups")
        self.log(f"    {pop.name}: forwarder ready in {time.monotonic() - started:.2f}s")

    def collect_counters(self, pop: PopSite) -> None:
        self.sampler.sample(pop)

    def say(self, event: Event) -> None:
        alive = reset = stalled = 0
        for wave in self.waves:
            p = wave.progress
            alive += p.get("alive", 0)
            reset += p.get("reset", 0)
            stalled += p.get("stalled", 0)
        t = event.t - self.fault_run.t0
        status = f"{alive} alive, {reset} reset, {stalled} stalled"
        self.log(f"  [{self.fault_run.fault} +{t:5.1f}s] {event.label:<44} {status}")

    def note(self, kind: str, label: str) -> None:
        self.say(self.fault_run.note(kind, label))

    # ---- clients -------------------------------------------------------------------------

    def open_wave(self, connections: int, udp_flows: int) -> None:
        opts = self.fopts.traffic(connections, udp_flows)
        wave = _Traffic(self.lab, opts)
        self.waves.append(wave)
        self.traffic = self.waves[0]
        if not wave.wait_established(connections, max(1.0, connections / 200) + 20):
            self.log(f"  warning: only {wave.progress.get('established', 0)} connections opened")
        self.note("start", f"wave {len(self.waves)}: {connections} connections open")

    def finish_waves(self) -> None:
        for number, wave in enumerate(self.waves, 1):
            flows, pauses = wave.finish(timeout=self.fopts.stall * 3 + 10)
            for flow in flows:
                flow["wave"] = number
            self.fault_run.flows.extend(flows)
            self.fault_run.client_pauses.extend(pauses)
        self.waves.clear()
        self.traffic = None

    def stop_waves(self) -> None:
        for wave in self.waves:
            wave.ns.stop(wave.proc)
        self.waves.clear()
        self.traffic = None

    # ---- steps ---------------------------------------------------------------------------

    def change_backends(self) -> None:
        """Drain a backend (no new flows): Maglev's answer changes for its flows, so from now
        on only the store knows where they are pinned."""
        self.drain_backend(CHANGED_BACKEND)

    def pause(self) -> None:
        time.sleep(self.fopts.gap)

    def wait_cluster_healthy(self) -> None:
        started = time.monotonic()
        self.lab._redis("wait", "--timeout", "90")
        self.note("redis", f"Redis Cluster healthy again ({time.monotonic() - started:.1f}s)")

    def check_readable(self, pops: list[PopSite], flows: list[dict[str, Any]]) -> dict[str, Any]:
        """Ask each POP's forwarder (control API `flow`: local table and a store lookup) about
        `flows`: is the pinning in the store, naming the backend that answered the client?"""
        per_pop: dict[str, dict[str, int]] = {}
        for pop in pops:
            found = wrong = missing = 0
            for flow in flows:
                backend = next(iter(flow["backends"]), None)
                if backend is None:
                    continue
                params = {
                    "proto": "tcp",
                    "client_ip": flow["src"],
                    "client_port": flow["sport"],
                    "vip_ip": VIP6 if flow["family"] == 6 else VIP4,
                    "vip_port": HTTP_PORT,
                }
                answer = pop.control("flow", params)
                store = answer.get("store", {})
                want = BackendSite.decap_of(int(backend.removeprefix("b")))
                if store.get("status") != "found":
                    missing += 1
                elif store["record"]["backend"] != want:
                    wrong += 1
                else:
                    found += 1
            per_pop[pop.name] = {"found": found, "wrong": wrong, "missing": missing}
        return per_pop


# ---- the faults ----------------------------------------------------------------------------


def _redis_master_kill(d: _FaultDriver) -> None:
    spec = _cluster(d.lab)
    victim = min(_masters(spec), key=lambda st: st.index)
    d.lab._redis("kill-node", str(victim.index), "--signal", "KILL")
    killed = time.monotonic()

    def restart() -> None:
        d.lab._redis("start-node", str(victim.index), "--timeout", "90")

    d.undo.append(restart)
    d.note("fault", f"Redis master {victim.addr} SIGKILLed")
    # During the failover: the next POP looks every flow up; the dead master's keys are read
    # from its replica (`read_from_replicas = "on-failure"`: the store client reads around a
    # master whose connection is lost or silent), and what still fails Maglev answers (right
    # for flows whose backend set did not change). It never waits for the dead master.
    d.move("pop2")
    if not wait_until(lambda: _failed_over(spec, str(victim.id)), 60, 0.2):
        raise RuntimeError("no replica took over the killed master's slots within 60 s")
    took = time.monotonic() - killed
    d.fault_run.checks["failover_s"] = round(took, 1)
    d.note("redis", f"failover done ({took:.1f}s after the kill)")
    d.open_wave(d.fopts.late_connections, 0)  # pinned by the new master
    d.change_backends()
    d.pause()
    d.move("pop3")  # finds the late connections' pinnings (the changed ones matter)
    d.pause()
    restart()
    d.undo.pop()
    d.note("redis", f"{victim.addr} restarted (a replica now)")
    d.move("pop1")
    d.pause()


def _redis_down(d: _FaultDriver) -> None:
    spec = _cluster(d.lab)
    count = _signal_all(spec, signal.SIGSTOP)

    def resume() -> None:
        _signal_all(spec, signal.SIGCONT)

    d.undo.append(resume)
    down_at = time.monotonic()
    d.note("fault", f"all {count} Redis nodes hung (SIGSTOP)")
    d.pause()
    d.move("pop2")  # every flow falls back to Maglev: still right, no backend changed yet
    d.open_wave(d.fopts.late_connections, 0)  # pinned by Maglev; their writes fail
    d.change_backends()  # only pop2's write-back can save the late flows of b2 now
    left = d.fopts.outage - (time.monotonic() - down_at)
    if left > 0:
        time.sleep(left)
    resume()
    d.undo.pop()
    d.note("redis", f"Redis nodes resumed after {time.monotonic() - down_at:.1f}s")
    d.wait_cluster_healthy()
    d.pause()  # pop2 writes its outage pinnings back
    d.move("pop3")  # needs the written-back pinnings of the late flows of b2
    d.pause()


def _fail_fabric_gateways(lab: Lab, pop: PopSite) -> dict[str, int]:
    """Leave the cut POP's next hops to the backends FAILED, as the cut does until the kernel's
    neighbour GC drops them (seconds to a minute later): the POP's kernel (it does not forward)
    then skips their routes and answers with the default route, through the uplink, until it
    re-probes them itself (`router_probe_interval`, 60 s). Pinned here, just before the link
    comes back, so that every run meets that worst case; {"found": already FAILED, "set": by
    this}."""
    states: dict[str, str] = {}
    for line in pop.ns.ip("-6", "neigh", "show", "dev", "fabric").splitlines():
        words = line.split()
        if words:
            states[words[0]] = words[-1]
    found = failed = 0
    for site in lab.backends.values():
        if states.get(site.fabric6) == "FAILED":
            found += 1
        else:
            pop.ns.ip("-6", "neigh", "replace", site.fabric6, "dev", "fabric", "nud", "failed")
            failed += 1
    return {"found": found, "set": failed}


def _pop_cut(d: _FaultDriver) -> None:
    pop = d.lab.pop(FIRST_POP)
    port = f"f-{pop.ns.role}"
    spec = _cluster(d.lab)
    local = [n.addr for n in spec.nodes if n.netns == pop.ns.name]

    def link(state: str) -> None:
        # The switch side of the POP's fabric leg: the POP sees its carrier go (its addresses
        # and routes stay, marked linkdown), the rest of the fabric loses the POP.
        d.lab.fabric.ip("link", "set", "dev", port, state)

    link("down")
    d.undo.append(lambda: link("up"))
    d.note("fault", f"{pop.name} cut from the fabric (Redis {', '.join(local)} with it)")
    pop.withdraw()
    d.lab.wait_routed_away(pop.name)
    d.note("withdraw", f"{pop.name} withdrawn: traffic moves on")
    d.pause()
    d.pause()  # the cluster fails the cut-off master over meanwhile
    d.open_wave(d.fopts.late_connections, 0)
    d.change_backends()
    d.move("pop3")
    d.pause()
    d.fault_run.checks["fabric_gateways_failed"] = _fail_fabric_gateways(d.lab, pop)
    link("up")
    d.undo.pop()
    d.note("redis", f"{pop.name} reconnected to the fabric")
    d.wait_cluster_healthy()
    pop.announce()
    d.move(pop.name)  # back to the POP that was cut: its store client must have recovered
    d.pause()


def _forwarder_kill(d: _FaultDriver) -> None:
    d.change_backends()  # the restarted forwarder must get b2's flows from the store
    d.pause()
    pop = d.lab.pop(d.lab.preferred())
    pop.hold_route = True
    d.undo.append(lambda: setattr(pop, "hold_route", False))
    d.collect_counters(pop)
    pop.kill_serving()
    killed = time.monotonic()
    d.note("fault", f"{pop.name}: forwarder SIGKILLed, the POP stays announced")
    d.stop_serving(pop)
    d.start_serving(pop)
    d.fault_run.checks["forwarder_down_s"] = round(time.monotonic() - killed, 2)
    pop.hold_route = False
    d.undo.pop()
    d.note("restart", f"{pop.name}: forwarder back")
    d.open_wave(d.fopts.late_connections, 0)
    d.pause()
    d.move("pop2")
    d.pause()


def _backend_kill(d: _FaultDriver) -> None:
    site = d.lab.backends[KILLED_BACKEND]
    d.fault_run.killed_backend = site.name
    server = site.server
    assert server is not None
    server.kill()
    server.wait()
    site.ns.stop(server)
    site.server = None
    d.undo.append(lambda: site.start_server(d.lab.workdir))
    killed = time.monotonic()
    d.note("fault", f"{site.name}: server SIGKILLed")

    def taken_out() -> bool:
        # Not the DOWN line: new flows avoid it only once the Maglev tables are rebuilt.
        said = f"backend {site.decap} out of new-flow selection"
        return all(said in p.log() for p in d.lab.pops)

    if not wait_until(taken_out, 20, 0.1):
        raise RuntimeError(f"the health checks did not take {site.name} out within 20 s")
    took = time.monotonic() - killed
    d.fault_run.checks["taken_out_s"] = round(took, 2)
    d.note("health", f"{site.name} DOWN at every POP ({took:.1f}s)")
    d.open_wave(d.fopts.late_connections, 0)
    d.pause()
    d.move("pop2")
    d.pause()
    site.start_server(d.lab.workdir)
    d.undo.pop()
    d.note("restart", f"{site.name}: server back")
    d.move("pop3")
    d.pause()


SCRIPTS: dict[str, Callable[[_FaultDriver], None]] = {
    "redis-master-kill": _redis_master_kill,
    "redis-down": _redis_down,
    "pop-cut": _pop_cut,
    "forwarder-kill": _forwarder_kill,
    "backend-kill": _backend_kill,
}


def run_fault(
    lab: Lab,
    name: str,
    opts: FaultOptions,
    monitor: RouteMonitor,
    sampler: CounterSampler,
    log: Log,
) -> FaultRun:
    """Set flowstate up, open connections, inflict the fault, move routes, tear down; what
    happened. The lab is whole again afterwards (Redis healthy, links up, servers running)."""
    log(f"fault {name}: {FAULTS[name]}")
    run = FaultRun("flowstate", time.monotonic(), fault=name)
    driver = _FaultDriver(lab, opts, run, sampler, log, health=name == "backend-kill")

    def withdrawn(pop: str) -> None:
        run.note("withdraw", f"{pop} withdrawn (health gate)")

    lab.on_withdraw = withdrawn
    sampler.resume()
    try:
        if name == "pop-cut":
            _master_in(lab, lab.pop(FIRST_POP))
        driver.set_up()
        run.t0 = time.monotonic()
        driver.open_wave(opts.connections, opts.udp_flows)
        time.sleep(opts.warmup)
        SCRIPTS[name](driver)
        run.t_end = time.monotonic()
        driver.finish_waves()
        # The late connections' pinnings (made during or after the fault), read by every POP
        # (closed connections' records linger fin_linger_s, long enough).
        late = [f for f in run.flows if f["wave"] == 2 and f["kind"] == "tcp"]
        if run.killed_backend:
            late = [f for f in late if run.killed_backend not in f["backends"]]
        run.checks["late_pinnings_in_store"] = driver.check_readable(lab.pops, late)
        for pop in lab.pops:
            sampler.sample(pop)
        run.totals, run.rss_max_kb, run.per_pop = sampler.take()
        log(f"  [{name}] done: {_count(run.flows, run.killed_backend)}")
    finally:
        driver.stop_waves()
        lab.on_withdraw = None
        for pop in lab.pops:
            pop.hold_route = False
        failures: list[BaseException] = []
        for undo in reversed(driver.undo):
            try:
                undo()
            except Exception as exc:  # keep restoring the rest
                failures.append(exc)
        if not run.totals:  # the fault failed half-way: what was counted until then
            for pop in lab.pops:
                sampler.sample(pop)
            run.totals, run.rss_max_kb, run.per_pop = sampler.take()
        driver.tear_down()
        sampler.take()
        run.routes = monitor.since(run.t0)
        if failures:
            raise RuntimeError(f"{name}: could not restore the lab: {failures}")
    return run


def _count(flows: list[dict[str, Any]], killed: str | None) -> str:
    counts: dict[str, int] = {}
    for f in flows:
        if f["kind"] == "tcp":
            key = f["status"] + (f" (on {killed})" if killed and killed in f["backends"] else "")
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


# ---- results -------------------------------------------------------------------------------


def _status_counts(flows: list[dict[str, Any]]) -> dict[str, int]:
    out = {"connections": len(flows), "completed": 0, "reset": 0, "stalled": 0, "failed": 0}
    for f in flows:
        out[f["status"]] = out.get(f["status"], 0) + 1
    return out


def summarize_fault(run: FaultRun) -> dict[str, Any]:
    """The fault's numbers (what `--json` prints per fault)."""
    killed = run.killed_backend
    tcp = [f for f in run.flows if f["kind"] == "tcp"]
    udp = [f for f in run.flows if f["kind"] == "udp"]
    on_killed = [f for f in tcp if killed and killed in f["backends"]]
    kept = [f for f in tcp if f not in on_killed]
    udp_kept = [f for f in udp if not (killed and killed in f["backends"])]
    core = {k: run.totals.get(f"core.{k}", 0) for k in STORE_COUNTERS}
    out: dict[str, Any] = {
        **_status_counts(kept),
        "dropped": drop_reasons(run.totals),
        "errors": dict(Counter(str(f["error"]) for f in kept if f["status"] != "completed")),
        "lost": [
            {k: f[k] for k in ("src", "sport", "wave", "status", "error", "backends")}
            for f in tcp
            if f["status"] != "completed"
        ],
        "late_connections": sum(1 for f in kept if f.get("wave") == 2),
        "longest_silence_s": round(max((f["max_gap"] for f in kept), default=0.0), 2),
        "served_by_several_pops": sum(
            len(pops_between(run.routes, f["established"] or f["start"], f["end"] or run.t_end)) > 1
            for f in kept
        ),
        "udp_flows": len(udp_kept),
        "udp_kept_backend": sum(f["status"] == "completed" for f in udp_kept),
        "udp_changed_backend": sum(f["status"] == "moved" for f in udp_kept),
        "udp_stalled": sum(f["status"] == "stalled" for f in udp_kept),
        "route_moves": route_moves(run.routes, run.t_end),
        "slow_path": core,
        "per_pop_lookups": {
            pop: {k: c.get(f"core.{k}", 0) for k in STORE_COUNTERS[:5]}
            for pop, c in sorted(run.per_pop.items())
        },
        "store_client": {
            k: run.totals.get(f"store.{k}", 0) for k in STORE_CLIENT_COUNTERS + REPLICA_COUNTERS
        },
        "per_pop_store_client": {
            pop: {k: c.get(f"store.{k}", 0) for k in REPLICA_COUNTERS}
            for pop, c in sorted(run.per_pop.items())
        },
        "forwarder_rss_max_mb": {p: round(kb / 1024, 1) for p, kb in run.rss_max_kb.items()},
        "checks": run.checks,
        "duration_s": round(run.t_end - run.t0, 1),
        "client_paused_s": round(sum(b - a for a, b in run.client_pauses), 2),
        "events": [
            {"t": round(e.t - run.t0, 2), "kind": e.kind, "label": e.label} for e in run.events
        ],
    }
    if killed:
        out["on_killed_backend"] = {"backend": killed, **_status_counts(on_killed)}
    return out


def _dropped_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in dropped.items()) or "-"


def fault_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per fault: connections, how they ended, frames dropped by reason."""
    cols = ("connections", "completed", "reset", "stalled", "failed")
    widths = (7, 11, 7, 9, 8)
    head = f"{'fault':<19}" + "".join(
        f"{name if name != 'connections' else 'conns':>{w}}"
        for name, w in zip(cols, widths, strict=True)
    )
    head += "  dropped by reason"
    lines = [head, "-" * max(len(head), 80)]

    def row(label: str, s: dict[str, Any]) -> str:
        return f"{label:<19}" + "".join(
            f"{s[name]:>{w}}" for name, w in zip(cols, widths, strict=True)
        )

    for name, s in summaries.items():
        lines.append(row(name, s) + f"  {_dropped_text(s['dropped'])}")
        k = s.get("on_killed_backend")
        if k:
            lines.append(row(f"  on killed {k['backend']}", k) + "  (not counted above)")
    return "\n".join(lines)


def with_quick(opts: FaultOptions) -> FaultOptions:
    """The short version (`--quick`, CI): shorter pauses and outage."""
    return dataclasses.replace(opts, gap=2.5, warmup=1.0, outage=8.0)
