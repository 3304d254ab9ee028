"""End to end: hostile input at a live forwarder (one POP, tests/e2e/pop.py, the C data path).

* A poisoned store: records naming a backend outside the configured set, another VIP, garbage
  bytes, a wrong version. The forwarder rejects and counts them and falls back to Maglev; the
  connections they belong to go on, to a configured backend.
* A garbage storm, one kind of frame after another, at full speed from the router's side of the
  forwarder's link (AF_PACKET), while keep-alive connections run: every frame of a kind is counted
  under the verdicts that kind must get (drops by reason, passes), less what the kernel reports
  it dropped before the ring; the live connections see no error; the forwarder stays up.
* The forwarder runs with CAP_NET_RAW and CAP_NET_ADMIN only (/proc/PID/status).
* A SYN flood from spoofed sources (benchmarks/pktgen.c at the most it reaches): store writes
  stay under `max_writes_per_s`, the flow table within its capacity, and the fraction of
  legitimate connections that complete meanwhile is reported (and must stay high).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from deploy.labkit.faults import drop_reasons, flatten_stats
from flowstate.flow import FiveTuple
from flowstate.record import FlowRecord
from forwarder import packet as P
from forwarder.fastpath import c_engine_available
from tests.e2e.conftest import require_netns
from tests.e2e.pop import (
    CLIENT4,
    REDIS_HOST,
    REDIS_PASSWORD,
    REDIS_PORT,
    VIP4,
    VIP6,
    Pop,
    decap_addr,
)

pytestmark = pytest.mark.e2e

IMPL = "c" if c_engine_available() else "python"
CAPACITY = 32768
"""The forwarder's flow table capacity in this test (a multiple of 8: no rounding)."""
WRITE_CAP = 4000
"""`store.max_writes_per_s` in this test."""
BACKENDS = (1, 2, 3)
V4, V6 = ipaddress.IPv4Address(VIP4).packed, ipaddress.IPv6Address(VIP6).packed
#: The router's end of the forwarder's receive link, where hostile frames are sent from.
SEND_DEV, RECV_DEV = "rt-f", "f-rt"
PER_KIND = 20_000
"""Frames sent of each kind in the storm."""
VERDICTS = (
    "forward",
    "new",
    "miss",
    "pass_not_ip",
    "pass_not_vip",
    "pass_not_service",
    "reply_too_big",
)


