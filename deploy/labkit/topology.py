"""The anycast lab's network: clients, an "internet" router, POPs, an IPv6 fabric, backends.

```
                               ┌─ pop1 ─┐   BIRD (eBGP to rt), forwarder, 2 Redis nodes
 client ── rt (BIRD: eBGP) ────┼─ pop2 ─┼── fab (bridge) ── b1 .. b5 (decap, servers)
 (/24 + /64 of clients)  │     └─ pop3 ─┘        │
                         └───────────────────────┘  rt's fabric leg: the backends' replies
```
Clients reach the VIPs through rt, which routes them to the POP whose BGP route it prefers.
A POP's forwarder tunnels each packet over the fabric to a backend; backends answer the clients
directly through rt (DSR). `Lab.build` makes all of it; `Lab.close` removes all of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deploy.labkit.bird import Bird, Peer, router_config
from deploy.labkit.netns import Netns, NetnsError, Topology, wait_until
from deploy.labkit.plan import (
    CLIENT4_FIRST,
    REDIS_BASE_PORT,
    REPO,
    ROUTER_FABRIC4,
    ROUTER_FABRIC6,
    VIP4,
    VIP6,
)
from deploy.labkit.pops import BackendSite, HealthGate, PopSite
from deploy.redis_cluster_lib import TlsFiles, make_certs

__all__ = ["Lab", "LabSize"]

BASE_PREF = 100
"""Local-pref of the least preferred POP; every POP has its own, the highest carries the VIPs."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class LabSize:
    pops: int = 3
    backends: int = 5
    """Backends with a namespace; the scenario starts with all but the last configured."""
    clients4: int = 200
    """IPv4 client addresses (from 10.1.0.10)."""
    clients6: int = 64
    """IPv6 client addresses (from fd00:1::1:0)."""
    redis_nodes: int = 6
    redis_tls: bool = False
    """TLS to and between the Redis nodes (a throw-away CA made with openssl)."""


def _peer(k: int) -> Peer:
    return Peer(f"pop{k}", f"10.2.{k}.1", f"10.2.{k}.2", f"fd00:2:{k}::1", f"fd00:2:{k}::2")


