"""End to end: the forwarder announces its VIPs through a real BIRD 2 only while it can forward.

```
 rt (BIRD "router", AS 65000) ── eBGP v4 + v6 ── pop (BIRD, AS 65100; flowstate-forwarder)
```
The POP's BIRD holds the VIP routes in static protocols `vip4`/`vip6` (disabled at start); the
forwarder's supervisor enables them once its worker is healthy and disables them when the worker
dies, on `flowstate drain-pop` and on SIGTERM. The router's `birdc show route` is the judge.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deploy.labkit.bird import Bird, Peer, bird_missing, pop_config, router_config
from forwarder.fastpath import c_engine_available
from tests.e2e.conftest import require_netns
from tests.netns import Netns, Topology, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VIP4, VIP6 = "192.0.2.10", "2001:db8:f::10"
PEER = Peer(pop="pop1", router4="10.2.0.1", pop4="10.2.0.2", router6="fd00:2::1", pop6="fd00:2::2")
#: The brief's bar: a dead worker's VIPs leave the router within about a second (ExaBGP's
#: default needs 3 failed checks at 1 s). Measured from the SIGKILL to the router's table.
WITHDRAW_WITHIN_S = 1.5
#: Where the router accepts the forwarder's health-check connections (test with health checks).
CHECK_PORT = 8080
LISTENER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""


@dataclass
class Lab:
    topo: Topology
    rt: Netns
    pop: Netns
    router: Bird
    speaker: Bird
    workdir: Path
    forwarder: subprocess.Popen[str] | None = None
    logs: list[Path] = field(default_factory=list)
    health: bool = False
    workers: int = 1
    """Check the backend with TCP connects to CHECK_PORT on the router (see `check_server`)."""

    @property
    def control(self) -> Path:
        return self.workdir / "ctl.sock"

    def config_text(self) -> str:
        impl = "c" if c_engine_available() else "python"
        check, health = "", ""
        if self.health:
            check = f'check_address = "{PEER.router4}"\n'
            health = (
                f'[health]\nkind = "tcp"\nport = {CHECK_PORT}\ninterval_ms = 200\n'
                "timeout_ms = 100\nrise = 1\nfall = 2\n"
            )
        return (
            f'pop = "pop1"\ninterfaces = ["f-rt"]\nsource_ipv6 = "{PEER.pop6}"\nimpl = "{impl}"\n'
            f"workers = {self.workers}\n"
            f'[store]\nkind = "memory"\n'
            f'[control]\nsocket = "{self.control}"\nmetrics = ""\n'
            f'[bgp]\nkind = "bird"\nsocket = "{self.speaker.socket}"\n'
            f'protocols = ["vip4", "vip6"]\ndrain_file = "{self.workdir}/drained"\n'
            f'[[vip]]\naddress = "{VIP4}"\nport = 80\nprotocol = "tcp"\n'
            f'[[vip.backend]]\naddress = "fd00:b::1"\n{check}'
            f'[[vip]]\naddress = "{VIP6}"\nport = 80\nprotocol = "tcp"\n'
            f'[[vip.backend]]\naddress = "fd00:b::1"\n{check}' + health
        )

    def start_forwarder(self) -> None:
        cfg = self.workdir / "forwarder.toml"
        cfg.write_text(self.config_text())
        log = self.workdir / f"forwarder-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("w") as out:
            self.forwarder = self.pop.popen(
                [sys.executable, "-m", "forwarder.daemon", "--config", str(cfg)],
                env={"PYTHONPATH": str(REPO)},
                stdout=out.fileno(),
                stderr=out.fileno(),
            )

    def stop_forwarder(self) -> None:
        if self.forwarder is not None:
            self.pop.stop(self.forwarder)
            self.forwarder = None

    def log(self) -> str:
        return self.logs[-1].read_text() if self.logs else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowstate.cli", *args, "--socket", str(self.control)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=30,
        )

    def status(self) -> dict[str, Any]:
        out = self.cli("bgp", "--json")
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def routes(self) -> set[str]:
        """The VIP prefixes in the router's BIRD table."""
        out = self.router.birdc("show route", check=False).stdout
        return {p for p in (f"{VIP4}/32", f"{VIP6}/128") if p in out}

    def announced(self) -> bool:
        return self.routes() == {f"{VIP4}/32", f"{VIP6}/128"}

    def withdrawn(self) -> bool:
        return not self.routes()

    def ensure_announced(self) -> None:
        if self.forwarder is None or self.forwarder.poll() is not None:
            self.start_forwarder()
        ok = wait_until(self.announced, 60, 0.1)
        assert ok, f"VIPs not announced: {self.routes()}\n{self.log()}"


