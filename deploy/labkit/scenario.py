"""The lab's scenario, run once per mode on the same topology.

Long-lived connections and UDP flows run while the VIPs' BGP route moves between POPs, a backend
is added (rolling forwarder restarts: the only way to add one today) and one is removed (drained
through the control API), and the forwarder of the POP carrying the traffic crashes and restarts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from deploy.labkit.plan import CLIENT4_FIRST, CLIENT6_FIRST, REPO, VIP4, VIP6
from deploy.labkit.pops import (
    ACTIVE,
    DRAINING,
    BackendSite,
    ForwarderSettings,
    PopSite,
    forwarder_config,
)
from deploy.labkit.topology import Lab

__all__ = [
    "DEFAULT_STEPS",
    "MODES",
    "Event",
    "ModeRun",
    "RouteMonitor",
    "ScenarioOptions",
    "check_steps",
    "run_mode",
]

MODES = ("flowstate", "local", "naive")
MODE_HELP = {
    "flowstate": "forwarders sharing pinnings in the Redis Cluster (the product)",
    "local": "the same forwarders, per-POP state only + Maglev (Katran/Maglev style)",
    "naive": "every POP serves the VIPs itself, no forwarding layer",
}
# A step is "move:POP", "add:N" (backend N joins), "drain:N" (backend N leaves) or "crash".
DEFAULT_STEPS = ("move:pop2", "add:5", "move:pop3", "drain:2", "move:pop1", "crash", "move:pop2")
INITIAL_BACKENDS = (1, 2, 3, 4)
FIRST_POP = "pop1"
"""Where the router sends the VIPs at the start of every mode."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class ScenarioOptions:
    connections: int = 200
    udp_flows: int = 20
    interval: float = 0.05
    """Mean time between two requests of one connection."""
    gap: float = 5.0
    """Seconds between two steps (and after the last one: longer than `stall`)."""
    warmup: float = 2.0
    stall: float = 2.0
    """No progress for this long: the connection counts as stalled."""
    steps: tuple[str, ...] = DEFAULT_STEPS
    impl: str = "c"
    """Data path of the forwarders."""


@dataclass
class Event:
    t: float
    """CLOCK_MONOTONIC seconds."""
    kind: str
    """"move" (BGP policy), "add"/"drain" (backend), "crash", "restart", "withdraw", "announce"."""
    label: str


@dataclass
class ModeRun:
    """What one mode's run produced, before summarizing."""

    mode: str
    t0: float
    t_end: float = 0.0
    flows: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    routes: list[tuple[float, str | None]] = field(default_factory=list)
    """(time, POP the router sends the VIP to) at each change."""
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per POP: the forwarders' slow-path counters, summed over restarts."""
    forwarder_starts: int = 0
    backend_changes: int = 0
    policy_moves: int = 0
    client_pauses: list[list[float]] = field(default_factory=list)
    """[start, end] of each time the client process was not scheduled (excluded from gaps)."""

    def note(self, kind: str, label: str) -> Event:
        event = Event(time.monotonic(), kind, label)
        self.events.append(event)
        return event


