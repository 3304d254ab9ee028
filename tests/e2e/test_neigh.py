"""Backend link resolution in namespaces: a direct backend, a gatewayed one, and the failures.

fwd f0 ── b0 be1            fd00:1::/64, backend fd00:1::2 on link
fwd f1 ── r0 rtr r1 ── b0 be2   fd00:2::/64 to the router, backend fd00:3::2 behind it
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import subprocess
import time
from typing import NamedTuple

import pytest

from flowstate.errors import UsageError
from forwarder.neigh import (
    Link,
    NeighbourCache,
    disable_offloads,
    interface_info,
    resolve_links,
    resolve_links_sync,
)
from tests.netns import Netns, Topology

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

DIRECT = "fd00:1::2"
GATEWAYED = "fd00:3::2"
SMALL_MTU = "fd00:4::9"  # behind the router too, on a route with mtu 1400
NO_ROUTE = "fd00:9::1"
LOCAL = "fd00:1::1"
NOBODY = "fd00:1::99"  # on link, but no host answers


def packed(address: str) -> bytes:
    return ipaddress.IPv6Address(address).packed


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def ip_link(netns: str, ifname: str) -> dict[str, object]:
    """`ip -j link show` of one interface: the ground truth for MACs, index and MTU."""
    [info] = json.loads(ip("-n", netns, "-j", "link", "show", ifname))
    assert isinstance(info, dict)
    return info


def mac(netns: str, ifname: str) -> bytes:
    return bytes.fromhex(str(ip_link(netns, ifname)["address"]).replace(":", ""))


class Lab(NamedTuple):
    fwd: str
    be1: str
    rtr: str
    be2: str


@pytest.fixture
def lab(netns_factory: Topology) -> Lab:
    # Namespaces without duplicate address detection: link-local addresses are usable at once,
    # so the kernel can send neighbour solicitations without waiting ~1 s.
    fwd, be1, rtr, be2 = (netns_factory.add_netns(role) for role in Lab._fields)
    netns_factory.veth(fwd, "f0", be1, "b0", a_addrs=["fd00:1::1/64"], b_addrs=["fd00:1::2/64"])
    netns_factory.veth(fwd, "f1", rtr, "r0", a_addrs=["fd00:2::1/64"], b_addrs=["fd00:2::2/64"])
    netns_factory.veth(rtr, "r1", be2, "b0", a_addrs=["fd00:3::1/64"], b_addrs=["fd00:3::2/64"])
    # Until linkwatch attaches their qdisc (up to a second after `link set up`), frames sent
    # on the links are dropped.
    netns_factory.settle()
    fwd.ip("route", "add", "fd00:3::/64", "via", "fd00:2::2", "dev", "f1")
    fwd.ip("route", "add", "fd00:4::/64", "via", "fd00:2::2", "dev", "f1", "mtu", "1400")
    return Lab(fwd.name, be1.name, rtr.name, be2.name)


def resolve_until(lab: Lab, addresses: list[str], settled: list[str]) -> dict[bytes, Link]:
    """Resolve (probing) until every address in `settled` is resolved."""
    deadline = time.monotonic() + 5.0
    with Netns(lab.fwd).entered():
        while True:
            links = resolve_links_sync(addresses)
            if all(links[packed(a)].resolved for a in settled) or time.monotonic() > deadline:
                return links
            time.sleep(0.05)


def test_direct_and_gatewayed_backends(lab: Lab) -> None:
    with Netns(lab.fwd).entered():
        first = resolve_links_sync([DIRECT, GATEWAYED])
    # Nothing has talked to the backends yet: unresolved this round, and probed.
    assert first[packed(DIRECT)] == Link(next_hop=packed(DIRECT), reason="neighbour missing")
    assert first[packed(GATEWAYED)].next_hop == packed("fd00:2::2")
    assert not first[packed(GATEWAYED)].resolved

    links = resolve_until(lab, [DIRECT, GATEWAYED, SMALL_MTU], [DIRECT, GATEWAYED, SMALL_MTU])
    f0, f1 = ip_link(lab.fwd, "f0"), ip_link(lab.fwd, "f1")
    assert links[packed(DIRECT)] == Link(
        ifindex=int(str(f0["ifindex"])),
        ifname="f0",
        src_mac=mac(lab.fwd, "f0"),
        dst_mac=mac(lab.be1, "b0"),
        mtu=1500,
        next_hop=packed(DIRECT),
    )
    # Behind the router: the router's MAC, on the router's link.
    assert links[packed(GATEWAYED)] == Link(
        ifindex=int(str(f1["ifindex"])),
        ifname="f1",
        src_mac=mac(lab.fwd, "f1"),
        dst_mac=mac(lab.rtr, "r0"),
        mtu=1500,
        next_hop=packed("fd00:2::2"),
    )
    small = links[packed(SMALL_MTU)]
    assert (small.dst_mac, small.mtu) == (mac(lab.rtr, "r0"), 1400)


def test_unresolvable_backends_say_why(lab: Lab) -> None:
    links = resolve_until(lab, [NO_ROUTE, LOCAL, NOBODY, DIRECT], [DIRECT])
    assert links[packed(NO_ROUTE)].reason == "no route: Network is unreachable"
    assert links[packed(LOCAL)].reason == "address is local to this host"
    nobody = links[packed(NOBODY)]
    assert not nobody.resolved
    assert nobody.reason in ("neighbour INCOMPLETE", "neighbour FAILED")
    assert (nobody.ifindex, nobody.src_mac, nobody.dst_mac, nobody.mtu) == (0, b"", b"", 0)
    assert links[packed(DIRECT)].resolved
    with pytest.raises(UsageError):
        resolve_links_sync(["192.0.2.1"])


def test_async_resolution_matches_sync(lab: Lab) -> None:
    resolve_until(lab, [DIRECT, GATEWAYED], [DIRECT, GATEWAYED])
    with Netns(lab.fwd).entered():
        sync = resolve_links_sync([DIRECT, GATEWAYED, NO_ROUTE], probe=False)
        asynchronous = asyncio.run(resolve_links([DIRECT, GATEWAYED, NO_ROUTE], probe=False))
    assert asynchronous == sync
    assert asynchronous[packed(DIRECT)].resolved


def test_cache_reports_changes_only(lab: Lab) -> None:
    addresses = [ipaddress.IPv6Address(DIRECT), ipaddress.IPv6Address(GATEWAYED)]
    cache = NeighbourCache(addresses, refresh_s=0.2, retry_s=0.05)
    seen: list[dict[bytes, Link]] = []

    async def watch(until: bytes) -> None:
        """Run the cache until `until`'s MAC shows up in a change set."""

        def on_change(changed: dict[bytes, Link]) -> None:
            seen.append(changed)
            if any(link.dst_mac == until for link in changed.values()):
                task.cancel()

        task = asyncio.ensure_future(cache.run(on_change))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)

    with Netns(lab.fwd).entered():
        asyncio.run(watch(until=mac(lab.be1, "b0")))
        # The first refresh reports every backend; later ones only what changed.
        assert set(seen[0]) == {packed(DIRECT), packed(GATEWAYED)}
        assert cache.link(DIRECT) == resolve_links_sync([DIRECT], probe=False)[packed(DIRECT)]
        deadline = time.monotonic() + 5.0
        while not all(link.resolved for link in cache.links().values()):
            assert time.monotonic() < deadline, cache.links()
            cache.refresh_sync()
            time.sleep(0.05)
        assert cache.refresh_sync() == {}
        assert cache.next_refresh_s() == 0.2

        # The backend's NIC is replaced: the forwarder forgets the entry (flush), re-learns it.
        new_mac = bytes.fromhex("02aabbccdd01")
        ip("-n", lab.be1, "link", "set", "b0", "address", new_mac.hex(":"))
        ip("-n", lab.fwd, "-6", "neigh", "flush", "dev", "f0")
        seen.clear()
        asyncio.run(watch(until=new_mac))
        # First the entry is gone (unresolved), then the new MAC; the other backend never moved.
        assert set(seen[0]) == {packed(DIRECT)}
        assert not seen[0][packed(DIRECT)].resolved or seen[0][packed(DIRECT)].dst_mac == new_mac
        assert cache.link(DIRECT).dst_mac == new_mac  # type: ignore[union-attr]
        assert all(packed(GATEWAYED) not in changed for changed in seen)

        cache.set_addresses([GATEWAYED])
        assert cache.addresses == [packed(GATEWAYED)]
        assert cache.link(DIRECT) is None


