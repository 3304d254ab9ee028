"""The fastpath benchmark's namespace lab: generator → forwarder → sink, and its instruments.

```
 gen ns          fwd ns                                   sink ns
 pktgen tx ─ g0 ═ f-in  [flowstate-forwarder | ip_forward] f-out ═ s0 ─ pktgen sink (counts)
```

The forwarder namespace either runs the real daemon (`python -m forwarder.daemon`, memory
store) reading `f-in` and tunnelling out of `f-out`, or routes the same packets itself with
`ip_forward=1` (the kernel peer). Neighbours are static, the sink has no IP stack of its own
(IPv6 disabled, no IPv4 address), so nothing but the measured packets crosses the links.
Built on `tests.netns.Topology`: every namespace and process is removed on `close()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks.framework import BenchmarkError
from tests.netns import Netns, Topology, wait_until

REPO = Path(__file__).resolve().parent.parent
VIP, VIP_PORT = "192.0.2.10", 80
CLIENT_NET = "10.100.0.0"
SOURCE6 = "fd00:20::1"
NEXT_HOP6, NEXT_HOP4 = "fd00:20::2", "10.20.0.2"
BACKEND_PREFIX = "fd00:b::"
#: Next hop MAC of f-out: no interface has it (see Lab._build).
SINK_MAC = "02:00:00:00:5e:01"
PERMANENT = ("nud", "permanent")
#: The generator and the forwarder run at this priority: the machine is shared, and the
#: kernel peer's forwarding (softirq) preempts processes anyway. With autogroup scheduling
#: (each session a group) a process's nice only ranks it inside its session, so the
#: session's autogroup gets the same nice (`prioritise`).
NICE_LEVEL = -20
NICE = ("nice", "-n", str(NICE_LEVEL))
#: Rate of the warm-up SYN bursts (every engine takes them without loss).
WARM_PPS = 50_000
BACKENDS = tuple(f"fd00:b::{n}" for n in range(1, 5))
#: TTL of the generator's packets and of a packet the kernel routed once.
TTL_SENT, TTL_ROUTED = 64, 63
_HZ = os.sysconf("SC_CLK_TCK")


def prioritise(pid: int) -> None:
    """Give `pid`'s autogroup (its session: our processes each start one) NICE_LEVEL."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(NICE_LEVEL))


def cpus() -> tuple[int, int]:
    """(generator CPU, forwarder CPU): the first and last CPU this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[-1]


@dataclass(frozen=True, slots=True)
class Sample:
    """Counters read at one instant."""

    t: float
    """CLOCK_MONOTONIC seconds, as the sink took its count."""
    matched: int
    """Frames the sink's filter matched so far."""
    links: dict[str, dict[str, int]]
    """/proc/net/dev counters by device (g0, f-in, f-out, s0)."""
    cpu: dict[str, list[int]]
    """/proc/stat jiffies per CPU: user nice system idle iowait irq softirq steal."""
    proc_ticks: int
    """utime + stime of the forwarder's processes (0 for the kernel peer)."""
    gen_ticks: int
    """utime + stime of the generator."""