class RouteMonitor:
    """Follows the router's kernel route for the IPv4 VIP (`ip monitor route`), timestamped."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.timeline: list[tuple[float, str | None]] = []
        self._lock = threading.Lock()
        self.proc = lab.router.popen(["ip", "-4", "monitor", "route"], stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, name="route-monitor", daemon=True)
        self._thread.start()
        time.sleep(0.1)  # `ip monitor` subscribes before reading the current state
        self._set(lab.routed_pop())

    def _set(self, pop: str | None) -> None:
        with self._lock:
            if not self.timeline or self.timeline[-1][1] != pop:
                self.timeline.append((time.monotonic(), pop))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            words = line.split()
            deleted = words[:1] == ["Deleted"]
            if deleted:
                words = words[1:]
            if not words or words[0] not in (VIP4, f"{VIP4}/32"):
                continue
            dev = words[words.index("dev") + 1] if "dev" in words else ""
            pop = dev.removeprefix("rt-") if dev.startswith("rt-pop") else None
            if deleted:
                with self._lock:
                    current = self.timeline[-1][1] if self.timeline else None
                if current == pop:
                    self._set(None)
            else:
                self._set(pop)

    def since(self, t0: float) -> list[tuple[float, str | None]]:
        """The timeline from `t0` on, starting with the route in force at `t0`."""
        with self._lock:
            before = [entry for entry in self.timeline if entry[0] <= t0]
            after = [entry for entry in self.timeline if entry[0] > t0]
        return ([(t0, before[-1][1])] if before else []) + after

    def close(self) -> None:
        self.lab.router.stop(self.proc)
        self._thread.join(timeout=2)


class _Traffic:
    """The client process, its progress lines, and its final report."""

    def __init__(self, lab: Lab, opts: ScenarioOptions) -> None:
        ramp = max(1.0, opts.connections / 200)
        args = ["--vip4", VIP4, "--vip6", VIP6, "--conns", str(opts.connections)]
        args += ["--udp-flows", str(opts.udp_flows), "--interval", str(opts.interval)]
        args += ["--stall", str(opts.stall), "--ramp", str(ramp)]
        args += ["--src4", CLIENT4_FIRST, "--n4", str(lab.size.clients4)]
        args += ["--src6", CLIENT6_FIRST, "--n6", str(lab.size.clients6)]
        self.ns = lab.client
        self.proc = lab.client.popen(
            [sys.executable, "-m", "deploy.labkit.traffic", *args], env={"PYTHONPATH": str(REPO)}
        )
        self.progress: dict[str, Any] = {}
        self.errors: list[str] = []
        self._report: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, name="traffic-progress", daemon=True),
            threading.Thread(target=self._read_report, name="traffic-report", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_report(self) -> None:
        assert self.proc.stdout is not None
        self._report.append(self.proc.stdout.read())

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.progress = json.loads(line)
            except ValueError:
                self.errors.append(line.rstrip())

    def wait_established(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.progress.get("established", 0) >= count:
                return True
            time.sleep(0.1)
        return False

    def status(self) -> str:
        p = self.progress
        return (
            f"{p.get('alive', 0)} alive, {p.get('reset', 0)} reset, "
            f"{p.get('stalled', 0)} stalled, {p.get('failed', 0)} failed"
        )

    def finish(self, timeout: float) -> tuple[list[dict[str, Any]], list[list[float]]]:
        """SIGTERM: the client closes every connection and prints its report."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        finally:
            self.ns.stop(self.proc)
        for thread in self._threads:
            thread.join(timeout=5)
        out = "".join(self._report)
        if not out.strip():
            raise RuntimeError("traffic client printed no report:\n" + "\n".join(self.errors[-20:]))
        report: dict[str, Any] = json.loads(out)
        return report["flows"], report["pauses"]