class HostilePop(Pop):
    """The standard POP with a small flow table and a low store write cap."""

    def config_text(self, impl: str, backends: list[int]) -> str:
        text = super().config_text(impl, backends)
        text = text.replace(
            "write_deadline_ms = 200\n",
            f"write_deadline_ms = 200\nmax_writes_per_s = {WRITE_CAP}\n",
        )
        return text + f"\n[flow_table]\ncapacity = {CAPACITY}\n"

    def stats(self) -> dict[str, int]:
        """Every counter of the forwarder ("engine.", "core.", "ring.", "store.")."""
        from flowstate.control_client import ControlClient

        async def call() -> Any:
            async with await ControlClient.connect(self.workdir / "ctl.sock") as client:
                return await client.call("stats", {"local": True})

        return flatten_stats(asyncio.run(call()))

    def flow(self, client_port: int) -> dict[str, Any]:
        from flowstate.control_client import ControlClient

        params = {"proto": "tcp", "client_ip": CLIENT4, "client_port": client_port}
        params |= {"vip_ip": VIP4, "vip_port": 80}

        async def call() -> Any:
            async with await ControlClient.connect(self.workdir / "ctl.sock") as client:
                return await client.call("flow", params)

        answer: dict[str, Any] = asyncio.run(call())
        return answer

    def mac(self, ns_role: str, dev: str) -> bytes:
        ns = {"rt": self.rt, "fwd": self.fwd}[ns_role]
        text = ns.run(["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()
        return bytes.fromhex(text.replace(":", ""))

    def link_drops(self) -> int:
        """Frames the veth could not hand to the forwarder's side (its backlog was full).

        (The receiving side's rx_dropped is no help: it also counts frames that reached the
        ring and that the IP stack then discarded for an unknown ethertype.)"""
        return self.rt.link_stat(SEND_DEV, "tx_dropped")

    def rss_kb(self) -> int:
        assert self.forwarder is not None
        for line in Path(f"/proc/{self.forwarder.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


@pytest.fixture(scope="module")
def pop() -> Iterator[HostilePop]:
    require_netns()
    with HostilePop.running(
        "hostile", IMPL, backends=len(BACKENDS), serving=list(BACKENDS)
    ) as built:
        yield built


def delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


# ---- a client whose sockets the test holds ---------------------------------------------------


class KeepAlive:
    """One HTTP/1.1 keep-alive connection from the client namespace, driven by the test."""

    def __init__(self, pop: Pop) -> None:
        self.sock = pop.client.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect((VIP4, 80))
        self.port: int = self.sock.getsockname()[1]
        self.buf = b""

    def get(self) -> str:
        """One request; the name of the backend that answered."""
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(self.buf) < length:
            self._read()
        body, self.buf = self.buf[:length], self.buf[length:]
        return str(json.loads(body)["backend"])

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError("closed by peer")
        self.buf += data

    def close(self) -> None:
        self.sock.close()


# ---- (c) a poisoned store ------------------------------------------------------------------


def write_raw(pop: Pop, values: dict[bytes, bytes]) -> None:
    """SET key value PX 60000 for each item, from inside the fabric (the router namespace)."""
    import redis.asyncio.cluster as rcluster

    async def go() -> None:
        seeds = [rcluster.ClusterNode(REDIS_HOST, REDIS_PORT + i) for i in range(6)]
        rc = rcluster.RedisCluster(startup_nodes=seeds, password=REDIS_PASSWORD)
        try:
            for key, value in values.items():
                await rc.set(key, value, px=60_000)
        finally:
            await rc.aclose()

    with pop.rt.entered():  # every socket of this thread's event loop lives in the namespace
        asyncio.run(go())


def test_poisoned_records_are_rejected_counted_and_fall_back_to_maglev(pop: HostilePop) -> None:
    conns = [KeepAlive(pop) for _ in range(4)]
    try:
        first = [c.get() for c in conns]
        now_ms = int(time.time() * 1000)
        stranger = ipaddress.IPv6Address("fd00:b::99").packed
        configured = ipaddress.IPv6Address(decap_addr(1)).packed
        poison = [
            FlowRecord(stranger, V4, now_ms, "evil").encode(),  # not a configured backend
            FlowRecord(configured, V6, now_ms, "evil").encode(),  # another VIP's record
            b"\xc1 not msgpack at all \xff",  # garbage bytes
            msgpack.packb([2, configured, V4, now_ms, "evil"], use_bin_type=True),  # version 2
        ]
        keys = [FiveTuple.make("tcp", CLIENT4, c.port, VIP4, 80).key() for c in conns]
        write_raw(pop, dict(zip(keys, poison, strict=True)))
        # A restarted forwarder knows no flow: the next packet of each connection is looked up.
        pop.stop_forwarder()
        pop.start_forwarder(IMPL, backends=list(BACKENDS))
        before = pop.stats()
        again = [c.get() for c in conns]
        after = pop.stats()
    finally:
        for c in conns:
            c.close()
    # Every connection went on, to the backend it had (Maglev: the backend set is unchanged).
    assert again == first
    assert delta(after, before, "core.record_rejected") == 2  # stranger, other VIP
    assert delta(after, before, "store.bad_records") >= 2  # garbage, wrong version
    assert delta(after, before, "core.fallbacks") == 4
    assert delta(after, before, "core.lookup_hits") == 2  # decoded, then rejected
    configured_names = {str(ipaddress.IPv6Address(decap_addr(n))) for n in BACKENDS}
    for c in conns:
        seen = pop.flow(c.port)
        assert [entry["backend"] for entry in seen["local"]] == [seen["maglev"]], seen
        assert seen["maglev"] in configured_names


# ---- (a) a garbage storm -----------------------------------------------------------------------


@dataclass
class Kind:
    """A kind of hostile frame and the verdict counters its frames must land in."""

    name: str
    counted_as: tuple[str, ...]
    """Engine counters (verdict names) that together must grow by what was sent."""
    build: Callable[[random.Random], bytes]
    extra: dict[str, int] = field(default_factory=dict)


def _src4(r: random.Random) -> bytes:
    return bytes([198, 18 + r.getrandbits(1), r.getrandbits(8), r.getrandbits(8)])


def _src6(r: random.Random) -> bytes:
    return bytes.fromhex("20010db8dead") + r.randbytes(10)


def _tcp4(r: random.Random, flags: int = P.TCP_ACK, dport: int = 80) -> tuple[bytes, bytes]:
    src = _src4(r)
    return src, P.tcp(src, V4, r.randrange(1024, 65536), dport, flags=flags, seq=r.getrandbits(32))


def _random_after_dst(r: random.Random) -> bytes:
    body = bytearray(r.randbytes(r.randrange(20, 200)))
    body[16:20] = V4  # only the destination is the VIP: the kernel filter lets it in
    return P.eth(P.ETH_P_IP) + bytes(body)


def _bad_version(r: random.Random) -> bytes:
    src, seg = _tcp4(r)
    version = r.choice([v for v in range(16) if v != 4])
    return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, seg, proto=6, version_ihl=version << 4 | 5)


def _bad_ihl(r: random.Random) -> bytes:
    src, seg = _tcp4(r)
    if r.getrandbits(1):
        ihl = r.randrange(0, 5)  # shorter than the fixed header
        packet = P.ipv4(src, V4, seg, proto=6, version_ihl=0x40 | ihl)
    else:
        ihl = r.randrange(6, 16)  # options beyond the end of the packet
        packet = P.ipv4(src, V4, b"", proto=6, version_ihl=0x40 | ihl, total_length=20)
    return P.eth(P.ETH_P_IP) + packet


def _bad_total_length(r: random.Random) -> bytes:
    src, seg = _tcp4(r)
    length = r.choice([r.randrange(0, 20), r.randrange(20 + len(seg) + 1, 65536)])
    return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, seg, proto=6, total_length=length)


def _fragment4(r: random.Random) -> bytes:
    src, seg = _tcp4(r)
    offset = r.randrange(1, 8192)
    flags = offset | (P.IP4_MF if r.getrandbits(1) else 0)
    return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, seg, proto=6, flags_frag=flags)