def test_returns_to_a_route_whose_gateway_was_cut(lab: Lab, netns_factory: Topology) -> None:
    """The lab's pop-cut fault in small: a backend behind a gateway on f0 (be1), a default
    route through the router on f1. While f0's link is down the gateway's entry turns FAILED
    and the kernel (this host does not forward) answers with the default route; once the link
    is back, its own route lookups keep passing the gateway over until it re-probes it itself
    (`router_probe_interval`, 60 s) or its neighbour GC drops the entry. The cache probes the
    skipped gateway and is back on it within a refresh or two."""
    behind_be1 = "fd00:5::1"
    ip("-n", lab.fwd, "-6", "route", "add", "default", "via", "fd00:2::2", "dev", "f1")
    ip("-n", lab.fwd, "-6", "route", "add", f"{behind_be1}/128", "via", DIRECT, "dev", "f0")
    # Solicitations 0.1 s apart: an unanswered entry is FAILED after 0.3 s instead of 3 s.
    subprocess.run(
        ["ip", "netns", "exec", lab.fwd, "sysctl", "-qw", "net.ipv6.neigh.f0.retrans_time_ms=100"],
        check=True,
    )
    be1_mac, router_mac = mac(lab.be1, "b0"), mac(lab.rtr, "r0")
    links = resolve_until(lab, [behind_be1], [behind_be1])
    assert (links[packed(behind_be1)].dst_mac, links[packed(behind_be1)].bypassed) == (be1_mac, b"")

    # f0 loses its carrier; be1 keeps its address (like the lab's fabric switch port going down)
    subprocess.run(
        ["ip", "netns", "exec", lab.be1, "sysctl", "-qw", "net.ipv6.conf.b0.keep_addr_on_down=1"],
        check=True,
    )
    ip("-n", lab.be1, "link", "set", "b0", "down")
    cache = NeighbourCache([behind_be1], refresh_s=5.0, retry_s=0.05)
    deadline = time.monotonic() + 5.0
    with Netns(lab.fwd).entered():
        while True:
            cache.refresh_sync()
            link = cache.link(behind_be1)
            assert link is not None
            if link.resolved and link.ifname == "f1":
                break
            assert time.monotonic() < deadline, (link, ip("-n", lab.fwd, "-6", "neigh"))
            time.sleep(0.05)
    # Routed around the FAILED gateway, to the router: named, and refreshed at retry_s.
    assert (link.dst_mac, link.next_hop, link.bypassed) == (
        router_mac,
        packed("fd00:2::2"),
        packed(DIRECT),
    )
    assert cache.next_refresh_s() == 0.05
    # That refresh probed the gateway again (INCOMPLETE): unanswered, FAILED after 0.3 s.
    deadline = time.monotonic() + 3.0
    while "FAILED" not in ip("-n", lab.fwd, "-6", "neigh", "show", DIRECT, "dev", "f0"):
        assert time.monotonic() < deadline, ip("-n", lab.fwd, "-6", "neigh")
        time.sleep(0.05)

    ip("-n", lab.be1, "link", "set", "b0", "up")
    netns_factory.settle()
    # Without the probe the kernel would keep answering f1 for tens of seconds.
    deadline = time.monotonic() + 2.0
    with Netns(lab.fwd).entered():
        while True:
            cache.refresh_sync()
            link = cache.link(behind_be1)
            assert link is not None
            if link.ifname == "f0" and link.resolved:
                break
            assert time.monotonic() < deadline, (link, ip("-n", lab.fwd, "-6", "neigh"))
            time.sleep(0.05)
    assert (link.dst_mac, link.next_hop, link.bypassed) == (be1_mac, packed(DIRECT), b"")
    assert cache.next_refresh_s() == 5.0


def test_interface_info_matches_ip_link(lab: Lab) -> None:
    ip("-n", lab.fwd, "link", "set", "f1", "mtu", "9000")
    with Netns(lab.fwd).entered():
        for ifname in ("f0", "f1"):
            info = ip_link(lab.fwd, ifname)
            assert interface_info(ifname) == (info["ifindex"], mac(lab.fwd, ifname), info["mtu"])
        with pytest.raises(OSError):
            interface_info("nosuch0")


def test_disable_offloads(lab: Lab) -> None:
    with Netns(lab.fwd).entered():
        ip("-n", lab.fwd, "link", "set", "f0", "up")
        subprocess.run(["ethtool", "-K", "f0", "gro", "on"], check=True, capture_output=True)
        state = disable_offloads("f0")
        assert state["generic-receive-offload"] is False
        assert state["generic-segmentation-offload"] is False
        assert state["large-receive-offload"] is False  # fixed off on veth: tolerated
        with pytest.raises(OSError):
            disable_offloads("nosuch0")