@dataclass(frozen=True, slots=True)
class Window:
    """Rates between two samples."""

    seconds: float
    forwarded_pps: float
    offered_pps: float
    generated_pps: float
    cpu_busy: dict[str, float]
    cpu_softirq: dict[str, float]
    forwarder_cpu: float
    """CPU seconds per second used by the forwarder's processes."""
    generator_cpu: float
    """CPU seconds per second used by the generator process. Tick-based accounting charges
    a softirq to the task it interrupted too, so this overlaps `cpu_softirq`."""

    @property
    def loss(self) -> float:
        """Share of the generated frames that did not arrive (negative: queues drained)."""
        return 1 - self.forwarded_pps / self.generated_pps if self.generated_pps else 1.0

    @classmethod
    def between(cls, a: Sample, b: Sample) -> Window:
        dt = b.t - a.t
        if dt <= 0:
            raise BenchmarkError("samples out of order")

        def delta(dev: str, key: str) -> int:
            return b.links[dev][key] - a.links[dev][key]

        fwd_cpu = (b.proc_ticks - a.proc_ticks) / _HZ / dt
        gen_cpu = (b.gen_ticks - a.gen_ticks) / _HZ / dt
        busy: dict[str, float] = {}
        softirq: dict[str, float] = {}
        for name, after in b.cpu.items():
            before = a.cpu.get(name, after)
            total = sum(after) - sum(before)
            idle = (after[3] + after[4]) - (before[3] + before[4])
            busy[name] = 1 - idle / total if total > 0 else 0.0
            softirq[name] = (after[6] - before[6]) / total if total > 0 else 0.0
        return cls(
            seconds=dt,
            forwarded_pps=(b.matched - a.matched) / dt,
            offered_pps=delta("f-in", "rx_packets") / dt,
            generated_pps=(delta("g0", "tx_packets") + delta("g0", "tx_dropped")) / dt,
            cpu_busy=busy,
            cpu_softirq=softirq,
            forwarder_cpu=fwd_cpu,
            generator_cpu=gen_cpu,
        )


_DEV_FIELDS = [
    f"{way}_{name}"
    for way in ("rx", "tx")
    for name in ("bytes", "packets", "errs", "dropped", "fifo", "frame", "compressed", "multicast")
]


def _net_dev(ns: Netns) -> dict[str, dict[str, int]]:
    # /proc/thread-self/net shows the calling thread's namespace: no subprocess needed.
    with ns.entered(), open("/proc/thread-self/net/dev") as f:
        lines = f.read().splitlines()[2:]
    out: dict[str, dict[str, int]] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        out[name.strip()] = dict(zip(_DEV_FIELDS, map(int, rest.split()), strict=False))
    return out


def _proc_stat() -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                out[name] = [int(v) for v in values[:8]]
    return out