def _truncated_l4(r: random.Random) -> bytes:
    src = _src4(r)
    choice = r.randrange(3)
    if choice == 0:  # TCP header cut short
        seg = P.tcp(src, V4, 40000, 80, flags=P.TCP_ACK)[: r.randrange(0, 20)]
        return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, seg, proto=6)
    if choice == 1:  # UDP header cut short
        seg = P.udp(src, V4, 40000, 53, b"x")[: r.randrange(0, 8)]
        return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, seg, proto=17)
    seg = bytearray(P.tcp(src, V4, 40000, 80, flags=P.TCP_ACK))  # data offset < 5 or too long
    seg[12] = r.choice([0, 1, 2, 3, 4, 6, 9, 15]) << 4
    return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, bytes(seg), proto=6)


def _ip6_bad_length(r: random.Random) -> bytes:
    src = _src6(r)
    seg = P.tcp(src, V6, r.randrange(1024, 65536), 80, flags=P.TCP_ACK)
    length = r.choice([0, r.randrange(len(seg) + 1, 65536)])
    return P.eth(P.ETH_P_IPV6) + P.ipv6(src, V6, seg, nh=6, payload_length=length)


def _ip6_ext_chain(r: random.Random) -> bytes:
    """Too many extension headers, a chain looping on itself, or one running off the end."""
    src = _src6(r)
    seg = P.tcp(src, V6, r.randrange(1024, 65536), 80, flags=P.TCP_ACK)
    kind = r.randrange(3)
    if kind == 0:  # 9..20 hop-by-hop/routing/destination options headers
        count = r.randrange(9, 21)
        types = [r.choice([0, 43, 60]) for _ in range(count)]
        chain = b""
        for i, _t in enumerate(types):
            nxt = types[i + 1] if i + 1 < count else 6
            chain += P.ip6_opts(nxt, r.randrange(0, 3))
        return P.eth(P.ETH_P_IPV6) + P.ipv6(src, V6, chain + seg, nh=types[0])
    if kind == 1:  # destination options naming themselves as the next header, over and over
        chain = P.ip6_opts(60) * r.randrange(9, 40)
        return P.eth(P.ETH_P_IPV6) + P.ipv6(src, V6, chain, nh=60)
    head = P.ip6_opts(6, r.randrange(4, 30))[: r.randrange(2, 24)]  # longer than what follows
    return P.eth(P.ETH_P_IPV6) + P.ipv6(src, V6, head, nh=r.choice([0, 43, 60]))


