"""A one-POP topology for end-to-end forwarding tests, built from real namespaces.

```
 client ── rt ── fwd (flowstate-forwarder: receives on f-rt, tunnels out of f-fab)
            │       │
            └─ br0 (fabric, in rt) ─┬─ b1, b2, b3[, b4]  (backend-setup, servers on the VIPs)
                                    └─ rds               (6-node Redis Cluster)
```
Backends reply straight to the client through rt (direct server return).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tests.netns import Netns, Topology, wait_until

REPO = Path(__file__).resolve().parents[2]
VIP4, VIP6 = "192.0.2.10", "2001:db8:f::10"
CLIENT4, CLIENT6 = "10.1.0.2", "fd00:1::2"
SOURCE6 = "fd00:3::10"
REDIS_HOST, REDIS_PORT, REDIS_PASSWORD = "10.3.0.100", 7700, "e2e-secret"
WEIGHTS = {1: 100, 2: 100, 3: 200, 4: 100}


def decap_addr(n: int) -> str:
    return f"fd00:b::{n}"


def failures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The client results (tests/e2e/tools.py) that ended in an error."""
    return [r for r in results if r["error"] is not None]


@dataclass
class Pop:
    """Handles to the namespaces and processes of the topology."""

    topo: Topology
    client: Netns
    rt: Netns
    fwd: Netns
    rds: Netns
    backends: dict[int, Netns] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fs-e2e-")))
    forwarder: subprocess.Popen[str] | None = None
    log_path: Path | None = None

    # ---- building -------------------------------------------------------------------------

    @classmethod
    def build(cls, topo: Topology, backends: int = 3) -> Self:
        client, rt, fwd, rds = (topo.add_netns(r) for r in ("client", "rt", "fwd", "rds"))
        pop = cls(topo, client, rt, fwd, rds)
        topo.veth(
            client,
            "c-rt",
            rt,
            "rt-c",
            a_addrs=[f"{CLIENT4}/24", f"{CLIENT6}/64"],
            b_addrs=["10.1.0.1/24", "fd00:1::1/64"],
        )
        topo.veth(
            fwd,
            "f-rt",
            rt,
            "rt-f",
            a_addrs=["10.2.0.2/24", "fd00:2::2/64"],
            b_addrs=["10.2.0.1/24", "fd00:2::1/64"],
        )
        rt.ip("link", "add", "br0", "type", "bridge")
        rt.ip("link", "set", "br0", "up")
        rt.add_address("br0", "10.3.0.1/24")
        rt.add_address("br0", "fd00:3::1/64")
        rt.enable_forwarding()
        client.add_route("default", "10.1.0.1")
        client.add_route("default", "fd00:1::1")
        # The router hands the VIPs to the forwarder (BGP does this in the lab).
        rt.add_route(f"{VIP4}/32", "10.2.0.2")
        rt.add_route(f"{VIP6}/128", "fd00:2::2")
        pop._fabric(fwd, "f-fab", ["10.3.0.10/24", f"{SOURCE6}/64"])
        # The forwarder host must not answer the VIPs itself (it does not own them).
        fwd.ip("route", "add", "blackhole", f"{VIP4}/32")
        fwd.ip("-6", "route", "add", "blackhole", f"{VIP6}/128")
        fwd.add_route("default", "10.3.0.1")
        fwd.add_route("default", "fd00:3::1")
        pop._fabric(rds, "r-fab", [f"{REDIS_HOST}/24"])
        for n in range(1, backends + 1):
            pop.add_backend(n)
        topo.settle()
        pop._start_redis()
        return pop

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        tag: str,
        impl: str,
        backends: int,
        serving: list[int],
        prepare: Callable[[Self], None] | None = None,
    ) -> Iterator[Self]:
        """A POP of backends 1..`backends` in a new topology, `prepare`d, its forwarder
        started with `serving`; for a module fixture. Everything is torn down after the block,
        also when building or starting fails."""
        topo = Topology(tag=tag)
        built: Self | None = None
        try:
            built = cls.build(topo, backends=backends)
            if prepare is not None:
                prepare(built)
            built.start_forwarder(impl, backends=serving)
            yield built
        finally:
            if built is not None:
                built.close()
            else:
                topo.close()

    def _fabric(self, ns: Netns, dev: str, addrs: list[str]) -> None:
        peer = f"br-{ns.role}"[:15]
        self.topo.veth(ns, dev, self.rt, peer, a_addrs=addrs)
        self.rt.ip("link", "set", peer, "master", "br0")
        ns.disable_offloads(dev, ("gro", "lro", "tso", "gso"))

    def add_backend(self, n: int) -> Netns:
        """Backend n: fabric address fd00:3::2n, decap address fd00:b::n, servers on the VIPs
        (and on the fabric address, for health checks: the decap address is only a route)."""
        ns = self.topo.add_netns(f"b{n}")
        dev = f"b{n}-fab"
        self._fabric(ns, dev, [f"10.3.0.{20 + n}/24", f"fd00:3::{20 + n}/64"])
        ns.add_route("default", "10.3.0.1")
        ns.add_route("default", "fd00:3::1")
        setup = REPO / "deploy" / "backend-setup"
        ns.run(
            [
                "bash",
                str(setup),
                "--vip",
                VIP4,
                "--vip",
                VIP6,
                "--decap-addr",
                decap_addr(n),
                "--dev",
                dev,
                "--mss",
                "1400",
            ]
        )
        self.fwd.add_route(f"{decap_addr(n)}/128", f"fd00:3::{20 + n}")
        py = [sys.executable, "-m", "tests.e2e.tools"]
        env = {"PYTHONPATH": str(REPO)}
        binds = ["--bind", VIP4, "--bind", VIP6, "--bind", f"fd00:3::{20 + n}"]
        for kind, port in (("serve-http", 80), ("serve-udp", 53)):
            proc = ns.popen([*py, kind, "--name", f"b{n}", *binds, "--port", str(port)], env=env)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", f"b{n} {kind} did not start: {line!r}"
        self.backends[n] = ns
        return ns

    def _start_redis(self) -> None:
        self._redis(
            [
                "up",
                "--netns",
                self.rds.name,
                "--host",
                REDIS_HOST,
                "--password",
                REDIS_PASSWORD,
                "--node-timeout",
                "2000",
            ]
        )

    def _redis(self, args: list[str]) -> None:
        cmd = [
            sys.executable,
            str(REPO / "deploy" / "redis-cluster"),
            args[0],
            "--base-port",
            str(REDIS_PORT),
            "--dir",
            str(self.workdir / "redis"),
            *args[1:],
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    # ---- forwarder ------------------------------------------------------------------------

    def config_text(self, impl: str, backends: list[int]) -> str:
        def vip(address: str, port: int, proto: str) -> str:
            text = f'[[vip]]\naddress = "{address}"\nport = {port}\nprotocol = "{proto}"\n'
            text += "maglev_size = 65537\n"
            for n in backends:
                text += f'[[vip.backend]]\naddress = "{decap_addr(n)}"\nweight = {WEIGHTS[n]}\n'
            return text

        seeds = ", ".join(f'"{REDIS_HOST}:{REDIS_PORT + i}"' for i in range(6))
        return (
            f'pop = "pop1"\ninterfaces = ["f-rt"]\nsource_ipv6 = "{SOURCE6}"\nimpl = "{impl}"\n'
            f'[store]\nkind = "redis-cluster"\nseeds = [{seeds}]\n'
            f'password_env = "FLOWSTATE_E2E_REDIS_PASSWORD"\nlookup_deadline_ms = 20\n'
            f"write_deadline_ms = 200\n"
            f'[control]\nsocket = "{self.workdir}/ctl.sock"\nmetrics = ""\n'
            f'state_file = "{self.workdir}/state/backends.json"\n'
            + vip(VIP4, 80, "tcp")
            + vip(VIP6, 80, "tcp")
            + vip(VIP4, 53, "udp")
            + vip(VIP6, 53, "udp")
        )

    def start_forwarder(self, impl: str, backends: list[int] | None = None) -> None:
        """Start flowstate-forwarder in fwd and wait until it forwards."""
        cfg = self.workdir / "forwarder.toml"
        cfg.write_text(self.config_text(impl, backends or sorted(self.backends)))
        self.log_path = self.workdir / f"forwarder-{time.monotonic_ns()}.log"
        log = self.log_path.open("w")
        env = {"FLOWSTATE_E2E_REDIS_PASSWORD": REDIS_PASSWORD, "PYTHONPATH": str(REPO)}
        self.forwarder = self.fwd.popen(
            [
                sys.executable,
                "-m",
                "forwarder.daemon",
                "--config",
                str(cfg),
                "--log-level",
                "debug",
            ],
            env=env,
            stdout=log.fileno(),
            stderr=log.fileno(),
        )
        log.close()
        ok = wait_until(lambda: "store connected" in self.log() or self.forwarder_died(), 20)
        assert ok and not self.forwarder_died(), f"forwarder did not start:\n{self.log()}"

    def reload_forwarder(self, impl: str, backends: list[int], text: str | None = None) -> str:
        """Rewrite the config file (with `backends`, or as `text`), send the running forwarder
        SIGHUP and wait for its verdict; returns the log lines the reload wrote."""
        assert self.forwarder is not None and not self.forwarder_died()
        before = len(self.log())
        config = text if text is not None else self.config_text(impl, backends)
        (self.workdir / "forwarder.toml").write_text(config)
        os.kill(self.forwarder.pid, signal.SIGHUP)  # `ip netns exec` execs: it is the daemon

        def answered() -> bool:
            new = self.log()[before:]
            return " applied (" in new or "still running the previous config" in new

        ok = wait_until(lambda: answered() or self.forwarder_died(), 30)
        assert ok and not self.forwarder_died(), f"no reload:\n{self.log()[-3000:]}"
        return "\n".join(line for line in self.log()[before:].splitlines() if "reload: " in line)

    def forwarder_died(self) -> bool:
        return self.forwarder is None or self.forwarder.poll() is not None

    def stop_forwarder(self) -> None:
        if self.forwarder is not None:
            self.fwd.stop(self.forwarder)
            self.forwarder = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def cli(self, *args: str, socket: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`flowstate ARGS --socket <this POP's control socket>` in the forwarder's namespace
        (as root)."""
        control = self.workdir / "ctl.sock" if socket is None else socket
        return self.fwd.run(
            [sys.executable, "-m", "flowstate.cli", *args, "--socket", str(control)],
            env={"PYTHONPATH": str(REPO)},
            check=False,
            timeout=90,
        )

    # ---- traffic --------------------------------------------------------------------------

    def tool(self, *args: str, timeout: float = 60) -> Any:
        env = {"PYTHONPATH": str(REPO)}
        out = self.client.run(
            [sys.executable, "-m", "tests.e2e.tools", *args], env=env, timeout=timeout
        )
        return json.loads(out.stdout)

    def tool_popen(self, *args: str) -> subprocess.Popen[str]:
        env = {"PYTHONPATH": str(REPO)}
        return self.client.popen([sys.executable, "-m", "tests.e2e.tools", *args], env=env)

    def records(self, flows: list[list[Any]]) -> list[str | None]:
        """Backend of each flow's record in the Redis Cluster (asked from inside the fabric)."""
        seeds = ",".join(f"{REDIS_HOST}:{REDIS_PORT + i}" for i in range(6))
        env = {"PYTHONPATH": str(REPO)}
        out = self.rt.run(
            [
                sys.executable,
                "-m",
                "tests.e2e.tools",
                "records",
                "--seeds",
                seeds,
                "--password",
                REDIS_PASSWORD,
                "--flows",
                json.dumps(flows),
            ],
            env=env,
        )
        result: list[str | None] = json.loads(out.stdout)
        return result

    def close(self) -> None:
        self.stop_forwarder()
        with contextlib.suppress(subprocess.CalledProcessError):
            self._redis(["down"])
        self.topo.close()
        if not os.environ.get("FLOWSTATE_KEEP_E2E_LOGS"):
            subprocess.run(["rm", "-rf", str(self.workdir)], check=False)