@dataclass
class Lab:
    """Handles to every namespace and daemon of the lab."""

    topo: Topology
    workdir: Path
    log: Log
    size: LabSize
    client: Netns
    router: Netns
    fabric: Netns
    router_bird: Bird
    pops: list[PopSite] = field(default_factory=list)
    backends: dict[int, BackendSite] = field(default_factory=dict)
    redis_password: str = ""
    """The default (admin) user's: the lab's own Redis commands."""
    redis_user: str = "flowstate"
    """The ACL user the forwarders log in as (its commands on fs1:* keys only)."""
    redis_user_password: str = ""
    redis_tls: TlsFiles | None = None
    prefs: dict[str, int] = field(default_factory=dict)
    on_withdraw: Callable[[str], None] | None = None
    """Called (from the health gate's thread) when a POP is withdrawn for a dead process."""
    _closed: bool = False

    # ---- building ------------------------------------------------------------------------

    @classmethod
    def build(cls, size: LabSize, *, workdir: Path | None = None, log: Log = print) -> Lab:
        """Make the whole lab; on any failure tear down what was made and re-raise."""
        wd = workdir or Path(tempfile.mkdtemp(prefix="flowstate-lab-"))
        wd.mkdir(parents=True, exist_ok=True)
        topo = Topology(tag="lab")
        lab: Lab | None = None
        try:
            client, router, fabric = (topo.add_netns(r) for r in ("client", "rt", "fab"))
            lab = cls(topo, wd, log, size, client, router, fabric, Bird(router, wd, "rt"))
            lab._build()
            return lab
        except BaseException:
            if lab is not None:
                lab.close()
            else:
                topo.close()
                shutil.rmtree(wd, ignore_errors=True)
            raise

    def _build(self) -> None:
        started = time.monotonic()
        self.redis_password = os.urandom(12).hex()
        self.redis_user_password = os.urandom(12).hex()
        self._build_links()
        if self.size.redis_tls:
            hosts = sorted({p.fabric4 for p in self.pops})
            self.redis_tls = make_certs(self.workdir / "certs", hosts)
        self.topo.settle()
        for backend in self.backends.values():
            backend.setup(self.workdir)
        self.log(f"namespaces and links up ({time.monotonic() - started:.1f}s)")
        self._start_bgp()
        self.log(f"BGP sessions established ({time.monotonic() - started:.1f}s)")
        self._start_redis()
        self.log(f"Redis Cluster healthy ({time.monotonic() - started:.1f}s)")
        for backend in self.backends.values():
            backend.start_server(self.workdir)
        self.log(f"lab ready in {time.monotonic() - started:.1f}s")

    def _build_links(self) -> None:
        size, rt = self.size, self.router
        rt.enable_forwarding()
        for key in ("all", "default"):
            rt.set_sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
        self.topo.veth(
            self.client,
            "c-rt",
            rt,
            "rt-c",
            a_addrs=["10.1.0.2/24", "fd00:1::2/64"],
            b_addrs=["10.1.0.1/24", "fd00:1::1/64"],
        )
        first4 = int(CLIENT4_FIRST.rsplit(".", 1)[1])
        if first4 + size.clients4 > 255:
            raise ValueError(f"at most {255 - first4} IPv4 client addresses")
        batch = "".join(
            f"addr add 10.1.0.{first4 + i}/24 dev c-rt\n" for i in range(size.clients4)
        ) + "".join(f"addr add fd00:1::1:{i:x}/64 dev c-rt nodad\n" for i in range(size.clients6))
        self.client.run(["ip", "-batch", "-"], input=batch)
        self.client.add_route("default", "10.1.0.1")
        self.client.add_route("default", "fd00:1::1")
        # The fabric: one bridge all POPs, backends and the router's fabric leg hang on.
        self.fabric.ip("link", "add", "br0", "type", "bridge")
        self.fabric.ip("link", "set", "br0", "up")
        self._fabric_leg(rt, "rt-fab", [f"{ROUTER_FABRIC4}/24", f"{ROUTER_FABRIC6}/64"])
        for k in range(1, size.pops + 1):
            self._add_pop(k)
        for n in range(1, size.backends + 1):
            ns = self.topo.add_netns(f"b{n}")
            site = BackendSite(n, ns)
            self._fabric_leg(ns, "fabric", [f"{site.fabric4}/24", f"{site.fabric6}/64"])
            ns.add_route("default", ROUTER_FABRIC4)
            ns.add_route("default", ROUTER_FABRIC6)
            self.backends[n] = site
            for pop in self.pops:
                pop.ns.add_route(f"{site.decap}/128", site.fabric6)

    def _fabric_leg(self, ns: Netns, dev: str, addrs: list[str]) -> None:
        peer = f"f-{ns.role}"[:15]
        self.topo.veth(ns, dev, self.fabric, peer, a_addrs=addrs)
        self.fabric.ip("link", "set", peer, "master", "br0")
        ns.disable_offloads(dev, ("gro", "lro", "tso", "gso"))

    def _add_pop(self, k: int) -> None:
        peer = _peer(k)
        ns = self.topo.add_netns(peer.pop)
        self.topo.veth(
            ns,
            "uplink",
            self.router,
            f"rt-{peer.pop}",
            a_addrs=[f"{peer.pop4}/24", f"{peer.pop6}/64"],
            b_addrs=[f"{peer.router4}/24", f"{peer.router6}/64"],
        )
        site = PopSite(k, peer, ns, Bird(ns, self.workdir, peer.pop), self.workdir)
        self._fabric_leg(ns, "fabric", [f"{site.fabric4}/24", f"{site.fabric6}/64"])
        # Upstream is the router; the POP must not answer or forward the VIPs itself (the
        # forwarder takes them off the wire), so the kernel blackholes them.
        ns.add_route("default", peer.router4)
        ns.add_route("default", peer.router6)
        ns.ip("route", "add", "blackhole", f"{VIP4}/32")
        ns.ip("-6", "route", "add", "blackhole", f"{VIP6}/128")
        self.pops.append(site)

    def _start_bgp(self) -> None:
        self.prefs = self._initial_prefs()
        self.router_bird.start(self._router_config())
        for pop in self.pops:
            pop.start_bird()
        sessions = [f"{p.name}_{f}" for p in self.pops for f in ("4", "6")]
        self.router_bird.wait_established(sessions)
        for pop in self.pops:
            pop.bird.wait_established(["up_4", "up_6"])

    def _router_config(self) -> str:
        return router_config(
            "10.0.0.1",
            [p.peer for p in self.pops],
            self.prefs,
            self.workdir / "bird-rt.log",
        )

    # ---- Redis Cluster -------------------------------------------------------------------

    @property
    def redis_seeds(self) -> list[str]:
        hosts = [p.fabric4 for p in self.pops]
        return [f"{hosts[i % len(hosts)]}:{REDIS_BASE_PORT + i}" for i in range(6)]

    def _redis(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_REDIS_")}
        env["FLOWSTATE_REDIS_PASSWORD"] = self.redis_password
        env["FLOWSTATE_REDIS_USER_PASSWORD"] = self.redis_user_password
        cmd = [sys.executable, str(REPO / "deploy" / "redis-cluster"), args[0]]
        cmd += ["--base-port", str(REDIS_BASE_PORT), "--dir", str(self.workdir / "redis")]
        result = subprocess.run(
            [*cmd, *args[1:]], capture_output=True, text=True, env=env, timeout=timeout
        )
        if result.returncode != 0:
            raise NetnsError(f"deploy/redis-cluster {args[0]}: {result.stdout}{result.stderr}")
        return result

    def _start_redis(self) -> None:
        # Two nodes per POP (node i in POP i % 3), as a real deployment spreads them;
        # redis-cli puts each master's replica in another POP.
        self._redis(
            "up",
            "--nodes",
            str(self.size.redis_nodes),
            "--netns",
            ",".join(p.ns.name for p in self.pops),
            "--host",
            ",".join(p.fabric4 for p in self.pops),
            "--node-timeout",
            "2000",
            "--timeout",
            "90",
            "--user",
            self.redis_user,
            *self._tls_args(),
        )

    def _tls_args(self) -> list[str]:
        tls = self.redis_tls
        if tls is None:
            return []
        return [
            *("--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)),
            *("--tls-ca-cert-file", str(tls.ca)),
        ]

    def redis_cli(self, *args: str) -> str:
        """`redis-cli --cluster call` ARGS on every node (from POP 1); the replies as text."""
        env = {"REDISCLI_AUTH": self.redis_password}
        out = self.pops[0].ns.run(
            [
                "redis-cli",
                *(self.redis_tls.cli_args() if self.redis_tls else []),
                *("--cluster", "call", self.redis_seeds[0], *args),
            ],
            env=env,
            check=False,
        )
        return out.stdout

    # ---- routing -------------------------------------------------------------------------

    def _initial_prefs(self) -> dict[str, int]:
        # pop1 first, then pop2, ...: distinct local-prefs, so the router never sees a tie.
        return {p.name: BASE_PREF + len(self.pops) - p.index for p in self.pops}

    def reset_routing(self) -> None:
        """Back to the initial preference order (pop1, pop2, ...)."""
        self.prefs = self._initial_prefs()
        self.router_bird.configure(self._router_config())

    def prefer(self, pop: str) -> None:
        """Make the router prefer `pop` for the VIPs: a new BGP policy, loaded by BIRD.

        Only `pop`'s import filter changes (its local-pref becomes the highest), so BIRD
        re-evaluates only its routes and the FIB changes once, straight to `pop`. The POP that
        carried the VIPs before stays second: it takes over if `pop` withdraws.
        """
        if self.preferred() != pop:
            self.prefs[pop] = max(self.prefs.values()) + 1
            self.router_bird.configure(self._router_config())

    def preferred(self) -> str:
        return max(self.prefs, key=lambda name: self.prefs[name])

    def routed_pop(self) -> str | None:
        """The POP the router's kernel sends the IPv4 VIP to now (None: no route)."""
        out = self.router.ip("-4", "route", "show", f"{VIP4}/32")
        for word in out.split():
            if word.startswith("rt-pop"):
                return word.removeprefix("rt-")
        return None

    def wait_routed(self, pop: str | None, timeout: float = 10.0) -> bool:
        return wait_until(lambda: self.routed_pop() == pop, timeout, 0.02)

    def wait_routed_away(self, pop: str, timeout: float = 10.0) -> bool:
        """Wait until the router sends the VIPs to another POP than `pop`."""
        return wait_until(lambda: self.routed_pop() not in (pop, None), timeout, 0.02)

    def health_gate(self) -> HealthGate:
        """A running `HealthGate` over the POPs (a context manager) reporting to on_withdraw."""

        def withdrawn(pop: str) -> None:
            if self.on_withdraw is not None:
                self.on_withdraw(pop)

        return HealthGate(self.pops, withdrawn)

    def pop(self, name: str) -> PopSite:
        for p in self.pops:
            if p.name == name:
                return p
        raise KeyError(name)

    # ---- teardown ------------------------------------------------------------------------

    def close(self, *, keep_workdir: bool = False) -> None:
        """Stop every process and delete every namespace; each step runs even if one fails."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for pop in self.pops:
            with contextlib.suppress(Exception):
                pop.stop_all()
        if (self.workdir / "redis").exists():
            try:
                self._redis("down", timeout=60)
            except Exception as exc:
                errors.append(exc)
        try:
            self.topo.close()
        except Exception as exc:
            errors.append(exc)
        if not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise NetnsError(f"lab tear-down: {errors}")