def _fragment6(r: random.Random) -> bytes:
    src = _src6(r)
    seg = P.tcp(src, V6, r.randrange(1024, 65536), 80, flags=P.TCP_ACK)
    frag = P.ip6_frag(6, r.randrange(1, 8192), more=bool(r.getrandbits(1)), ident=r.getrandbits(32))
    return P.eth(P.ETH_P_IPV6) + P.ipv6(src, V6, frag + seg, nh=44)


def _icmp_bad_quote(r: random.Random) -> bytes:
    client = _src4(r)
    choice = r.randrange(3)
    if choice == 0:  # the quoted packet did not come from the VIP
        quote = P.ipv4(_src4(r), client, P.tcp(V4, client, 80, 40000, flags=P.TCP_ACK), proto=6)
    elif choice == 1:  # not TCP or UDP
        quote = P.ipv4(V4, client, r.randbytes(8), proto=47)
    else:  # too short to hold the quoted header and 8 bytes of it
        quote = P.ipv4(V4, client, P.tcp(V4, client, 80, 40000, flags=0), proto=6)
        quote = quote[: r.randrange(0, 27)]
    icmp = P.icmp4_error(3, r.randrange(16), quote[:576])
    return P.eth(P.ETH_P_IP) + P.ipv4(client, V4, icmp, proto=1)


def _not_a_service(r: random.Random) -> bytes:
    src = _src4(r)
    choice = r.randrange(4)
    if choice == 0:
        _s, seg = _tcp4(r, P.TCP_SYN, dport=r.choice([22, 81, 443, 8080]))
        return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, seg, proto=6)
    if choice == 1:
        return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, P.udp(src, V4, 5000, 54, b"x"), proto=17)
    if choice == 2:
        return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, r.randbytes(24), proto=47)  # GRE
    echo = P.icmp4_error(8, 0, r.randbytes(32), rest=r.getrandbits(32))
    return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, echo, proto=1)


def _odd_tcp_flags(r: random.Random) -> bytes:
    """Unknown flows: SYN+FIN and SYN+RST start one (NEW); the others are misses."""
    flags = r.choice(
        [
            P.TCP_SYN | P.TCP_FIN,
            P.TCP_SYN | P.TCP_RST,
            P.TCP_FIN,
            P.TCP_RST,
            0,  # null scan
            P.TCP_FIN | P.TCP_PSH | 0x20,  # xmas (FIN, PSH, URG)
            0x3F | 0xC0,  # every flag
            P.TCP_SYN | P.TCP_ACK,
        ]
    )
    src, seg = _tcp4(r, flags)
    return P.eth(P.ETH_P_IP) + P.ipv4(src, V4, seg, proto=6)


ICMP_UNKNOWN = "icmp: errors about flows nobody has"


def _icmp_unknown_flow(r: random.Random) -> bytes:
    """ "Fragmentation needed" / "packet too big" quoting a flow nobody has."""
    if r.getrandbits(1):
        client = _src4(r)
        inner = P.tcp(V4, client, 80, r.randrange(1024, 65536), flags=P.TCP_ACK)
        quote = P.ipv4(V4, client, inner, proto=6)
        icmp = P.icmp4_error(3, 4, quote, rest=1400)
        return P.eth(P.ETH_P_IP) + P.ipv4(_src4(r), V4, icmp, proto=1)
    client = _src6(r)
    inner = P.tcp(V6, client, 80, r.randrange(1024, 65536), flags=P.TCP_ACK)
    quote = P.ipv6(V6, client, inner, nh=6)
    router = _src6(r)
    icmp = P.icmp6_error(router, V6, 2, 0, quote, rest=1280)
    return P.eth(P.ETH_P_IPV6) + P.ipv6(router, V6, icmp, nh=58)


