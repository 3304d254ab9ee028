"""Health checks and config reload without I/O: the rise/fall state machine with an injected
clock, what the plan makes of down and dead backends, the probes against loopback servers, and
a forwarder (Python engine, no rings) taking check results and reloaded config files."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import tomllib
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import ForwarderConfig, parse_config
from forwarder.core import to_tuple
from forwarder.health import (
    HealthMonitor,
    Hysteresis,
    Status,
    Target,
    apply_health,
    check_http,
    check_tcp,
    targets_of,
)
from forwarder.reload import describe, merge, reload_config
from forwarder.service import Forwarder, make_engine, plan_engine

VIP = "192.0.2.10"
B = [f"fd00:b::{n}" for n in range(1, 6)]


def config_text(backends: list[str], *, health: str = "", extra: str = "") -> str:
    text = f'pop = "t"\ninterfaces = ["veth0"]\nsource_ipv6 = "fd00::10"\nimpl = "python"\n{extra}'
    text += "[flow_table]\ncapacity = 4096\n"
    if health:
        text += f"[health]\n{health}\n"
    for port, proto in ((80, "tcp"), (53, "udp")):
        text += f'[[vip]]\naddress = "{VIP}"\nport = {port}\nprotocol = "{proto}"\n'
        text += "maglev_size = 1031\n"
        for b in backends:
            text += f'[[vip.backend]]\naddress = "{b}"\ncheck_address = "10.3.0.{b[-1]}"\n'
    return text


def config(backends: list[str], **kw: str) -> ForwarderConfig:
    return parse_config(tomllib.loads(config_text(backends, **kw)))


HEALTH = 'kind = "tcp"\ninterval_ms = 100\ntimeout_ms = 50\nrise = 2\nfall = 3\nport = 8080\n'
HEALTH += "repin_after_ms = 1000"


def key(port: int, proto: int, backend: str) -> tuple[tuple[bytes, int, int], bytes]:
    vip = (ipaddress.IPv4Address(VIP).packed, port, proto)
    return vip, ipaddress.IPv6Address(backend).packed


# --- the state machine ---------------------------------------------------------------------------


def test_fall_failures_in_a_row_take_it_down() -> None:
    h = Hysteresis(rise=2, fall=3, repin_after_ms=1000, now_ms=0)
    assert h.status is Status.HEALTHY  # starts healthy: no outage at start-up
    assert [h.observe(ok, t) for t, ok in enumerate([False, False, True, False, False])] == [
        None
    ] * 5
    assert h.observe(False, 5) is Status.DOWN
    assert h.since_ms == 5


def test_rise_successes_in_a_row_bring_it_back() -> None:
    h = Hysteresis(rise=2, fall=1, repin_after_ms=1000, now_ms=0)
    assert h.observe(False, 10) is Status.DOWN
    assert h.observe(True, 20) is None
    assert h.observe(False, 30) is None  # the streak starts over
    assert h.observe(True, 40) is None
    assert h.observe(True, 50) is Status.HEALTHY
    assert h.observe(True, 60) is None and h.status is Status.HEALTHY


def test_down_past_the_grace_is_dead_and_recovers() -> None:
    h = Hysteresis(rise=1, fall=1, repin_after_ms=1000, now_ms=0)
    assert h.observe(False, 100) is Status.DOWN
    assert h.observe(False, 1099) is None
    assert h.observe(False, 1100) is Status.DEAD
    assert h.observe(False, 5000) is None and h.since_ms == 100  # the outage's start
    assert h.observe(True, 5100) is Status.HEALTHY


def test_zero_grace_moves_flows_at_once() -> None:
    h = Hysteresis(rise=1, fall=2, repin_after_ms=0, now_ms=0)
    assert h.observe(False, 1) is None
    assert h.observe(False, 2) is Status.DEAD


# --- the monitor ---------------------------------------------------------------------------------


def test_targets_use_check_address_and_port() -> None:
    targets = targets_of(config(B[:2], health=HEALTH))
    assert targets[key(80, 6, B[0])] == Target(ipaddress.IPv4Address("10.3.0.1"), 8080)
    assert targets[key(53, 17, B[1])] == Target(ipaddress.IPv4Address("10.3.0.2"), 8080)
    no_port = config(B[:1], health=HEALTH.replace("port = 8080\n", ""))
    assert {t.port for t in targets_of(no_port).values()} == {80, 53}  # the VIP's port
    assert targets_of(config(B[:1])) == {}  # no [health]: no checks
    assert str(Target(ipaddress.IPv6Address("fd00::1"), 80)) == "[fd00::1]:80"


def test_monitor_decides_per_target_with_an_injected_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "flowstate.forwarder")
    monitor = HealthMonitor(config(B[:3], health=HEALTH), clock=lambda: 0)
    t1 = Target(ipaddress.IPv4Address("10.3.0.1"), 8080)
    assert monitor.healthy(key(80, 6, B[0])) is True and monitor.down() == frozenset()
    for now in (100, 200, 300):
        monitor.record(t1, "Connection refused", now)
    # One target, both VIPs: the backend is down on each.
    assert monitor.down() == {key(80, 6, B[0]), key(53, 17, B[0])}
    assert monitor.dead() == frozenset() and monitor.healthy(key(53, 17, B[0])) is False
    assert "backend fd00:b::1 DOWN (tcp 10.3.0.1:8080: 3 checks failed" in caplog.text
    assert monitor.record(t1, "Connection refused", 1300) is Status.DEAD
    assert monitor.dead() == monitor.down()
    assert monitor.status(key(80, 6, B[1])) is Status.HEALTHY
    assert monitor.healthy(key(80, 6, "fd00:b::99")) is None  # not configured

    # A reload keeps what is known of unchanged targets; new ones start healthy.
    monitor.configure(config(B[:4], health=HEALTH))
    assert monitor.status(key(80, 6, B[0])) is Status.DEAD
    assert monitor.status(key(80, 6, B[3])) is Status.HEALTHY
    # Another kind of check starts over.
    monitor.configure(config(B[:4], health=HEALTH.replace('"tcp"', '"http"')))
    assert monitor.down() == frozenset()
    monitor.configure(config(B[:4]))  # checks off
    assert monitor.healthy(key(80, 6, B[0])) is None


# --- the plan ------------------------------------------------------------------------------------


def _owners(plan: Any, vip_id: int) -> set[int]:
    entries = array("H")
    entries.frombytes(plan.tables[vip_id])
    return set(entries)


def test_plan_leaves_down_backends_out_and_fails_open() -> None:
    cfg = config(B[:3])
    ids = plan_engine(cfg).backend_ids
    bid = {b: ids[ipaddress.IPv6Address(b).packed] for b in B[:3]}
    plan = plan_engine(cfg, down={key(80, 6, B[0])})
    assert _owners(plan, 0) == {bid[B[1]], bid[B[2]]}
    assert _owners(plan, 1) == set(bid.values())  # the UDP VIP: not down there
    assert plan.vip_usable[0] == sorted(bid.values())  # down, not dead: records still followed
    dead = plan_engine(cfg, plan, dead={key(80, 6, B[0])})
    assert dead.down == plan.down  # kept from the previous plan
    assert bid[B[0]] not in dead.vip_usable[0] and bid[B[0]] in dead.vip_usable[1]
    everything = {key(80, 6, b) for b in B[:3]}
    open_plan = plan_engine(cfg, down=everything, dead=everything)
    assert _owners(open_plan, 0) == set(bid.values())  # all down: checks ignored
    assert open_plan.vip_usable[0] == sorted(bid.values())


def test_reload_keeps_vip_and_backend_ids() -> None:
    first = plan_engine(config(B[:3]))
    reordered = parse_config(tomllib.loads(config_text([B[0], B[2], B[3]])))
    vips = list(reordered.vips)
    vips.reverse()  # the UDP VIP first now
    second = plan_engine(replace(reordered, vips=tuple(vips)), first)
    assert second.vip_ids == first.vip_ids
    for b in (B[0], B[2]):
        ip = ipaddress.IPv6Address(b).packed
        assert second.backend_ids[ip] == first.backend_ids[ip]
    # The removed backend's id is not given to the new one in the same plan.
    new_id = second.backend_ids[ipaddress.IPv6Address(B[3]).packed]
    assert new_id not in first.backend_ids.values()


# --- probes against loopback servers -------------------------------------------------------------


@pytest.fixture
async def http_server() -> AsyncIterator[Callable[[bytes], Awaitable[Target]]]:
    servers: list[asyncio.Server] = []

    async def serve(status_line: bytes) -> Target:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError):  # TCP checks send nothing
                await reader.readuntil(b"\r\n\r\n")
            writer.write(status_line + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        servers.append(server)
        return Target(ipaddress.IPv4Address("127.0.0.1"), server.sockets[0].getsockname()[1])

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_http_check_wants_2xx_or_3xx(http_server: Any) -> None:
    assert await check_http(await http_server(b"HTTP/1.1 200 OK"), "/healthz") is None
    assert await check_http(await http_server(b"HTTP/1.0 302 Found"), "/") is None
    assert await check_http(await http_server(b"HTTP/1.1 503 Busy"), "/") == "HTTP 503"
    assert "not an HTTP answer" in str(await check_http(await http_server(b"SSH-2.0"), "/"))


async def test_tcp_check_and_failures_as_reasons(http_server: Any) -> None:
    target = await http_server(b"HTTP/1.1 200 OK")
    assert await check_tcp(target) is None
    monitor = HealthMonitor(config(B[:1], health=HEALTH))
    assert await monitor.check(target) is None
    closed = Target(target.address, socket_port_closed())
    assert "refused" in str(await monitor.check(closed)).lower()

    async def hangs(_target: Target) -> str | None:
        await asyncio.sleep(10)
        return None

    slow = HealthMonitor(config(B[:1], health=HEALTH), probe=hangs)
    assert await slow.check(target) == "no answer within 50 ms"


def socket_port_closed() -> int:
    """A loopback port nobody listens on (bound and closed again)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- a forwarder taking check results and reloads ------------------------------------------------