class _ModeDriver:
    """Applies the scenario's steps to the lab in one mode and records what happened."""

    def __init__(self, lab: Lab, mode: str, opts: ScenarioOptions, run: ModeRun, log: Log):
        self.lab = lab
        self.mode = mode
        self.opts = opts
        self.run = run
        self.log = log
        self.backends: dict[int, str] = dict.fromkeys(INITIAL_BACKENDS, ACTIVE)
        store = "redis-cluster" if mode == "flowstate" else "memory"
        tls = lab.redis_tls
        self.settings = ForwarderSettings(
            store,
            tuple(lab.redis_seeds),
            opts.impl,
            username=lab.redis_user,
            tls=None if tls is None else (str(tls.ca), str(tls.cert), str(tls.key)),
        )
        self.traffic: _Traffic | None = None
        self._lock = threading.Lock()

    # ---- serving processes ---------------------------------------------------------------

    def start_serving(self, pop: PopSite) -> None:
        if self.mode == "naive":
            pop.respawn_local_server()
            return
        started = time.monotonic()
        config = forwarder_config(pop, self.settings, self.backends)
        pop.start_forwarder(config, self.lab.redis_user_password)
        with self._lock:
            self.run.forwarder_starts += 1
        # Announced only once it reaches every Redis master (see PopSite.warm_store).
        if self.mode == "flowstate" and not pop.warm_store():
            self.log(f"    warning: {pop.name}: the store did not answer the warm-up lookups")
        self.log(f"    {pop.name}: forwarder ready in {time.monotonic() - started:.2f}s")

    def stop_serving(self, pop: PopSite) -> None:
        """Stop the forwarder (or local server) but leave naive mode's VIPs on lo."""
        self.collect_counters(pop)
        pop.stop_forwarder()
        if pop.server is not None:
            pop.ns.stop(pop.server)
            pop.server = None

    def restart_serving(self, pop: PopSite) -> None:
        self.stop_serving(pop)
        self.start_serving(pop)

    def in_parallel(self, job: Callable[[PopSite], None], pops: list[PopSite]) -> None:
        """Run `job` for each POP at once (process starts are mostly waiting); re-raise."""
        if pops:
            with ThreadPoolExecutor(len(pops)) as pool:
                list(pool.map(job, pops))

    def collect_counters(self, pop: PopSite) -> None:
        if pop.forwarder is None or not pop.serving():
            return
        counters = pop.core_counters()
        with self._lock:
            total = self.run.counters.setdefault(pop.name, {})
            for key, value in counters.items():
                total[key] = total.get(key, 0) + value

    def set_up(self) -> None:
        if self.mode == "naive":
            self.in_parallel(PopSite.start_local_server, self.lab.pops)
        else:
            self.in_parallel(self.start_serving, self.lab.pops)
        for pop in self.lab.pops:
            pop.announce()
        self.lab.reset_routing()
        if not self.lab.wait_routed(FIRST_POP):
            raise RuntimeError(f"the router does not send the VIPs to {FIRST_POP}")

    def tear_down(self) -> None:
        for pop in self.lab.pops:
            pop.withdraw()
        self.in_parallel(self.stop_serving, self.lab.pops)
        for pop in self.lab.pops:
            pop.stop_local_server()
        if self.mode == "flowstate":
            self.lab.redis_cli("FLUSHALL")

    # ---- steps ---------------------------------------------------------------------------

    def step(self, step: str) -> None:
        kind, _, arg = step.partition(":")
        if kind == "move":
            self.move(arg)
        elif kind == "add":
            self.add_backend(int(arg))
        elif kind == "drain":
            self.drain_backend(int(arg))
        elif kind == "crash":
            self.crash()
        else:
            raise ValueError(f"unknown step {step!r}")

    def say(self, event: Event) -> None:
        status = self.traffic.status() if self.traffic else ""
        self.log(f"  [{self.mode} +{event.t - self.run.t0:5.1f}s] {event.label:<34} {status}")

    def move(self, pop: str) -> None:
        before = self.lab.preferred()
        event = self.run.note("move", f"BGP: {before} -> {pop}")
        self.lab.prefer(pop)
        self.run.policy_moves += 1
        if not self.lab.wait_routed(pop):
            self.log(f"    warning: the router did not switch to {pop} within 10 s")
        self.say(event)

    def add_backend(self, n: int) -> None:
        if self.mode == "naive":
            self.say(self.run.note("add", f"add b{n}: n/a (no backends)"))
            return
        event = self.run.note("add", f"add b{n} (rolling restart)")
        self.backends[n] = ACTIVE
        self.run.backend_changes += 1
        self.say(event)
        self.rolling_restart()

    def rolling_restart(self) -> None:
        """Restart every POP's forwarder with the current backends, the one carrying traffic
        last; a POP is withdrawn from BGP while its forwarder restarts."""
        active = self.lab.pop(self.lab.preferred())
        standby = [p for p in self.lab.pops if p is not active]
        for pop in standby:
            pop.withdraw()
        self.in_parallel(self.restart_serving, standby)
        for pop in standby:
            pop.announce()
        active.withdraw()
        self.lab.wait_routed_away(active.name)
        self.say(self.run.note("withdraw", f"{active.name} withdrawn for restart"))
        self.restart_serving(active)
        active.announce()
        self.lab.wait_routed(active.name)
        self.say(self.run.note("announce", f"{active.name} announced again"))

    def drain_backend(self, n: int) -> None:
        if self.mode == "naive":
            self.say(self.run.note("drain", f"remove b{n}: n/a (no backends)"))
            return
        event = self.run.note("drain", f"remove b{n} (drain, control API)")
        self.backends[n] = DRAINING
        self.run.backend_changes += 1
        params = {"backend": BackendSite.decap_of(n)}
        with ThreadPoolExecutor(len(self.lab.pops)) as pool:
            # The forwarders rebuild their Maglev tables in parallel; errors are raised here.
            list(pool.map(lambda pop: pop.control("drain", params), self.lab.pops))
        self.say(event)

    def crash(self) -> None:
        pop = self.lab.pop(self.lab.preferred())
        what = "server" if self.mode == "naive" else "forwarder"
        event = self.run.note("crash", f"{pop.name}: {what} killed (SIGKILL)")
        self.collect_counters(pop)
        pop.kill_serving()
        self.say(event)
        # The health gate withdraws the POP; traffic moves to another one meanwhile.
        self.lab.wait_routed_away(pop.name)
        self.stop_serving(pop)
        self.start_serving(pop)
        pop.announce()
        self.lab.wait_routed(pop.name)
        self.say(self.run.note("restart", f"{pop.name}: {what} back, announced"))