def _not_ours(r: random.Random) -> bytes:
    """Random bytes, ARP-like frames and IP to other addresses: the kernel filter drops them."""
    choice = r.randrange(3)
    if choice == 0:
        return r.randbytes(r.randrange(14, 300))
    if choice == 1:
        return P.eth(0x0806) + r.randbytes(28)
    src, seg = _tcp4(r)
    return P.eth(P.ETH_P_IP) + P.ipv4(src, _src4(r), seg, proto=6)


KINDS = [
    Kind("ip4: random bytes after a VIP destination", ("drop_", "pass_"), _random_after_dst),
    Kind("ip4: version is not 4", ("drop_ip4_version",), _bad_version),
    Kind("ip4: IHL < 5 or beyond the packet", ("drop_ip4_ihl",), _bad_ihl),
    Kind("ip4: total length wrong", ("drop_ip4_length",), _bad_total_length),
    Kind("ip4: non-first fragments", ("drop_fragment",), _fragment4),
    Kind("tcp/udp: truncated header", ("drop_l4_short",), _truncated_l4),
    Kind("ip6: payload length wrong", ("drop_ip6_length",), _ip6_bad_length),
    Kind("ip6: extension header chains and loops", ("drop_ip6_ext",), _ip6_ext_chain),
    Kind("ip6: non-first fragments", ("drop_fragment",), _fragment6),
    Kind("icmp: bad or short quotes", ("drop_icmp_bad_quote", "drop_icmp_short"), _icmp_bad_quote),
    Kind("not a service of a VIP", ("pass_not_service",), _not_a_service),
    # Before the odd TCP flags: the pins of their NEW flows would still be draining under the
    # write cap while this kind is measured, and it must show no store write of its own.
    Kind(ICMP_UNKNOWN, ("miss",), _icmp_unknown_flow),
    Kind("tcp: odd flags, unknown flows", ("new", "miss"), _odd_tcp_flags),
    Kind("not ours (kernel filter)", (), _not_ours),
]


def _counted(counters: dict[str, int], names: tuple[str, ...]) -> int:
    """Sum of the engine counters named (a name ending in "_" is a prefix)."""
    total = 0
    for key, value in counters.items():
        kind, _, name = key.partition(".")
        if kind == "engine" and any(
            name.startswith(n) if n.endswith("_") else name == n for n in names
        ):
            total += value
    return total


def _all_verdicts(counters: dict[str, int]) -> int:
    return _counted(counters, (*VERDICTS, "drop_"))


def _send(sock: socket.socket, frames: list[bytes]) -> tuple[int, float]:
    """Send every frame as fast as the socket takes them; (sent, seconds)."""
    send = sock.send
    started = time.perf_counter()
    sent = 0
    for f in frames:
        while True:
            try:
                send(f)
                break
            except (BlockingIOError, OSError) as exc:
                if isinstance(exc, BlockingIOError) or exc.errno in (105, 11):  # ENOBUFS, EAGAIN
                    time.sleep(0.0005)
                    continue
                raise
        sent += 1
    return sent, time.perf_counter() - started


def _settled(pop: HostilePop, quiet: float = 0.3, timeout: float = 20.0) -> dict[str, int]:
    """Counters once the forwarder has stopped taking new frames (ring drained)."""
    last = pop.stats()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = pop.stats()
        if now.get("ring.rx_frames") == last.get("ring.rx_frames"):
            return now
        last = now
    return last


