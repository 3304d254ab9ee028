"""The store benchmarks' lab: fastpath's generator → forwarder → sink, with a Redis Cluster.

```
 gen ns       fwd ns                                          sink ns
 pktgen ─ g0 ═ f-in [flowstate-forwarder, redis-cluster store] f-out ═ s0 ─ sink / capture
                     f-rds ═ r0 ─ rds ns: 6 Redis nodes (3 masters + 3 replicas) on 10.30.0.2
```

`StoreLab` extends `fastpath_lab.Lab` (same namespaces, generator, counting sink and daemon
start-up) with a Redis Cluster in its own namespace, a redis-cluster store in the daemon's
config, and fresh flows on demand: every `FlowSet` (client network x VIP port) is a range of
5-tuples no earlier measurement used, so its packets are unknown to the forwarder and absent
from the store. Also here: `Capture` (kernel-timestamped frames of one interface) and
`Resp` (a plain RESP client opened in a namespace), the instruments of new_flows and recovery.

Building the lab (namespaces, 6 Redis nodes) takes ~5 s, so the store benchmarks of one run
share one (`shared_lab`): each gets it with the daemon stopped, the store reachable and
empty; a benchmark that fails takes it down, and the run's exit does in any case.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hiredis

from benchmarks import pktgen, snapshot
from benchmarks.fastpath_lab import BACKENDS, SOURCE6, VIP, Lab, Sink, Window
from benchmarks.framework import BenchmarkError
from flowstate.control_client import ControlClient, ControlError
from flowstate.flow import FiveTuple, Proto, key_slot
from flowstate.store._resp import pack_command
from forwarder.bpf import attach_filter
from tests.netns import Netns, Topology, netns_unavailable, remove_stale_namespaces, wait_until

REPO = Path(__file__).resolve().parent.parent
FWD_ADDR, REDIS_HOST = "10.30.0.1", "10.30.0.2"
REDIS_BASE_PORT = 7800
REDIS_NODES = 6
#: The daemon serves one VIP address on these ports; each port is a separate space of flows.
VIP_PORTS = tuple(range(8000, 8016))
#: The generator keeps a 2 KiB frame per flow (mmsg mode): at most this many flows per run.
MAX_FLOWS_PER_RUN = 300_000
#: Fresh flows: client addresses FLOW_BASE + k * 2**20 + 1 + i (pktgen's numbering), k < 192.
FLOW_BASE = int(ipaddress.IPv4Address("10.64.0.0"))
FLOW_BLOCK = 1 << 20
FLOW_BLOCKS = 192
VIP_PACKED = ipaddress.IPv4Address(VIP).packed
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
#: Rate asked of the generator by `StoreLab.measure(pps=0)` (it may not reach it).
OVERLOAD_PPS = 200_000


@dataclass(frozen=True, slots=True)
class FlowSet:
    """`count` TCP flows as pktgen numbers them: flow i is client_net + 1 + i, source port
    10000 + i % 50000, to VIP:port."""

    client_net: str
    port: int
    count: int

    def tuple(self, i: int) -> FiveTuple:
        client = (int(ipaddress.IPv4Address(self.client_net)) + 1 + i).to_bytes(4, "big")
        return FiveTuple(Proto.TCP, client, 10000 + i % 50000, VIP_PACKED, self.port)

    def index(self, client_ip: bytes) -> int:
        """Flow number of a client address (may be out of range: not ours)."""
        return int.from_bytes(client_ip, "big") - int(ipaddress.IPv4Address(self.client_net)) - 1


# ---- a plain RESP client -------------------------------------------------------------------------


class Resp:
    """One blocking RESP connection made inside a namespace (hiredis parses the replies)."""

    def __init__(self, ns: Netns, host: str, port: int, password: str, timeout: float = 5.0):
        self.addr = (host, port)
        self.sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect(self.addr)
        self._reader = hiredis.Reader()
        if password:
            self.call("AUTH", password)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload)

    def read(self, n: int) -> list[Any]:
        """The next `n` replies (error replies raise BenchmarkError)."""
        out: list[Any] = []
        while len(out) < n:
            reply = self._reader.gets()
            if reply is False:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise BenchmarkError(f"Redis {self.addr} closed the connection")
                self._reader.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise BenchmarkError(f"Redis {self.addr}: {reply}")
            out.append(reply)
        return out

    def call(self, *args: str | bytes | int) -> Any:
        self.send(pack_command(*args))
        return self.read(1)[0]

    def close(self) -> None:
        self.sock.close()


class Cluster:
    """Clients of every master of the lab's cluster, opened from one namespace."""

    def __init__(self, ns: Netns, seeds: Sequence[tuple[str, int]], password: str):
        first = Resp(ns, *seeds[0], password)
        try:
            slots = first.call("CLUSTER", "SLOTS")
        finally:
            first.close()
        self.masters: list[Resp] = []
        index: dict[tuple[str, int], int] = {}
        self._slot_master = [0] * 16384
        for lo, hi, master, *_ in slots:
            addr = (master[0].decode(), int(master[1]))
            if addr not in index:
                index[addr] = len(self.masters)
                self.masters.append(Resp(ns, *addr, password))
            for slot in range(lo, hi + 1):
                self._slot_master[slot] = index[addr]

    def master_of(self, key: bytes) -> Resp:
        return self.masters[self._slot_master[key_slot(key)]]

    def dbsize(self) -> int:
        return sum(int(m.call("DBSIZE")) for m in self.masters)

    def flushall(self) -> None:
        for m in self.masters:
            m.call("FLUSHALL")

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """GET each key, one pipelined batch per master."""
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self._slot_master[key_slot(key)], []).append(i)
        for m, idxs in groups.items():
            self.masters[m].send(b"".join(pack_command("GET", keys[i]) for i in idxs))
        out: list[bytes | None] = [None] * len(keys)
        for m, idxs in groups.items():
            for i, reply in zip(idxs, self.masters[m].read(len(idxs)), strict=True):
                out[i] = reply
        return out

    def close(self) -> None:
        for m in self.masters:
            m.close()


