"""What runs in a POP (BIRD, the forwarder or, in naive mode, a local server) and in a backend.

A POP announces the VIPs over BGP only while it can serve them: `HealthGate` withdraws a POP's
routes as soon as its forwarder (or local server) process is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from deploy.labkit.bird import VIP_PROTOCOLS, Bird, Peer, pop_config
from deploy.labkit.netns import Netns, NetnsError, wait_until
from deploy.labkit.plan import HTTP_PORT, PASSWORD_ENV, REPO, UDP_PORT, VIP4, VIP6

__all__ = [
    "ACTIVE",
    "DRAINING",
    "BackendSite",
    "BackendStates",
    "ForwarderSettings",
    "HealthGate",
    "PopSite",
    "forwarder_config",
]

ACTIVE, DRAINING = "active", "draining"
BackendStates = Mapping[int, str]
"""Backend number → "active" or "draining" (a backend not listed is not configured)."""


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), **(extra or {})}


_SETTINGS_RUNS = itertools.count(1)


@dataclass(frozen=True)
class ForwarderSettings:
    """What differs between the lab's modes for a forwarder."""

    store: str
    """"redis-cluster" (flowstate: shared state) or "memory" (local: per-POP state)."""
    seeds: tuple[str, ...] = ()
    impl: str = "c"
    username: str | None = None
    """The Redis ACL user (None: the default user)."""
    tls: tuple[str, str, str] | None = None
    """(CA, certificate, key) files: TLS to Redis."""
    lookup_deadline_ms: int = 500
    """Production wants a few ms. The lab runs three POPs, five backends, six Redis nodes and
    the clients on a couple of (often shared) cores, where a process can wait for the CPU for a
    few hundred ms; a lookup past its deadline falls back to Maglev, which is wrong exactly for
    the flows whose backend set changed. No Redis node fails in the lab, so a long deadline
    costs nothing here."""
    run: int = field(default_factory=lambda: next(_SETTINGS_RUNS))
    """Which scenario (mode or fault) these settings belong to: each keeps its runtime overrides
    (drains) in its own state file, so a drain does not leak into the next fault or mode, while
    a forwarder restarted within one scenario still finds them."""


def forwarder_config(pop: PopSite, settings: ForwarderSettings, backends: BackendStates) -> str:
    """The TOML config of `pop`'s forwarder for this backend set."""
    text = (
        f'pop = "{pop.name}"\ninterfaces = ["uplink"]\nsource_ipv6 = "{pop.fabric6}"\n'
        f'impl = "{settings.impl}"\n\n[store]\nkind = "{settings.store}"\n'
    )
    if settings.store == "redis-cluster":
        seeds = ", ".join(f'"{s}"' for s in settings.seeds)
        text += (
            f'seeds = [{seeds}]\npassword_env = "{PASSWORD_ENV}"\n'
            f"lookup_deadline_ms = {settings.lookup_deadline_ms}\nwrite_deadline_ms = 500\n"
        )
        if settings.username:
            text += f'username = "{settings.username}"\n'
        if settings.tls:
            ca, cert, key = settings.tls
            text += f'tls = true\ntls_ca_file = "{ca}"\ntls_cert_file = "{cert}"\n'
            text += f'tls_key_file = "{key}"\n'
    text += f'\n[control]\nsocket = "{pop.control_socket}"\nmetrics = ""\n'
    # Runtime overrides (the scenario's drains) per POP and per scenario, not in /var/lib.
    state_dir = f"{pop.workdir}/{pop.name}-state-{settings.run}"
    text += f'state_file = "{state_dir}/backends.json"\n'
    for address, port, proto in (
        (VIP4, HTTP_PORT, "tcp"),
        (VIP6, HTTP_PORT, "tcp"),
        (VIP4, UDP_PORT, "udp"),
        (VIP6, UDP_PORT, "udp"),
    ):
        text += f'\n[[vip]]\naddress = "{address}"\nport = {port}\nprotocol = "{proto}"\n'
        for n, state in sorted(backends.items()):
            text += f'[[vip.backend]]\naddress = "{BackendSite.decap_of(n)}"\nstate = "{state}"\n'
    return text