def test_garbage_storm_is_counted_and_hurts_no_live_connection(pop: HostilePop) -> None:
    rng = random.Random(7)
    sock = pop.rt.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((SEND_DEV, 0))
    dst, src = pop.mac("fwd", RECV_DEV), pop.mac("rt", SEND_DEV)
    storm = [[dst + src + kind.build(rng)[12:] for _ in range(PER_KIND)] for kind in KINDS]
    requests = 400
    clients = pop.tool_popen(
        "http-clients", "--vip", VIP4, "--conns", "16", "--requests", str(requests),
        "--interval", "0.05", "--timeout", "3",
    )  # fmt: skip
    rss_before = pop.rss_kb()
    report: list[dict[str, Any]] = []
    try:
        time.sleep(1.0)  # every live connection is open and pinned
        for kind, frames in zip(KINDS, storm, strict=True):
            before, lost_before = _settled(pop), pop.link_drops()
            sent, took = _send(sock, frames)
            after, lost = _settled(pop), pop.link_drops() - lost_before
            kernel = delta(after, before, "ring.rx_kernel_drops") + lost
            counted = _counted(after, kind.counted_as) - _counted(before, kind.counted_as)
            row = {
                "kind": kind.name,
                "sent": sent,
                "per_s": round(sent / took),
                "counted": counted,
                "kernel_drops": kernel,
                "lookups": delta(after, before, "core.lookups"),
                "installed": delta(after, before, "engine.installs"),
                "store_writes": delta(after, before, "core.pins"),
                "flows_added": delta(after, before, "engine.flows"),
                "icmp_forwarded": delta(after, before, "core.icmp_maglev")
                + delta(after, before, "core.icmp_stored"),
                "other_non_forward": _all_verdicts(after)
                - _all_verdicts(before)
                - delta(after, before, "engine.forward")
                - counted,
            }
            reasons = drop_reasons(after)
            row["by_reason"] = {
                k: v - drop_reasons(before).get(k, 0)
                for k, v in reasons.items()
                if v != drop_reasons(before).get(k, 0)
            }
            report.append(row)
        out, _err = clients.communicate(timeout=120)
    finally:
        sock.close()
        if clients.poll() is None:
            clients.kill()
            clients.wait()
    print(json.dumps(report, indent=1))
    live = json.loads(out)
    assert not pop.forwarder_died(), pop.log()[-3000:]
    # Live connections: every request answered, by one backend each.
    assert [c["error"] for c in live] == [None] * len(live), live
    assert all(len(c["backends"]) == requests and len(set(c["backends"])) == 1 for c in live)
    for row in report:
        if row["kind"].startswith("not ours"):
            # Filtered in the kernel: the forwarder never sees them, nothing is counted.
            assert row["counted"] == 0 and row["other_non_forward"] == 0, row
            continue
        # Every frame of the kind is counted where it belongs, but those the kernel dropped
        # before the ring (and reported); no frame of it shows up anywhere else.
        assert row["sent"] - row["kernel_drops"] <= row["counted"] <= row["sent"], row
        assert row["other_non_forward"] == 0, row
        if row["kind"] == ICMP_UNKNOWN:
            # ICMP errors never create state: no flow installed, no pinning written; those
            # looked up (the rest overflowed the miss queue) went to a backend statelessly.
            assert row["installed"] == 0 and row["store_writes"] == 0, row
            assert row["flows_added"] <= 0, row
            assert 0 < row["icmp_forwarded"] <= row["lookups"], row
    assert pop.rss_kb() < rss_before + 200_000