# ---- timestamped capture -------------------------------------------------------------------------


def bpf(*insns: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("HBBI", *i) for i in insns)


_LDH, _LDW, _LDB = 0x28, 0x20, 0x30  # BPF_LD | size | BPF_ABS
_JEQ, _JSET, _RET, _ALU_AND = 0x15, 0x45, 0x06, 0x54


def tcp_to_vip_filter(sample_mask: int = 0, syn_only: bool = False) -> bytes:
    """Frames of IPv4 TCP to the VIP (IHL 5, as pktgen sends); with `sample_mask`, only those
    whose client address & mask == 0; with `syn_only`, only SYNs."""
    vip = int.from_bytes(VIP_PACKED, "big")
    code: list[tuple[int, int, int, int]] = [
        (_LDH, 0, 0, 12),
        (_JEQ, 0, 0xFF, 0x0800),  # jf patched below: reject
        (_LDB, 0, 0, 23),
        (_JEQ, 0, 0xFF, 6),
        (_LDW, 0, 0, 30),
        (_JEQ, 0, 0xFF, vip),
    ]
    if sample_mask:
        code += [(_LDW, 0, 0, 26), (_ALU_AND, 0, 0, sample_mask), (_JEQ, 0, 0xFF, 0)]
    if syn_only:
        code += [(_LDB, 0, 0, 47), (_JSET, 0, 0xFF, 0x02)]
    return _finish(code)


def encap_filter() -> bytes:
    """Frames of IPv6 with next header 4 (IPv4 inside) whose inner destination is the VIP."""
    vip = int.from_bytes(VIP_PACKED, "big")
    code: list[tuple[int, int, int, int]] = [
        (_LDH, 0, 0, 12),
        (_JEQ, 0, 0xFF, 0x86DD),
        (_LDB, 0, 0, 20),
        (_JEQ, 0, 0xFF, 4),
        (_LDW, 0, 0, 70),
        (_JEQ, 0, 0xFF, vip),
    ]
    return _finish(code)


