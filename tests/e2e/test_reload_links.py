"""A backend added by a reload gets its next hop in the engine, whenever its neighbour resolves.

fwd f0 ── b0 be         fd00:1::/64; backends on link: fd00:1::2 from the start, fd00:1::3 added

The reload's own neighbour refresh finds the new backend unresolved (its probe goes out then);
the cache's background refresh resolves it while `replan` builds the new plan in a thread, when
the worker cannot hand the link over yet (the plan has no id for the backend) and will not report
it again. The reload must then give the engine the cache's current link, not the stale one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from pathlib import Path
from typing import Any

import pytest

import forwarder.control
from forwarder.config import ForwarderConfig, load_config
from forwarder.fastpath import c_engine_available
from forwarder.neigh import NeighbourCache
from forwarder.reload import reload_config
from forwarder.service import Forwarder, make_engine, plan_engine
from tests.netns import Topology

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

FIRST, ADDED = "fd00:1::2", "fd00:1::3"


def config_text(impl: str, backends: list[str]) -> str:
    text = f'pop = "t"\ninterfaces = ["f0"]\nsource_ipv6 = "fd00:1::1"\nimpl = "{impl}"\n'
    text += "[flow_table]\ncapacity = 4096\n"
    text += '[[vip]]\naddress = "192.0.2.10"\nport = 80\nprotocol = "tcp"\nmaglev_size = 1031\n'
    for b in backends:
        text += f'[[vip.backend]]\naddress = "{b}"\n'
    return text


def backend_link(fwd: Forwarder, address: str) -> Any:
    bid = fwd.plan.backend_ids[ipaddress.IPv6Address(address).packed]
    return fwd.engine.backend_link(bid)


IMPLS = ["python", *(["c"] if c_engine_available() else [])]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_backend_resolved_during_the_replan_gets_its_link(
    impl: str, netns_factory: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fwd_ns, be = netns_factory.add_netns("fwd"), netns_factory.add_netns("be")
    netns_factory.veth(fwd_ns, "f0", be, "b0", a_addrs=["fd00:1::1/64"], b_addrs=[f"{FIRST}/64"])
    netns_factory.settle()
    fwd_ns.set_sysctl("net.ipv6.neigh.f0.retrans_time_ms", 100)  # a retried probe comes soon
    path = tmp_path / "forwarder.toml"
    path.write_text(config_text(impl, [FIRST]))
    cache = NeighbourCache([FIRST], refresh_s=5.0, retry_s=0.05)

    # `replan` builds its plan in a thread: hold it there until the background refresh has
    # resolved the added backend (its host takes the address only now, so the reload's own
    # refresh, before, cannot have found it).
    def plan_engine_once_resolved(config: ForwarderConfig, *args: Any, **kw: Any) -> Any:
        be.ip("-6", "addr", "add", f"{ADDED}/64", "dev", "b0", "nodad")
        deadline = time.monotonic() + 10.0
        while not (link := cache.link(ADDED)) or not link.resolved:
            assert time.monotonic() < deadline, cache.links()
            time.sleep(0.01)
        return plan_engine(config, *args, **kw)

    async def scenario() -> None:
        config = load_config(path)
        fwd = Forwarder(config, make_engine(config), [], neighbours=cache, config_path=path)
        background = asyncio.ensure_future(cache.run(fwd._on_links))
        try:
            deadline = time.monotonic() + 10.0
            while backend_link(fwd, FIRST) is None:
                assert time.monotonic() < deadline, cache.links()
                await asyncio.sleep(0.02)
            path.write_text(config_text(impl, [FIRST, ADDED]))
            monkeypatch.setattr(forwarder.control, "plan_engine", plan_engine_once_resolved)
            answer = await reload_config(fwd)
            assert answer["applied"], answer
            link = cache.link(ADDED)
            assert link is not None and link.resolved
            ifindex, _src, dst_mac, _mtu = backend_link(fwd, ADDED) or (0, b"", b"", 0)
            assert (ifindex, dst_mac) == (link.ifindex, link.dst_mac), cache.links()
        finally:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)

    with fwd_ns.entered():
        asyncio.run(scenario())