def forwarder(cfg: ForwarderConfig, path: Path | None = None) -> Forwarder:
    return Forwarder(cfg, make_engine(cfg), [], config_path=path)


def tcp_flow(port: int) -> tuple[int, bytes, int, bytes, int]:
    return (
        6,
        ipaddress.IPv4Address("10.1.0.2").packed,
        port,
        ipaddress.IPv4Address(VIP).packed,
        80,
    )


def flow_on(fwd: Forwarder, backend: str, start: int = 30000) -> tuple[int, bytes, int, bytes, int]:
    """Install a flow that Maglev gives `backend` (as a SYN would)."""
    bid = fwd.plan.backend_ids[ipaddress.IPv6Address(backend).packed]
    for port in range(start, start + 5000):
        flow = tcp_flow(port)
        h = to_tuple(flow).hash64()
        if fwd.engine.maglev_pick(0, h) == bid:
            fwd.engine.install(flow, bid, 0)
            return flow
    raise AssertionError("no flow found")


async def test_down_then_dead_backend_in_a_forwarder() -> None:
    fwd = forwarder(config(B[:3], health=HEALTH))
    now = [0]
    fwd.health = HealthMonitor(fwd.config, clock=lambda: now[0])
    pinned = flow_on(fwd, B[0])
    bid = fwd.plan.backend_ids[ipaddress.IPv6Address(B[0]).packed]
    t1 = Target(ipaddress.IPv4Address("10.3.0.1"), 8080)
    for now[0] in (100, 200, 300):
        fwd.health.record(t1, "refused", now[0])
    await apply_health(fwd)
    assert bid not in _owners(fwd.plan, 0) and bid not in _owners(fwd.plan, 1)
    assert fwd.engine.lookup(pinned) is not None  # within the grace: still forwarded
    fwd.health.record(t1, "refused", 1300)
    await apply_health(fwd)
    assert fwd.engine.lookup(pinned) is None  # its next packet is looked up and re-pinned
    assert bid not in fwd.core._vips[(pinned[3], 80, 6)].usable
    fwd.engine.install(pinned, bid, 0)  # the backend itself is still known to the engine
    fwd.health.record(t1, None, 1400)
    fwd.health.record(t1, None, 1500)
    await apply_health(fwd)
    assert bid in _owners(fwd.plan, 0) and fwd.plan.down == frozenset()