def _finish(code: list[tuple[int, int, int, int]]) -> bytes:
    """Append accept/reject and point every jf == 0xFF at reject."""
    reject = len(code) + 1
    fixed = [
        (op, jt, reject - n - 1 if jf == 0xFF else jf, k) for n, (op, jt, jf, k) in enumerate(code)
    ]
    return bpf(*fixed, (_RET, 0, 0, 0xFFFF), (_RET, 0, 0, 0))


class Capture:
    """Frames of one interface with their kernel receive timestamps (CLOCK_REALTIME ns).

    An AF_PACKET socket made in `ns` with a classic BPF filter and SO_TIMESTAMPNS; a thread
    reads it into `frames` (the first `snap` bytes). The kernel stamps a frame when it is
    received (veth: when the sender hands it over), so how late the thread reads it does not
    matter, as long as the receive buffer (32 MiB) does not overflow (`drops()` says).
    """

    def __init__(self, ns: Netns, dev: str, program: bytes, snap: int = 96) -> None:
        self._snap = snap
        self.sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        attach_filter(self.sock, program)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self.sock.bind((dev, _ETH_P_ALL))
        self._frames: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        anc = socket.CMSG_SPACE(16)
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            while True:
                try:
                    data, cmsgs, _flags, addr = self.sock.recvmsg(
                        self._snap, anc, socket.MSG_DONTWAIT
                    )
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    return
                if addr[2] == socket.PACKET_OUTGOING:
                    continue
                stamp = 0
                for level, kind, value in cmsgs:
                    if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", value[:16])
                        stamp = sec * 1_000_000_000 + nsec
                with self._lock:
                    self._frames.append((stamp, data))

    def take(self) -> list[tuple[int, bytes]]:
        """The frames captured since the last call, oldest first."""
        with self._lock:
            frames, self._frames = self._frames, []
        return frames

    def drops(self) -> int:
        """Frames the kernel dropped for a full receive buffer since the last call."""
        raw = self.sock.getsockopt(_SOL_PACKET, 6, 8)  # PACKET_STATISTICS
        return int(struct.unpack("II", raw)[1])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def client_of_ingress(frame: bytes) -> tuple[bytes, int]:
    """(client address, VIP port) of a pktgen frame on f-in."""
    return frame[26:30], int.from_bytes(frame[36:38], "big")


def client_of_encap(frame: bytes) -> tuple[bytes, int, bytes]:
    """(inner client address, VIP port, outer destination = backend) of a forwarded frame."""
    return frame[66:70], int.from_bytes(frame[76:78], "big"), frame[38:54]


# ---- the lab -------------------------------------------------------------------------------------