LabT = TypeVar("LabT", bound=Lab)


@contextlib.contextmanager
def built_lab(
    tag: str, make: Callable[[Topology, Netns, Netns, Bird, Bird, Path], LabT]
) -> Iterator[LabT]:
    """The one-POP lab (router and POP namespaces, both BIRDs up, the POP's VIP protocols
    disabled) made by `make`; torn down on exit, also on failure."""
    require_netns()
    missing = bird_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    workdir = Path(tempfile.mkdtemp(prefix=f"fs-{tag}-"))
    workdir.chmod(0o711)  # a worker running as a configured user reaches its config file
    topo = Topology(tag=tag)
    built: LabT | None = None
    try:
        rt, pop = topo.add_netns("rt"), topo.add_netns("pop")
        topo.veth(
            pop,
            "f-rt",
            rt,
            "rt-f",
            a_addrs=[f"{PEER.pop4}/24", f"{PEER.pop6}/64"],
            b_addrs=[f"{PEER.router4}/24", f"{PEER.router6}/64"],
        )
        pop.add_route("fd00:b::/64", PEER.router6)  # the backend's next hop resolves
        topo.settle()
        router, speaker = Bird(rt, workdir, "rt"), Bird(pop, workdir, "pop1")
        built = make(topo, rt, pop, router, speaker, workdir)
        router.start(router_config(PEER.router4, [PEER], {}, workdir / "bird-rt.log"))
        speaker.start(pop_config(PEER.pop4, PEER, VIP4, VIP6, workdir / "bird-pop1.log"))
        router.wait_established(["pop1_4", "pop1_6"])
        assert built.withdrawn(), "the POP's VIP protocols must start disabled"
        yield built
    finally:
        # Tear-down also on failure: the forwarder, both BIRDs, every namespace.
        if built is not None:
            built.stop_forwarder()
            built.speaker.stop()
            built.router.stop()
        topo.close()
        if not os.environ.get("FLOWSTATE_KEEP_E2E_LOGS"):
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab("bgp", Lab) as built:
        yield built


def test_vips_announced_once_the_forwarder_is_healthy(lab: Lab) -> None:
    lab.ensure_announced()
    status = lab.status()
    assert status["announced"] is True and status["healthy"] is True
    assert [w["state"] for w in status["workers"]] == ["running"]
    assert "BGP: announced the VIPs (vip4, vip6): healthy for" in lab.log()
    # The control API's stats carry the same state (worker 0 asks the supervisor).
    stats = lab.cli("stats", "--json", "--interval", "0.1")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["stats"]["bgp"]["announced"] is True