# ---- (b) a SYN flood -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pps", "legit_share"),
    # At full speed the share that completes depends on how far the generator outruns one
    # worker on this machine (34-100 % seen): it is reported, not asserted. At a rate one
    # worker takes, it must stay high.
    [(0, 0.0), (20_000, 0.95)],
    ids=["full-speed", "20k-per-s"],
)
def test_syn_flood_caps_store_writes_bounds_the_table_and_legit_clients_get_through(
    pop: HostilePop, pps: int, legit_share: float
) -> None:
    """At full speed (one pktgen core against one forwarder worker on a shared two-core
    machine) the ring overflows and legitimate SYNs are lost with the spoofed ones: the share
    that completes is what the forwarder's new-flow rate leaves. At a rate one worker takes,
    legitimate clients must hardly notice."""
    from benchmarks.pktgen import build

    pktgen = build()
    dst, src = pop.mac("fwd", RECV_DEV), pop.mac("rt", SEND_DEV)
    seconds, flows = 6.0, 60_000
    before = pop.stats()
    started = time.monotonic()
    flood = pop.rt.popen(
        [
            str(pktgen), "tx", "--dev", SEND_DEV, "--src-mac", src.hex(":"),
            "--dst-mac", dst.hex(":"), "--client-net", "10.100.0.0", "--vip", VIP4,
            "--port", "80", "--flows", str(flows), "--size", "40", "--flags", "syn",
            "--mode", "mmsg", "--batch", "256", "--seconds", str(seconds), "--pps", str(pps),
        ]
    )  # fmt: skip
    try:
        time.sleep(1.5)  # the table is full of spoofed flows by now
        legit = pop.tool(
            "http-clients", "--vip", VIP4, "--conns", "100", "--requests", "3",
            "--interval", "0.05", "--timeout", "5", timeout=90,
        )  # fmt: skip
        out, _err = flood.communicate(timeout=seconds + 30)
    finally:
        if flood.poll() is None:
            pop.rt.stop(flood)
    elapsed = time.monotonic() - started
    gen = json.loads(out.strip().splitlines()[-1])
    after = _settled(pop)
    writes = sum(delta(after, before, f"core.{k}") for k in ("pins", "touches", "releases"))
    window = time.monotonic() - started
    ok = sum(1 for c in legit if c["error"] is None and len(c["backends"]) == 3)
    result = {
        "syn_sent": gen["sent"],
        "syn_per_s": round(gen["pps"]),
        "seen_by_forwarder": delta(after, before, "ring.rx_frames"),
        "kernel_drops": delta(after, before, "ring.rx_kernel_drops"),
        "new_flows": delta(after, before, "engine.new"),
        "store_writes": writes,
        "store_writes_per_s": round(writes / window),
        "writes_rate_limited": delta(after, before, "core.writes_rate_limited"),
        "flows_in_table": after.get("engine.flows", 0),
        "capacity": after.get("engine.capacity", 0),
        "evicted": delta(after, before, "engine.evicted"),
        "legit_completed": f"{ok}/{len(legit)}",
        "flood_s": round(elapsed, 1),
    }
    print(json.dumps(result, indent=1))
    assert not pop.forwarder_died(), pop.log()[-3000:]
    assert gen["sent"] > 50_000, gen
    # The write cap holds: at most the cap per second plus one second's burst.
    assert writes <= WRITE_CAP * (window + 1), result
    assert result["writes_rate_limited"] > 0, result
    assert result["capacity"] == CAPACITY and result["flows_in_table"] <= CAPACITY, result
    assert result["evicted"] > 0, result
    assert ok >= legit_share * len(legit), result


def test_the_forwarder_keeps_only_net_raw_and_net_admin(pop: HostilePop) -> None:
    """After start-up a worker holds CAP_NET_RAW and CAP_NET_ADMIN and nothing else, not even
    in its bounding set (a program it ran could not get root's other powers back)."""
    from forwarder.daemon import CAP_NET_ADMIN, CAP_NET_RAW

    assert pop.forwarder is not None
    status = Path(f"/proc/{pop.forwarder.pid}/status").read_text()
    caps = {
        name: int(value, 16)
        for name, value in (line.split(":\t") for line in status.splitlines())
        if name.startswith("Cap")
    }
    both = 1 << CAP_NET_RAW | 1 << CAP_NET_ADMIN
    assert caps == {"CapInh": 0, "CapPrm": both, "CapEff": both, "CapBnd": both, "CapAmb": 0}
    assert "capabilities: kept 0x3000" in pop.log()


def test_the_forwarder_survived_everything(pop: HostilePop) -> None:
    assert not pop.forwarder_died()
    with contextlib.closing(KeepAlive(pop)) as c:
        assert c.get() in {f"b{n}" for n in BACKENDS}