class StoreLab(Lab):
    """`fastpath_lab.Lab` whose daemon uses a real Redis Cluster (see the module docstring).

    `store` holds extra `[store]` settings for the daemon's config (e.g. max_writes_per_s).
    Call `start_redis()` before starting the daemon and `close()` at the end (the Topology
    removes the namespaces and every process in them in any case).
    """

    def __init__(
        self,
        topo: Topology,
        pktgen: Path,
        workdir: Path,
        pythonpath: str,
        *,
        store: dict[str, float | int | bool] | None = None,
    ) -> None:
        self._flow_set = FlowSet(str(ipaddress.IPv4Address(FLOW_BASE)), VIP_PORTS[0], 1)
        self._next_set = 0
        #: What `measure`/`blast` send: "ack" (mid-flow packets) or "syn".
        self.tx_flags = "ack"
        super().__init__(topo, pktgen, workdir, 1, pythonpath)
        self.store_settings = dict(store or {})
        self.password = secrets.token_hex(12)
        self.rds = topo.add_netns("rds")
        topo.veth(
            self.fwd,
            "f-rds",
            self.rds,
            "r0",
            a_addrs=[f"{FWD_ADDR}/24"],
            b_addrs=[f"{REDIS_HOST}/24"],
        )
        self.redis_dir = workdir / "redis"
        self._redis_up = False
        self._cluster: Cluster | None = None

    # ---- flows ------------------------------------------------------------------------------

    def fresh_flows(self, count: int) -> FlowSet:
        """A set of `count` (<= 2**20) flows no earlier call handed out; the generator sends
        them from now on."""
        if not 0 < count <= FLOW_BLOCK:
            raise ValueError(f"1..{FLOW_BLOCK} flows per set, not {count}")
        n = self._next_set
        if n >= FLOW_BLOCKS * len(VIP_PORTS):
            raise BenchmarkError("the lab ran out of fresh flows")
        self._next_set += 1
        block, port = divmod(n, len(VIP_PORTS))
        net = str(ipaddress.IPv4Address(FLOW_BASE + block * FLOW_BLOCK))
        self._flow_set = FlowSet(net, VIP_PORTS[port], count)
        self.flows = count
        return self._flow_set

    def _tx_args(self, flags: str, size: int, *extra: str) -> list[str]:
        args = super()._tx_args(flags, size, *extra)
        fs = self._flow_set
        for opt, value in (("--client-net", fs.client_net), ("--port", str(fs.port))):
            args[args.index(opt) + 1] = value
        return args

    def measure(self, sink: Sink, size: int, seconds: float, ramp: float, pps: int = 0) -> Window:
        """`Lab.measure` (the one fastpath's loss-free search calls) on fresh flows: packets of
        kind `tx_flags`, each the first of its flow; `pps` 0 asks for OVERLOAD_PPS."""
        rate = pps or OVERLOAD_PPS
        self.fresh_flows(max(1000, min(MAX_FLOWS_PER_RUN, int(rate * (ramp + seconds) * 1.3))))
        return super().measure(sink, size, seconds, ramp, rate)

    @contextlib.contextmanager
    def blast(self, size: int, pps: int = 0) -> Iterator[subprocess.Popen[str]]:
        """`tx_flags` packets of the current flow set at `pps`, one per flow (the generator
        stops when the set is used up), in bursts that grow with the rate."""
        batch = str(max(16, min(256, pps // 1000)))
        args = self._tx_args(self.tx_flags, size, "--pps", str(pps), "--batch", batch)
        proc = self.gen.popen([*args, "--count", str(self.flows)])
        try:
            self.wait_sending(proc)
            yield proc
        finally:
            self.gen.stop(proc)

    def tx_packets(self) -> int:
        """Frames g0 (the generator's link) sent so far."""
        with self.gen.entered(), open("/proc/thread-self/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "g0":
                    return int(rest.split()[9])
        raise BenchmarkError("g0 is gone")

    def wait_sending(self, proc: subprocess.Popen[str], timeout: float = 10.0) -> float:
        """Wait until the generator's first frames left (it builds one frame per flow first,
        which takes a while for many flows); returns that time (monotonic)."""
        start = self.tx_packets()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tx_packets() != start:
                return time.monotonic()
            if proc.poll() is not None:
                if proc.returncode != 0:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise BenchmarkError(f"pktgen tx exited: {err}")
                return time.monotonic()
            time.sleep(0.002)
        raise BenchmarkError(f"pktgen sent nothing in {timeout:.0f} s")

    # ---- Redis ------------------------------------------------------------------------------

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [(REDIS_HOST, REDIS_BASE_PORT + i) for i in range(REDIS_NODES)]

    def _deploy(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_REDIS_")}
        env["FLOWSTATE_REDIS_PASSWORD"] = self.password
        cmd = [sys.executable, str(REPO / "deploy" / "redis-cluster"), *args]
        cmd += ["--base-port", str(REDIS_BASE_PORT), "--dir", str(self.redis_dir)]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchmarkError(f"deploy/redis-cluster {args[0]} timed out: {exc}") from None

    def start_redis(self) -> None:
        up = self._deploy(
            "up", "--netns", self.rds.name, "--host", REDIS_HOST, "--nodes", str(REDIS_NODES)
        )
        self._redis_up = True
        if up.returncode != 0:
            raise BenchmarkError(f"deploy/redis-cluster up failed:\n{up.stdout}{up.stderr}")

    @property
    def cluster(self) -> Cluster:
        """Clients of the masters, opened from the forwarder's namespace (its path to Redis)."""
        if self._cluster is None:
            self._cluster = Cluster(self.fwd, self.seeds, self.password)
        return self._cluster

    def redis_benchmark(self, requests: int, *extra: str) -> float:
        """`redis-benchmark --cluster -P 64 -c 50 -t set -n N` from the forwarder's
        namespace: SET requests per second."""
        host, port = self.seeds[0]
        cmd = ["redis-benchmark", "--cluster", "-h", host, "-p", str(port), "-P", "64"]
        cmd += ["-c", "50", "-t", "set", "-n", str(requests), "-q", "-a", self.password, *extra]
        out = self.fwd.run(cmd, timeout=120, check=False)
        for line in out.stdout.replace("\r", "\n").splitlines():
            if line.startswith("SET:") and "requests per second" in line:
                return float(line.split()[1])
        raise BenchmarkError(
            f"redis-benchmark failed ({out.returncode}):\n{out.stdout}{out.stderr}"
        )

    # ---- the daemon -------------------------------------------------------------------------

    def config_text(self, impl: str, workers: int) -> str:
        seeds = ", ".join(f'"{h}:{p}"' for h, p in self.seeds)
        store = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.store_settings.items())
        vips = ""
        for port in VIP_PORTS:
            vips += f'[[vip]]\naddress = "{VIP}"\nport = {port}\nprotocol = "tcp"\n'
            vips += "".join(f'[[vip.backend]]\naddress = "{b}"\n' for b in BACKENDS)
        return (
            f'pop = "bench"\ninterfaces = ["f-in"]\nsource_ipv6 = "{SOURCE6}"\n'
            f'impl = "{impl}"\nworkers = {workers}\n'
            f'[store]\nkind = "redis-cluster"\nseeds = [{seeds}]\n'
            f'password = "{self.password}"\n{store}'
            f'[control]\nsocket = "{self.workdir}/ctl.sock"\nmetrics = ""\n' + vips
        )

    def start_daemon(self, impl: str, workers: int) -> None:
        """`Lab.start_daemon`, importing the snapshot: without PYTHONSAFEPATH, `python -m`
        puts its working directory (the repository, whose `forwarder/` may hold another
        build, even an ASan one) before PYTHONPATH."""
        saved = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"  # Netns.popen passes os.environ on
        try:
            super().start_daemon(impl, workers)
        finally:
            if saved is None:
                del os.environ["PYTHONSAFEPATH"]
            else:
                os.environ["PYTHONSAFEPATH"] = saved

    def start_store_daemon(self, impl: str = "c", timeout: float = 20.0) -> None:
        """Start the daemon and wait until its store is connected (control API `stats`)."""
        self.start_daemon(impl, 1)

        def connected() -> bool:
            if self.daemon_died():
                raise BenchmarkError(f"forwarder exited:\n{self.daemon_log_text()}")
            with contextlib.suppress(ControlError, OSError):
                worker = self.stats()["workers"][0]
                return bool(worker["store"]["connected"])
            return False

        if not wait_until(connected, timeout=timeout, interval=0.1):
            raise BenchmarkError(
                f"the forwarder's store did not connect:\n{self.daemon_log_text()}"
            )

    def daemon_cpu_seconds(self) -> float:
        """CPU time (user + system) the daemon used so far (0.0 when none runs)."""
        if self.daemon is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.daemon.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict[str, Any]:
        """The daemon's control API `stats` answer."""
        import asyncio

        async def ask() -> dict[str, Any]:
            path = self.workdir / "ctl.sock"
            async with await ControlClient.connect(path, timeout=3.0) as client:
                return await client.stats()

        return asyncio.run(ask())

    def worker_counters(self) -> dict[str, int]:
        """Engine, core and store client counters of the (single) worker, in one dict."""
        w = self.stats()["workers"][0]
        out: dict[str, int] = {}
        for part in (w["engine"], w["core"], w["store"]["counters"]):
            out.update({k: int(v) for k, v in part.items()})
        out["queued_frames"] = int(w["queued_frames"])
        return out

    def store_down(self, how: str | None) -> None:
        """Cut the forwarder off Redis: "drop" (packets vanish: timeouts), "reject" (TCP
        reset: connection refused, like stopped nodes), None (restore)."""
        self.fwd.run(["nft", "delete", "table", "inet", "fsbench_store"], check=False)
        if how is None:
            return
        verdict = {"drop": "drop", "reject": "reject with tcp reset"}[how]
        rules = (
            "table inet fsbench_store {\n chain out {\n  type filter hook output priority 0;\n"
            f"  ip daddr {REDIS_HOST} tcp dport {REDIS_BASE_PORT}-{REDIS_BASE_PORT + 99} "
            f"{verdict}\n }}\n}}\n"
        )
        self.fwd.run(["nft", "-f", "-"], input=rules)

    @contextlib.contextmanager
    def sending(
        self, flags: str, count: int, pps: int, batch: int = 1, size: int = 64
    ) -> Iterator[subprocess.Popen[str]]:
        """The generator sending `count` frames of the current flow set at `pps` (0: flat
        out) in bursts of `batch` for the block (stopped at its end if not done)."""
        args = self._tx_args(flags, size, "--count", str(count), "--pps", str(pps))
        args += ["--batch", str(batch)]
        proc = self.gen.popen(args)
        try:
            yield proc
        finally:
            self.gen.stop(proc)

    def close(self) -> None:
        """Stop the daemon and the cluster (best effort: the namespaces go anyway)."""
        with contextlib.suppress(Exception):
            self.stop_daemon()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        if self._redis_up:
            self._deploy("down", timeout=60)
            self._redis_up = False


# ---- one lab for the store benchmarks of a run ---------------------------------------------------


class _Shared:
    lab: StoreLab | None = None
    topo: Topology | None = None
    workdir: Path | None = None


def _close_shared() -> None:
    lab, topo, workdir = _Shared.lab, _Shared.topo, _Shared.workdir
    _Shared.lab = _Shared.topo = _Shared.workdir = None
    try:
        if lab is not None:
            lab.store_down(None)
            lab.close()
    finally:
        if topo is not None:
            topo.close()
        if workdir is not None:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


@contextlib.contextmanager
def shared_lab(store: dict[str, float | int | bool] | None = None) -> Iterator[StoreLab]:
    """The run's StoreLab (built on first use: namespaces, Redis Cluster), with the daemon
    stopped, the store reachable and flushed, and `store` as the daemon's extra settings.

    A benchmark that raises takes it down (the next one builds a fresh one); otherwise it
    lives until the process exits. Raises BenchmarkError without namespaces.
    """
    problem = netns_unavailable()
    if problem is not None:
        raise BenchmarkError(f"the store benchmarks need network namespaces: {problem}")
    binary = pktgen.build()
    tree = snapshot.snapshot()
    if _Shared.lab is None:
        remove_stale_namespaces()
        atexit.register(_close_shared)
        _Shared.workdir = Path(tempfile.mkdtemp(prefix="fs-bench-store-"))
        _Shared.topo = Topology("store")
        try:
            _Shared.lab = StoreLab(_Shared.topo, binary, _Shared.workdir, snapshot.pythonpath(tree))
            _Shared.lab.start_redis()
        except BaseException:
            _close_shared()
            raise
    lab = _Shared.lab
    ok = False
    try:
        lab.stop_daemon()
        lab.store_down(None)
        lab.cluster.flushall()
        lab.pythonpath = snapshot.pythonpath(tree)
        lab.store_settings = dict(store or {})
        lab.tx_flags = "ack"
        yield lab
        ok = True
    finally:
        if ok:
            lab.stop_daemon()
        else:
            _close_shared()