def check_steps(steps: tuple[str, ...], pops: int, backends: int) -> str | None:
    """What is wrong with a step list for a lab of this size, or None."""
    for step in steps:
        kind, _, arg = step.partition(":")
        if kind == "crash" and not arg:
            continue
        if kind == "move" and arg in {f"pop{k}" for k in range(1, pops + 1)}:
            continue
        if kind in ("add", "drain") and arg.isdigit() and 1 <= int(arg) <= backends:
            if kind == "add" and int(arg) in INITIAL_BACKENDS:
                return f"{step}: b{arg} is configured from the start; add b{backends}"
            continue
        return f"{step!r} is not move:pop1..pop{pops}, add:N, drain:N (1..{backends}) or crash"
    return None


def run_mode(
    lab: Lab, mode: str, opts: ScenarioOptions, monitor: RouteMonitor, log: Log
) -> ModeRun:
    """Set the mode up, run the scenario under traffic, tear the mode down; what happened."""
    log(f"mode {mode}: {MODE_HELP[mode]}")
    run = ModeRun(mode, time.monotonic())
    driver = _ModeDriver(lab, mode, opts, run, log)

    def withdrawn(pop: str) -> None:
        run.note("withdraw", f"{pop} withdrawn (health gate)")

    lab.on_withdraw = withdrawn
    try:
        driver.set_up()
        run.t0 = time.monotonic()
        driver.traffic = traffic = _Traffic(lab, opts)
        ramp_timeout = max(1.0, opts.connections / 200) + 20
        if not traffic.wait_established(opts.connections, ramp_timeout):
            log(f"  warning: only {traffic.progress.get('established', 0)} connections opened")
        driver.say(run.note("start", f"{opts.connections} connections open"))
        time.sleep(opts.warmup)
        for step in opts.steps:
            driver.step(step)
            time.sleep(opts.gap)
        run.t_end = time.monotonic()
        run.flows, run.client_pauses = traffic.finish(timeout=opts.stall * 3 + 10)
        driver.traffic = None
        log(f"  [{mode}] done: {_count(run.flows)}")
    finally:
        if driver.traffic is not None:
            driver.traffic.ns.stop(driver.traffic.proc)
        lab.on_withdraw = None
        driver.tear_down()
        run.routes = monitor.since(run.t0)
    return run


def _count(flows: list[dict[str, Any]]) -> str:
    tcp = [f for f in flows if f["kind"] == "tcp"]
    counts: dict[str, int] = {}
    for f in tcp:
        counts[f["status"]] = counts.get(f["status"], 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