@dataclass
class BackendSite:
    """Backend n: fabric fd00:3::2n, decapsulates what is sent to fd00:b::n, serves the VIPs."""

    n: int
    ns: Netns
    server: subprocess.Popen[str] | None = None

    @staticmethod
    def decap_of(n: int) -> str:
        return f"fd00:b::{n}"

    @property
    def name(self) -> str:
        return f"b{self.n}"

    @property
    def decap(self) -> str:
        return self.decap_of(self.n)

    @property
    def fabric4(self) -> str:
        return f"10.3.0.{20 + self.n}"

    @property
    def fabric6(self) -> str:
        return f"fd00:3::{20 + self.n}"

    def setup(self, workdir: Path) -> None:
        """deploy/backend-setup: VIPs on lo, decapsulation, rp_filter, MSS 1400."""
        args = ["bash", str(REPO / "deploy" / "backend-setup"), "--vip", VIP4, "--vip", VIP6]
        args += ["--decap-addr", self.decap, "--dev", "fabric", "--mss", "1400"]
        self.ns.run(args, env={"FLOWSTATE_STATE_DIR": str(workdir / "backend-state")})

    def start_server(self, workdir: Path) -> None:
        # Also on the fabric address: health checks connect there (the decap address is a
        # seg6local route, not a socket).
        log = workdir / f"{self.name}-server.log"
        self.server = start_server(self.ns, self.name, log, (self.fabric4,))