async def test_reload_applies_backends_and_reports_restart_settings(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text(config_text(B[:3]))
    fwd = forwarder(config(B[:3]), path)
    kept = flow_on(fwd, B[1])
    gone = flow_on(fwd, B[2], start=40000)
    kept_bid = fwd.engine.lookup(kept)
    path.write_text(config_text([B[0], B[1], B[3]], extra="workers = 2\n"))
    answer = await reload_config(fwd)
    assert answer["applied"] and answer["error"] is None
    assert answer["needs_restart"] == ["workers"] and fwd.config.workers == 1
    assert f"tcp {VIP}:80: backend {B[3]} added (active, weight 100)" in answer["changes"]
    assert f"udp {VIP}:53: backend {B[2]} removed" in answer["changes"]
    assert fwd.engine.lookup(kept) == kept_bid  # untouched
    assert fwd.engine.lookup(gone) is None  # its backend is gone
    new_bid = fwd.plan.backend_ids[ipaddress.IPv6Address(B[3]).packed]
    assert new_bid in _owners(fwd.plan, 0)
    assert fwd.configured is fwd.config

    path.write_text(config_text([B[0]]).replace("port = 80", 'port = "80"'))
    plan = fwd.plan
    bad = await reload_config(fwd)
    assert not bad["applied"] and bad["error"] == {
        "field": "vip[0].port",
        "reason": "must be an integer, got a string '80'",
    }
    assert fwd.plan is plan and fwd.engine.lookup(kept) == kept_bid


def test_merge_keeps_restart_settings_and_takes_live_ones() -> None:
    running = config(B[:2])
    text = config_text(B[:3], health=HEALTH).replace('impl = "python"', 'impl = "c"')
    text = text.replace(
        "[flow_table]", "[store]\nlookup_patience_ms = 5\nlookup_deadline_ms = 9\n[flow_table]"
    )
    loaded = parse_config(tomllib.loads(text))
    merged, needs = merge(running, loaded)
    assert needs == ["impl", "store.lookup_deadline_ms"]
    assert str(merged.impl) == "python" and merged.store.lookup_deadline_ms == 5.0
    assert merged.store.lookup_patience_ms == 5.0 and merged.health == loaded.health
    lines = describe(running, merged)
    assert "health.kind changed" in lines and "store.lookup_patience_ms 100.0 -> 5.0" in lines
    assert f"tcp {VIP}:80: backend {B[2]} added (active, weight 100)" in lines


def test_health_gauge_only_for_checked_backends() -> None:
    from forwarder.metrics import render

    def backend(address: str, healthy: bool | None) -> dict[str, Any]:
        return {"address": address, "weight": 100, "state": "active", "healthy": healthy}

    vip = {"vip": f"tcp {VIP}:80", "backends": [backend(B[0], True), backend(B[1], False)]}
    vip["backends"].append(backend(B[2], None))
    text = render("p", [{"worker": 0, "backends": [vip]}]).decode()
    labels = f'pop="p",vip="tcp {VIP}:80",worker="0"'
    assert f'flowstate_backend_healthy{{backend="{B[0]}",{labels}}} 1.0' in text
    assert f'flowstate_backend_healthy{{backend="{B[1]}",{labels}}} 0.0' in text
    assert f'flowstate_backend_healthy{{backend="{B[2]}"' not in text