def _ticks(pid: int) -> int:
    """utime + stime of `pid` and its children processes (the supervisor's workers)."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total


class Sink:
    """`pktgen sink` in the sink namespace: kernel-side count of matching frames on s0."""

    def __init__(self, ns: Netns, binary: Path, match: str, size: int) -> None:
        args = [str(binary), "sink", "--dev", "s0", "--match", match, "--vip", VIP]
        args += ["--size", str(size)]
        if match == "encap":
            args += ["--source", SOURCE6, "--backend-prefix", BACKEND_PREFIX]
        else:
            args += ["--ttl", str(TTL_ROUTED)]
        self._ns = ns
        # Like Netns.popen (own session, listed in ns.processes so tear-down ends it), but
        # with a stdin to ask for counts on.
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        ns.processes.append(self._proc)
        ready = self._readline()
        if ready != "ready":
            raise BenchmarkError(f"pktgen sink did not start: {ready!r} {self._stderr()}")

    def _readline(self) -> str:
        assert self._proc.stdout is not None
        return self._proc.stdout.readline().strip()

    def _stderr(self) -> str:
        if self._proc.poll() is None or self._proc.stderr is None:
            return ""
        return self._proc.stderr.read()

    def count(self) -> tuple[int, float]:
        """(frames matched so far, CLOCK_MONOTONIC seconds of the count)."""
        stdin = self._stdin()
        stdin.write("\n")
        stdin.flush()
        line = self._readline()
        try:
            matched, t_ns = line.split()
            return int(matched), int(t_ns) / 1e9
        except ValueError:
            raise BenchmarkError(f"pktgen sink answered {line!r} {self._stderr()}") from None

    def _stdin(self) -> IO[str]:
        if self._proc.stdin is None:
            raise BenchmarkError("pktgen sink has no stdin")
        return self._proc.stdin

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin().close()
        self._ns.stop(self._proc)


class Lab:
    """The three namespaces, the forwarder (daemon or kernel) and the traffic tools."""

    def __init__(
        self, topo: Topology, pktgen: Path, workdir: Path, flows: int, pythonpath: str
    ) -> None:
        self.topo = topo
        self.pythonpath = pythonpath
        self.pktgen = pktgen
        self.workdir = workdir
        self.flows = flows
        self.gen_cpu, self.fwd_cpu = cpus()
        self.gen = topo.add_netns("gen")
        self.fwd = topo.add_netns("fwd")
        self.sink = topo.add_netns("sink")
        self.daemon: subprocess.Popen[str] | None = None
        self.daemon_log: Path | None = None
        self.kernel_routing = False
        self.gen_mode = "mmsg"
        self._build()

    # ---- building ---------------------------------------------------------------------------

    def _build(self) -> None:
        gen, fwd, sink = self.gen, self.fwd, self.sink
        for ns in (gen, sink):
            # No IPv6 at all at the ends: no router solicitations or ND on the measured links.
            ns.set_sysctl("net.ipv6.conf.all.disable_ipv6", 1)
            ns.set_sysctl("net.ipv6.conf.default.disable_ipv6", 1)
        self.topo.veth(fwd, "f-out", sink, "s0", a_addrs=["10.20.0.1/24", f"{SOURCE6}/64"])
        fwd.set_sysctl("net.ipv6.conf.default.disable_ipv6", 1)
        self.topo.veth(gen, "g0", fwd, "f-in", b_addrs=["10.10.0.1/24"])
        for key in ("all", "default", "f-in", "f-out"):
            fwd.set_sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
        # GRO would merge nothing here (every frame of a flow has the same sequence number)
        # but costs time; the daemon turns these off on f-in anyway: same for every peer.
        fwd.disable_offloads("f-in", ("gro", "lro", "tso", "gso"))
        fwd.disable_offloads("f-out", ("gro", "lro", "tso", "gso"))
        sink.disable_offloads("s0", ("gro", "lro"))
        self.g0_mac = mac_of(gen, "g0")
        self.fin_mac = mac_of(fwd, "f-in")
        # The next hop's MAC is not s0's: frames reach s0's packet tap (the sink counts them)
        # as PACKET_OTHERHOST, which the sink's IP stack drops first thing, at no cost to the
        # CPU that delivers them (the sender's, on veth).
        for family, hop in (("-4", NEXT_HOP4), ("-6", NEXT_HOP6)):
            fwd.ip(family, "neigh", "replace", hop, "lladdr", SINK_MAC, "dev", "f-out", *PERMANENT)
        fwd.ip("-6", "route", "add", f"{BACKEND_PREFIX}/64", "via", NEXT_HOP6, "dev", "f-out")
        self.topo.settle()
        self.use_forwarder()

    # ---- modes ------------------------------------------------------------------------------

    def use_kernel(self, rps: bool) -> None:
        """Route the VIP through f-out with ip_forward=1; RPS of f-in on the forwarder CPU."""
        self.set_drop_after_taps(False)
        self.fwd.ip("route", "replace", f"{VIP}/32", "via", NEXT_HOP4, "dev", "f-out")
        self.fwd.set_sysctl("net.ipv4.ip_forward", 1)
        self.set_rps(rps)
        self.kernel_routing = True

    def use_forwarder(self, rps: bool | str = False, drop_after_taps: bool = False) -> None:
        """The forwarder host does not route the VIP: blackholed, ip_forward=0.

        `drop_after_taps`: an nftables netdev ingress rule drops VIP frames on f-in after the
        packet sockets (the forwarder's ring) saw them, so the host's IPv4 input (early demux,
        route lookup, dst alloc/free) never runs for them.
        """
        self.fwd.set_sysctl("net.ipv4.ip_forward", 0)
        self.fwd.ip("route", "replace", "blackhole", f"{VIP}/32")
        self.set_rps(rps)
        self.set_drop_after_taps(drop_after_taps)
        self.kernel_routing = False

    def set_drop_after_taps(self, on: bool) -> None:
        self.fwd.run(["nft", "delete", "table", "netdev", "fsbench"], check=False)
        if on:
            rules = (
                "table netdev fsbench {\n chain taps_saw_it {\n  type filter hook ingress "
                'device "f-in" priority 0;\n' + f"  ip daddr {VIP} drop\n }}\n}}\n"
            )
            self.fwd.run(["nft", "-f", "-"], input=rules)

    def set_rps(self, on: bool | str) -> None:
        """RPS of f-in: off, on the forwarder CPU (True), or "all" CPUs."""
        if on == "all":
            mask = format(sum(1 << c for c in os.sched_getaffinity(0)), "x")
        else:
            mask = format(1 << self.fwd_cpu, "x") if on else "0"
        self.fwd.run(["sh", "-c", f"echo {mask} > /sys/class/net/f-in/queues/rx-0/rps_cpus"])

    # ---- the daemon -------------------------------------------------------------------------

    def config_text(self, impl: str, workers: int) -> str:
        vip = f'[[vip]]\naddress = "{VIP}"\nport = {VIP_PORT}\nprotocol = "tcp"\n'
        vip += "".join(f'[[vip.backend]]\naddress = "{b}"\n' for b in BACKENDS)
        return (
            f'pop = "bench"\ninterfaces = ["f-in"]\nsource_ipv6 = "{SOURCE6}"\n'
            f'impl = "{impl}"\nworkers = {workers}\n'
            '[store]\nkind = "memory"\n'
            f'[control]\nsocket = "{self.workdir}/ctl.sock"\nmetrics = ""\n' + vip
        )

    def start_daemon(self, impl: str, workers: int) -> None:
        """`python -m forwarder.daemon --config F`: one worker pinned to the forwarder CPU, or
        `workers` fanout workers left to the scheduler; at `NICE` like the generator."""
        self.stop_daemon()
        cfg = self.workdir / f"forwarder-{impl}-{workers}.toml"
        cfg.write_text(self.config_text(impl, workers))
        self.daemon_log = self.workdir / f"forwarder-{impl}-{workers}.log"
        cmd = [*NICE, sys.executable, "-m", "forwarder.daemon", "--config", str(cfg)]
        cmd += ["--log-level", "warning"]
        if workers == 1:
            cmd = ["taskset", "-c", str(self.fwd_cpu), *cmd]
        with self.daemon_log.open("w") as log:
            self.daemon = self.fwd.popen(
                cmd, env={"PYTHONPATH": self.pythonpath}, stdout=log.fileno(), stderr=log.fileno()
            )
        prioritise(self.daemon.pid)

    def daemon_died(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is not None

    def daemon_log_text(self) -> str:
        if self.daemon_log is None or not self.daemon_log.exists():
            return ""
        return self.daemon_log.read_text()[-4000:]

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.fwd.stop(self.daemon, timeout=5.0)
            self.daemon = None

    # ---- traffic ----------------------------------------------------------------------------

    def _tx_args(self, flags: str, size: int, *extra: str) -> list[str]:
        args = ["taskset", "-c", str(self.gen_cpu), *NICE, str(self.pktgen), "tx"]
        args += ["--dev", "g0", "--src-mac", self.g0_mac, "--dst-mac", self.fin_mac]
        args += ["--client-net", CLIENT_NET, "--vip", VIP, "--port", str(VIP_PORT)]
        args += ["--flows", str(self.flows), "--size", str(size), "--flags", flags]
        return [*args, "--mode", self.gen_mode, *extra]

    def send(self, flags: str, size: int, count: int, pps: int) -> dict[str, Any]:
        """Send `count` frames (one per flow, round robin) at `pps`; the generator's report."""
        out = self.gen.run(self._tx_args(flags, size, "--count", str(count), "--pps", str(pps)))
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    @contextlib.contextmanager
    def blast(self, size: int, pps: int = 0) -> Iterator[subprocess.Popen[str]]:
        """Generate ACK frames of the warm flows at `pps` (0: as fast as possible) for the
        block."""
        # Paced: smaller bursts (a batch leaves back to back, then the generator sleeps).
        batch = "256" if pps == 0 else "32"
        proc = self.gen.popen(self._tx_args("ack", size, "--pps", str(pps), "--batch", batch))
        prioritise(proc.pid)
        try:
            time.sleep(0.05)
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise BenchmarkError(f"pktgen tx exited: {err}")
            yield proc
        finally:
            self.gen.stop(proc)

    def sink_for(self, size: int) -> Sink:
        return Sink(self.sink, self.pktgen, "routed" if self.kernel_routing else "encap", size)

    def warm(self, timeout: float = 20.0, size: int = 64) -> int:
        """Pin every flow: SYN bursts (one per flow) until one arrives whole at the sink.

        A whole burst means the forwarder is up, resolved its backends' neighbours and holds
        every flow in its table (a SYN to an established flow is forwarded as a hit). Returns
        the number of bursts sent; raises BenchmarkError on timeout or a dead daemon.
        """
        sink = self.sink_for(size)
        try:
            deadline = time.monotonic() + timeout
            bursts = got = 0
            while time.monotonic() < deadline:
                if self.daemon_died():
                    raise BenchmarkError(f"forwarder exited:\n{self.daemon_log_text()}")
                before, _ = sink.count()
                self.send("syn", size, self.flows, WARM_PPS)
                bursts += 1

                def arrived(start: int = before) -> bool:
                    nonlocal got
                    got = sink.count()[0] - start
                    return got >= self.flows

                if wait_until(arrived, timeout=1.0, interval=0.05):
                    return bursts
            raise BenchmarkError(
                f"warm-up: no SYN burst of {self.flows} flows arrived whole in {timeout:.0f} s "
                f"(last: {got})\n{self.daemon_log_text()}"
            )
        finally:
            sink.close()

    # ---- measuring --------------------------------------------------------------------------

    def sample(self, sink: Sink, gen: subprocess.Popen[str]) -> Sample:
        matched, t = sink.count()
        links: dict[str, dict[str, int]] = {}
        for ns, dev in ((self.gen, "g0"), (self.fwd, "f-in"), (self.fwd, "f-out")):
            links[dev] = _net_dev(ns)[dev]
        ticks = _ticks(self.daemon.pid) if self.daemon is not None else 0
        return Sample(t, matched, links, _proc_stat(), ticks, _ticks(gen.pid))

    def measure(self, sink: Sink, size: int, seconds: float, ramp: float, pps: int = 0) -> Window:
        """ACKs of `size` bytes at `pps` (0: flat out); rates over `seconds` after `ramp`.

        Waits for the forwarder to drain what it queued before returning, so that the next
        measurement counts only its own packets.
        """
        with self.blast(size, pps) as gen:
            time.sleep(ramp)
            a = self.sample(sink, gen)
            time.sleep(seconds)
            b = self.sample(sink, gen)
        self.quiesce(sink)
        if self.daemon_died():
            raise BenchmarkError(f"forwarder exited:\n{self.daemon_log_text()}")
        return Window.between(a, b)

    def quiesce(self, sink: Sink, timeout: float = 10.0) -> None:
        """Wait until no more packets reach the sink (the forwarder's queues are empty)."""
        last = -1

        def still() -> bool:
            nonlocal last
            now = sink.count()[0]
            quiet, last = now == last, now
            return quiet

        wait_until(still, timeout=timeout, interval=0.05)


def mac_of(ns: Netns, dev: str) -> str:
    info = json.loads(ns.ip("-j", "link", "show", dev))
    mac: str = info[0]["address"]
    return mac