def start_server(
    ns: Netns, name: str, log: Path, extra_binds: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """The lab's HTTP + UDP server on both VIPs (and `extra_binds`) in `ns`; returns once it
    listens."""
    args = ["--name", name, "--bind", VIP4, "--bind", VIP6]
    for address in extra_binds:
        args += ["--bind", address]
    args += ["--http-port", str(HTTP_PORT), "--udp-port", str(UDP_PORT)]
    with log.open("a") as stderr:
        proc = ns.popen(_python("deploy.labkit.servers", *args), env=_env(), stderr=stderr.fileno())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        ns.stop(proc)
        raise NetnsError(f"{name}: server did not start: {line!r}")
    return proc


@dataclass
class PopSite:
    """One POP host: BGP speaker, forwarder (or naive local server), two Redis nodes."""

    index: int
    peer: Peer
    ns: Netns
    bird: Bird
    workdir: Path
    forwarder: subprocess.Popen[str] | None = None
    server: subprocess.Popen[str] | None = None
    announced: bool = False
    vips_on_lo: bool = False
    log_path: Path | None = None
    starts: int = 0
    hold_route: bool = False
    """While set, the health gate leaves the POP announced when its forwarder dies (a fault:
    the POP keeps receiving traffic while the forwarder restarts)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.peer.pop

    @property
    def fabric4(self) -> str:
        return f"10.3.0.{10 + self.index}"

    @property
    def fabric6(self) -> str:
        return f"fd00:3::{10 + self.index}"

    def start_bird(self) -> None:
        config = pop_config(
            self.peer.pop4, self.peer, VIP4, VIP6, self.workdir / f"bird-{self.name}.log"
        )
        self.bird.start(config)

    # ---- BGP announcement ----------------------------------------------------------------

    def announce(self) -> None:
        with self.lock:
            if not self.announced:
                self.bird.set_protocols(VIP_PROTOCOLS, True)
                self.announced = True

    def withdraw(self) -> None:
        with self.lock:
            if self.announced:
                self.bird.set_protocols(VIP_PROTOCOLS, False)
                self.announced = False

    def serving(self) -> bool:
        """Whether the process that serves the VIPs here (forwarder or local server) runs."""
        proc = self.forwarder or self.server
        return proc is not None and proc.poll() is None

    # ---- forwarder -----------------------------------------------------------------------

    def start_forwarder(self, config: str, password: str, timeout: float = 30.0) -> float:
        """Start flowstate-forwarder with this config; return seconds until it was ready."""
        started = time.monotonic()
        self.starts += 1
        cfg = self.workdir / f"{self.name}-forwarder.toml"
        cfg.write_text(config)
        self.log_path = self.workdir / f"{self.name}-forwarder-{self.starts}.log"
        with self.log_path.open("w") as log:
            self.forwarder = self.ns.popen(
                _python("forwarder.daemon", "--config", str(cfg), "--log-level", "info"),
                env=_env({PASSWORD_ENV: password}),
                stdout=log.fileno(),
                stderr=log.fileno(),
            )
        if not wait_until(lambda: "store connected" in self.log() or not self.serving(), timeout):
            raise NetnsError(f"{self.name}: forwarder not ready in {timeout:g}s:\n{self.log()}")
        if not self.serving():
            raise NetnsError(f"{self.name}: forwarder exited at start:\n{self.log()}")
        return time.monotonic() - started

    def stop_forwarder(self) -> None:
        if self.forwarder is not None:
            self.ns.stop(self.forwarder)
            self.forwarder = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    @property
    def control_socket(self) -> Path:
        return self.workdir / f"{self.name}-control.sock"

    def control(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """One request to the forwarder's control API (`flowstate.control_client`)."""
        from flowstate.control_client import ControlClient

        async def call() -> Any:
            async with await ControlClient.connect(self.control_socket, timeout=5.0) as client:
                return await client.call(method, params)

        return asyncio.run(call())

    def warm_store(self, attempts: int = 10, pause: float = 0.3) -> bool:
        """Make the forwarder open its connections to every Redis master before it gets traffic.

        The store client dials a master on first use, so the first lookups of a (re)started
        forwarder would pay TCP connect + AUTH inside their deadline. One `flow` request (a
        store lookup) per twelfth of the slot space reaches every master of any cluster of up
        to 12 masters with contiguous slot ranges. True once the store answered them all.
        """
        from flowstate.control_client import ControlClient, ControlError

        async def warm() -> bool:
            async with await ControlClient.connect(self.control_socket, timeout=5.0) as client:
                for params in _slot_spread_flows(12):
                    answer = await client.call("flow", params)
                    if answer.get("store", {}).get("status") not in ("found", "absent"):
                        return False
            return True

        for attempt in range(attempts):
            try:
                if asyncio.run(warm()):
                    return True
            except ControlError:
                pass
            if attempt + 1 < attempts:
                time.sleep(pause)
        return False

    def core_counters(self) -> dict[str, int]:
        """The slow path's and the store client's ("store." + name) counters of every worker,
        summed ({} if the API does not answer)."""
        from flowstate.control_client import ControlError

        try:
            stats = self.control("stats")
        except (ControlError, OSError):
            return {}
        total: dict[str, int] = {}
        for worker in stats.get("workers", []):
            store = worker.get("store", {}).get("counters", {})
            named = [
                *worker.get("core", {}).items(),
                *(("store." + k, v) for k, v in store.items()),
            ]
            for key, value in named:
                if isinstance(value, int):
                    total[key] = total.get(key, 0) + value
        return total

    # ---- naive mode: the POP serves the VIPs itself --------------------------------------

    def start_local_server(self) -> None:
        """Put the VIPs on lo and serve them here (naive anycast: no forwarding layer)."""
        if not self.vips_on_lo:
            self.ns.ip("addr", "add", f"{VIP4}/32", "dev", "lo")
            self.ns.ip("addr", "add", f"{VIP6}/128", "dev", "lo", "nodad")
            self.vips_on_lo = True
        self.respawn_local_server()

    def respawn_local_server(self) -> None:
        log = self.workdir / f"{self.name}-server.log"
        self.server = start_server(self.ns, self.name, log)

    def stop_local_server(self) -> None:
        """Stop the local server and take the VIPs off lo again."""
        if self.server is not None:
            self.ns.stop(self.server)
            self.server = None
        if self.vips_on_lo:
            self.ns.ip("addr", "del", f"{VIP4}/32", "dev", "lo")
            self.ns.ip("addr", "del", f"{VIP6}/128", "dev", "lo")
            self.vips_on_lo = False

    def kill_serving(self) -> None:
        """SIGKILL the forwarder or local server (a crash); the health gate withdraws."""
        for proc in (self.forwarder, self.server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        self.withdraw()
        self.stop_forwarder()
        self.stop_local_server()


def _slot_spread_flows(slices: int) -> list[dict[str, Any]]:
    """`flow` request parameters for made-up 5-tuples whose keys fall in each of `slices`
    equal parts of the Redis Cluster slot space."""
    from flowstate.flow import CLUSTER_SLOTS, FiveTuple, key_slot

    found: dict[int, dict[str, Any]] = {}
    port = 1024
    while len(found) < slices:
        port += 1
        params: dict[str, Any] = {"proto": "tcp", "client_ip": "198.51.100.1"}
        params.update(client_port=port, vip_ip=VIP4, vip_port=HTTP_PORT)
        flow = FiveTuple.make("tcp", "198.51.100.1", port, VIP4, HTTP_PORT)
        found.setdefault(key_slot(flow.key()) * slices // CLUSTER_SLOTS, params)
    return [found[i] for i in sorted(found)]


class PerPop:
    """A daemon thread that calls `each(pop)` for every POP every `interval` s, between
    `with` entry and exit."""

    def __init__(self, pops: list[PopSite], interval: float, name: str) -> None:
        self.pops = pops
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pop in self.pops:
                self.each(pop)

    def each(self, pop: PopSite) -> None:
        raise NotImplementedError


class HealthGate(PerPop):
    """Withdraws a POP's VIP routes within `interval` of its serving process dying.

    Announcing is left to the lab, which does it once a (re)started forwarder is ready.
    """

    def __init__(
        self, pops: list[PopSite], on_withdraw: Callable[[str], None], interval: float = 0.05
    ) -> None:
        super().__init__(pops, interval, "health-gate")
        self.on_withdraw = on_withdraw

    def each(self, pop: PopSite) -> None:
        if pop.announced and not pop.serving() and not pop.hold_route:
            pop.withdraw()
            self.on_withdraw(pop.name)