def test_worker_sigkill_withdraws_within_a_second_and_restart_reannounces(lab: Lab) -> None:
    lab.ensure_announced()
    (worker,) = lab.status()["workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    killed = time.monotonic()
    assert wait_until(lab.withdrawn, WITHDRAW_WITHIN_S, 0.02), (
        f"still announced {time.monotonic() - killed:.2f} s after the SIGKILL\n{lab.log()}"
    )
    print(f"withdrawn at the router {time.monotonic() - killed:.3f} s after the SIGKILL")
    assert "BGP: withdrew the VIPs (vip4, vip6): worker 0 " in lab.log()
    # The supervisor restarts the worker; once it is healthy the VIPs come back.
    assert wait_until(lab.announced, 60, 0.1), f"not re-announced\n{lab.log()}"
    (restarted,) = lab.status()["workers"]
    assert restarted["pid"] != worker["pid"]
    assert lab.forwarder is not None and lab.forwarder.poll() is None


def test_drain_pop_withdraws_and_undrain_pop_reannounces(lab: Lab) -> None:
    lab.ensure_announced()
    out = lab.cli("drain-pop")
    assert out.returncode == 0, out.stderr
    assert "WITHDRAWN" in out.stdout and "drained: yes" in out.stdout
    assert wait_until(lab.withdrawn, 5, 0.05)
    assert (lab.workdir / "drained").exists()
    time.sleep(1.5)  # longer than the announce delay: a drained, healthy POP stays withdrawn
    assert lab.withdrawn() and lab.status()["drained"] is True
    out = lab.cli("undrain-pop", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["announced"] is True
    assert wait_until(lab.announced, 5, 0.05)
    assert not (lab.workdir / "drained").exists()


def test_sigterm_withdraws_before_the_forwarder_exits(lab: Lab) -> None:
    lab.ensure_announced()
    assert lab.forwarder is not None
    os.kill(lab.forwarder.pid, signal.SIGTERM)  # the supervisor only, as systemd's stop starts
    assert lab.forwarder.wait(30) == 0
    assert lab.withdrawn()
    assert "BGP: withdrew the VIPs (vip4, vip6): forwarder stopping (SIGTERM)" in lab.log()
    lab.forwarder = None


def test_supervisor_sigkill_leaves_the_vips_to_exec_stop_post(lab: Lab) -> None:
    """The gap the systemd unit closes: nothing withdraws for a SIGKILLed supervisor, so its
    ExecStopPost runs `flowstate-forwarder --withdraw`."""
    lab.ensure_announced()
    assert lab.forwarder is not None
    os.killpg(lab.forwarder.pid, signal.SIGKILL)  # supervisor and worker at once (OOM, kill -9)
    lab.forwarder.wait(10)
    lab.forwarder = None
    time.sleep(0.5)
    assert lab.announced()
    cfg = lab.workdir / "forwarder.toml"
    out = lab.pop.run(
        [sys.executable, "-m", "forwarder.daemon", "--withdraw", "--config", str(cfg)],
        env={"PYTHONPATH": str(REPO)},
    )
    assert "VIPs withdrawn" in out.stdout
    assert wait_until(lab.withdrawn, 5, 0.05)


def test_stalled_worker_withdraws_and_recovers(lab: Lab) -> None:
    """A worker whose event loop stops turning (SIGSTOP) counts as failed after the stall
    timeout (1 s); it is not restarted, and the VIPs return when its heartbeats do."""
    lab.ensure_announced()
    (worker,) = lab.status()["workers"]
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        assert wait_until(lab.withdrawn, 10, 0.05), lab.log()
        assert "BGP: withdrew the VIPs (vip4, vip6): worker 0 stalled" in lab.log()
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
    assert wait_until(lab.announced, 30, 0.1), lab.log()
    assert lab.status()["workers"][0]["pid"] == worker["pid"]


def test_any_dead_worker_of_several_withdraws(lab: Lab) -> None:
    lab.stop_forwarder()
    lab.workers = 2
    try:
        lab.ensure_announced()
        workers = lab.status()["workers"]
        assert [w["state"] for w in workers] == ["running", "running"]
        os.kill(workers[1]["pid"], signal.SIGKILL)  # not the one serving the control API
        assert wait_until(lab.withdrawn, WITHDRAW_WITHIN_S, 0.02), lab.log()
        assert "BGP: withdrew the VIPs (vip4, vip6): worker 1 " in lab.log()
        assert wait_until(lab.announced, 60, 0.1), lab.log()
        assert lab.status()["workers"][0]["pid"] == workers[0]["pid"]
    finally:
        lab.stop_forwarder()
        lab.workers = 1


def test_no_healthy_backend_withdraws(lab: Lab) -> None:
    """Health checks (forwarder/health.py) that take every backend of the VIPs out withdraw
    them; the backend's recovery announces them again."""
    lab.stop_forwarder()
    lab.health = True
    listener: subprocess.Popen[str] | None = None

    def listen() -> subprocess.Popen[str]:
        proc = lab.rt.popen([sys.executable, "-c", LISTENER, PEER.router4, str(CHECK_PORT)])
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    try:
        listener = listen()
        lab.ensure_announced()
        lab.rt.stop(listener)
        listener = None
        assert wait_until(lab.withdrawn, 15, 0.05), lab.log()
        status = lab.status()
        assert f"no usable backend for tcp {VIP4}:80" in status["problems"]
        assert status["workers"][0]["state"] == "running"  # the worker is fine; its backends not
        listener = listen()
        assert wait_until(lab.announced, 30, 0.1), lab.log()
    finally:
        lab.stop_forwarder()
        lab.health = False
        if listener is not None:
            lab.rt.stop(listener)
