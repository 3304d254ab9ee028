"""The control API served by a real `Forwarder` (Python or C engine, in-process store, no rings).

Covers the protocol, socket ownership (mode 0600, stale file, refusing a live one), runtime
drain/undrain/weight through the start-up planning path, the store latency hook and /metrics.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowstate.control_client import ControlClient, ControlError, ControlUnavailable, VipSelector
from flowstate.flow import FiveTuple
from flowstate.record import FlowRecord
from flowstate.store import MemoryStore
from forwarder.config import ForwarderConfig, parse_config
from forwarder.control import Operations, socket_in_use, worker_socket
from forwarder.fastpath import c_engine_available
from forwarder.metrics import MetricsServer, quantile, render
from forwarder.service import Forwarder, make_engine, monotonic_ms

IMPLS = ["python"] + (["c"] if c_engine_available() else [])
B1, B2, B3 = "2001:db8:b::1", "2001:db8:b::2", "2001:db8:b::3"
VIP = "192.0.2.10"


def make_config(tmp_path: Path, impl: str = "python", workers: int = 1) -> ForwarderConfig:
    backends = [{"address": B1}, {"address": B2}, {"address": B3, "weight": 200}]
    vips = [
        {"address": VIP, "port": 80, "protocol": "tcp", "maglev_size": 251, "backend": backends},
        {"address": VIP, "port": 53, "protocol": "udp", "maglev_size": 251, "backend": backends},
    ]
    return parse_config(
        {
            "pop": "pop1",
            "interfaces": ["eth0"],
            "source_ipv6": "2001:db8:f0::1",
            "impl": impl,
            "workers": workers,
            "control": {
                "socket": str(tmp_path / "ctl.sock"),
                "metrics": "",
                "state_file": str(tmp_path / "state" / "backends.json"),
            },
            "vip": vips,
        }
    )


class Running:
    def __init__(self, fwd: Forwarder, task: asyncio.Task[None]) -> None:
        self.fwd = fwd
        self.task = task

    @property
    def path(self) -> Path:
        return self.fwd.config.control.socket

    async def client(self) -> ControlClient:
        return await ControlClient.connect(self.path)


async def start(config: ForwarderConfig, worker: int = 0) -> Running:
    fwd = Forwarder(config, make_engine(config), [], store=MemoryStore(), worker=worker)
    fwd.operations = True
    task = asyncio.get_running_loop().create_task(fwd.run())
    path = worker_socket(config.control.socket, worker)
    for _ in range(300):
        if task.done():
            task.result()  # raises what stopped it
        try:
            async with await ControlClient.connect(path, timeout=1.0) as c:
                await c.ping()
                break
        except ControlUnavailable:
            await asyncio.sleep(0.01)
    return Running(fwd, task)


async def stop(r: Running) -> None:
    r.fwd.stop()
    await r.task


@pytest.fixture(params=IMPLS)
async def running(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    r = await start(make_config(tmp_path, str(request.param)))
    try:
        yield r
    finally:
        await stop(r)


def flow(port: int, proto: str = "tcp", vip_port: int = 80) -> FiveTuple:
    return FiveTuple.make(proto, "198.51.100.7", port, VIP, vip_port)


def flow_t(t: FiveTuple) -> tuple[int, bytes, int, bytes, int]:
    return (int(t.proto), t.client_ip, t.client_port, t.vip_ip, t.vip_port)


def backend_id(r: Running, address: str) -> int:
    return r.fwd.plan.backend_ids[ipaddress.IPv6Address(address).packed]


def picks(r: Running, vip_id: int = 0, n: int = 2000) -> set[int]:
    return {r.fwd.engine.maglev_pick(vip_id, flow(1024 + i).hash64()) for i in range(n)}


# --- the socket ----------------------------------------------------------------------------------


async def test_socket_is_private_and_removed_at_exit(tmp_path: Path) -> None:
    r = await start(make_config(tmp_path))
    mode = os.stat(r.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    await stop(r)
    assert not r.path.exists()


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(config.control.socket))  # bound, never listening, then closed: stale
    dead.close()
    r = await start(config)
    try:
        async with await r.client() as c:
            assert (await c.ping())["pop"] == "pop1"
    finally:
        await stop(r)


async def test_refuses_a_socket_a_live_forwarder_serves(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    r = await start(config)
    try:
        second = Forwarder(config, make_engine(config), [], store=MemoryStore())
        with pytest.raises(OSError) as info:
            await Operations(second).start()
        assert info.value.errno == errno.EADDRINUSE
        assert "in use by a running forwarder (POP pop1" in str(info.value)
        async with await r.client() as c:  # the first one is untouched
            assert (await c.ping())["pid"] == os.getpid()
    finally:
        await stop(r)


async def test_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.control.socket.write_text("precious")
    fwd = Forwarder(config, make_engine(config), [], store=MemoryStore())
    with pytest.raises(OSError, match="not a socket"):
        await Operations(fwd).start()
    assert config.control.socket.read_text() == "precious"


async def test_client_reports_absent_socket(tmp_path: Path) -> None:
    with pytest.raises(ControlUnavailable, match="no forwarder control socket"):
        await ControlClient.connect(tmp_path / "nope.sock")


# --- protocol --------------------------------------------------------------------------------


async def raw(r: Running, line: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(r.path))
    writer.write(line)
    answer: dict[str, Any] = json.loads(await reader.readline())
    writer.close()
    return answer


async def test_bad_requests_get_error_answers(running: Running) -> None:
    assert (await raw(running, b"not json\n"))["error"]["code"] == "bad_request"
    assert (await raw(running, b"[1]\n"))["error"]["code"] == "bad_request"
    answer = await raw(running, b'{"id": 7, "method": "reboot"}\n')
    assert answer["id"] == 7 and answer["error"]["code"] == "unknown_method"
    answer = await raw(running, b'{"id": 8, "method": "flow", "params": {"client_ip": "x"}}\n')
    assert answer["error"]["code"] == "bad_params"
    # The connection survives errors: several requests on one connection.
    async with await running.client() as c:
        with pytest.raises(ControlError) as info:
            await c.call("drain", {"backend": "not-an-address"})
        assert info.value.code == "bad_params"
        assert (await c.ping())["worker"] == 0


async def test_backends_lists_weights_states_and_slots(running: Running) -> None:
    async with await running.client() as c:
        answer = await c.backends()
        assert [v["vip"] for v in answer["vips"]] == [f"tcp {VIP}:80", f"udp {VIP}:53"]
        tcp = answer["vips"][0]
        assert [b["address"] for b in tcp["backends"]] == [B1, B2, B3]
        assert [b["weight"] for b in tcp["backends"]] == [100, 100, 200]
        assert {b["state"] for b in tcp["backends"]} == {"active"}
        assert sum(b["slots"] for b in tcp["backends"]) == tcp["maglev_size"] == 251
        assert tcp["backends"][2]["slots"] > tcp["backends"][0]["slots"]  # weight 200
        only = await c.backends(VipSelector.parse(f"{VIP}:53/udp"))
        assert [v["vip"] for v in only["vips"]] == [f"udp {VIP}:53"]
        with pytest.raises(ControlError) as info:
            await c.backends(VipSelector.parse("192.0.2.99"))
        assert info.value.code == "unknown_vip"


async def test_flow_shows_local_entry_maglev_and_store(running: Running) -> None:
    fwd = running.fwd
    t = flow(40000)
    async with await running.client() as c:
        answer = await c.flow(t)
        assert answer["local"] == [] and answer["store"] == {"status": "absent"}
        maglev_now = answer["maglev"]
        assert maglev_now in (B1, B2, B3)
        fwd.engine.install(flow_t(t), backend_id(running, B2), monotonic_ms())
        rec = FlowRecord.make(B2, VIP, 1234, "pop9")
        assert fwd.store is not None
        await fwd.store.pin_many([(t, rec, 60_000)])
        answer = await c.flow(t)
        (local,) = answer["local"]
        assert local["backend"] == B2 and local["state"] == "established"
        assert 0 < local["expires_in_ms"] <= 300_000
        assert answer["store"]["status"] == "found"
        assert answer["store"]["record"]["backend"] == B2
        assert answer["store"]["record"]["pop"] == "pop9"
        assert 0 < answer["store"]["ttl_ms"] <= 60_000
        with pytest.raises(ControlError) as info:
            await c.flow(FiveTuple.make("tcp", "198.51.100.7", 1, VIP, 8080))
        assert info.value.code == "unknown_vip" and "tcp 192.0.2.10:80" in info.value.message


# --- runtime changes -----------------------------------------------------------------------------


async def test_drain_takes_no_new_flows_but_keeps_pinned_ones(running: Running) -> None:
    fwd, b3 = running.fwd, backend_id(running, B3)
    before_tables = dict(fwd.plan.tables)
    pinned = flow(50000)
    fwd.engine.install(flow_t(pinned), b3, monotonic_ms())
    link = (b"\x02" * 6, b"\x04" * 6, 7, 1500)
    fwd.engine.set_backend(b3, ipaddress.IPv6Address(B3).packed, dst_mac=link[0],
                           src_mac=link[1], ifindex=link[2], mtu=link[3])  # fmt: skip
    link_before = fwd.engine.backend_link(b3)
    assert b3 in picks(running)
    async with await running.client() as c:
        answer = await c.drain(B3, VipSelector.parse(f"tcp {VIP}:80"))
        assert answer["changed"] == [
            {"vip": f"tcp {VIP}:80", "backend": B3, "weight": 200, "state": "draining"}
        ]
        assert answer["workers"] == [0] and answer["errors"] == []
        assert b3 not in picks(running)  # no new flows on the TCP VIP...
        assert b3 in picks(running, vip_id=1)  # ...the UDP VIP was not selected
        entry = fwd.engine.lookup(flow_t(pinned))
        assert entry is not None and entry[0] == b3  # the pinned flow stays
        assert fwd.engine.backend_link(b3) == link_before  # the resolved link survives
        info = (await c.backends(VipSelector.parse(f"{VIP}:80")))["vips"][0]["backends"][2]
        assert info["state"] == "draining" and info["slots"] == 0
        assert info["configured_state"] == "active"
        again = await c.drain(B3, VipSelector.parse(f"tcp {VIP}:80"))
        assert again["changed"] == []  # idempotent
        await c.undrain(B3)
        assert fwd.plan.tables == before_tables  # the same table as at start-up
        answer = await c.set_weight(B1, 0)
        assert len(answer["changed"]) == 2  # both VIPs
        assert backend_id(running, B1) not in picks(running)
        for bad in (-1, 70000):
            with pytest.raises(ControlError) as err:
                await c.set_weight(B1, bad)
            assert err.value.code == "bad_params"
        with pytest.raises(ControlError) as err:
            await c.drain("2001:db8:b::99")
        assert err.value.code == "unknown_backend"
        with pytest.raises(ControlError) as err:
            await c.drain(B1, VipSelector.parse("192.0.2.99"))
        assert err.value.code == "unknown_vip"


async def test_changes_fan_out_to_other_workers(tmp_path: Path) -> None:
    config = make_config(tmp_path, workers=2)
    w0, w1 = await start(config, 0), await start(config, 1)
    try:
        assert worker_socket(config.control.socket, 1).exists()
        async with await w0.client() as c:
            answer = await c.drain(B2)
            assert sorted(answer["workers"]) == [0, 1] and answer["errors"] == []
            stats = await c.stats()
            assert [w["worker"] for w in stats["workers"]] == [0, 1]
        for r in (w0, w1):
            assert backend_id(r, B2) not in picks(r)
    finally:
        await stop(w1)
    async with await w0.client() as c:  # worker 1 gone: reported, not fatal
        stats = await c.stats()
        assert [w["worker"] for w in stats["workers"]] == [0]
        assert stats["errors"][0]["worker"] == 1
    await stop(w0)


# --- stats and metrics ---------------------------------------------------------------------------


async def test_stats_and_store_latency(running: Running) -> None:
    fwd = running.fwd
    assert fwd.store is not None
    await fwd._timed("lookup", fwd.store.lookup_many([flow(1)]))
    async with await running.client() as c:
        stats = await c.stats()
    (w,) = stats["workers"]
    assert stats["pop"] == "pop1" and w["worker"] == 0
    assert "forward" in w["engine"] and "drop_no_route" in w["engine"]
    assert "fallbacks" in w["core"] and w["store"]["connected"] is True
    assert w["store_latency"]["lookup"]["count"] == 1
    assert w["store_latency"]["pin"]["count"] == 0


def test_histogram_quantiles() -> None:
    snap = {"le": [0.001, 0.01, 0.1], "counts": [50, 40, 10, 0], "sum": 0.5, "count": 100}
    assert quantile(snap, 0.5) == pytest.approx(0.001)
    assert quantile(snap, 0.9) == pytest.approx(0.01)
    assert 0.01 < (quantile(snap, 0.95) or 0) < 0.1
    assert quantile({**snap, "counts": [0, 0, 0, 0]}, 0.5) is None
    assert quantile({**snap, "counts": [0, 0, 0, 5]}, 0.5) == 0.1  # +Inf: largest finite bound


async def test_metrics_endpoint(running: Running) -> None:
    ops = Operations(running.fwd)
    ops.latency.observe("pin", 0.003, True)
    ops.latency.observe("pin", 0.2, False)
    server = MetricsServer(ops._gather_metrics)
    await server.start("127.0.0.1", 0)
    try:
        host, port = server.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await reader.read()
        writer.close()
    finally:
        await server.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    packets = families["flowstate_packets"]
    verdicts = {s.labels["verdict"] for s in packets.samples}
    assert {"forward", "new", "miss", "drop_no_route"} <= verdicts
    assert all(s.labels["pop"] == "pop1" for s in packets.samples)
    assert not verdicts & {"flows", "capacity", "tx_bytes", "installs"}  # not verdicts
    latency = families["flowstate_store_latency_seconds"]
    pin_count = [
        s.value for s in latency.samples if s.name.endswith("_count") and s.labels["op"] == "pin"
    ]
    assert pin_count == [2.0]
    failures = families["flowstate_store_call_failures"]
    assert [s.value for s in failures.samples if s.labels["op"] == "pin"] == [1.0]
    assert "flowstate_core_fallbacks" in families
    weights = families["flowstate_backend_weight"]
    assert {s.labels["backend"] for s in weights.samples} == {B1, B2, B3}


def test_render_is_valid_without_workers() -> None:
    assert b"flowstate_packets" in render("pop1", [])


def test_render_exports_the_store_clients_replica_counters() -> None:
    counters = {"masters_failed": 1, "replica_reads": 40, "replica_failures": 2,
                "failed_items": 3, "timeouts": 5}  # fmt: skip
    workers = [
        {"worker": w, "store": {"connected": True, "counters": {**counters, "replica_reads": n}}}
        for w, n in ((0, 40), (1, 7))
    ]
    families = {f.name: f for f in text_string_to_metric_families(render("pop1", workers).decode())}
    for name, value in counters.items():
        fam = families[f"flowstate_store_client_{name}"]
        assert fam.type == "counter"
        got = {s.labels["worker"]: s.value for s in fam.samples if s.name.endswith("_total")}
        assert got == {"0": value, "1": 7 if name == "replica_reads" else value}
    assert (
        "replica answered for a failed master"
        in families["flowstate_store_client_replica_reads"].documentation
    )
    assert families["flowstate_store_client_timeouts"].documentation == "Store client: timeouts"


async def test_socket_in_use_for_the_supervisor(tmp_path: Path) -> None:
    config = make_config(tmp_path, workers=2)
    assert socket_in_use(config.control.socket) is None
    r = await start(config)
    try:
        assert "in use by a running forwarder" in (socket_in_use(config.control.socket) or "")
    finally:
        await stop(r)
    assert socket_in_use(config.control.socket) is None


async def test_metrics_endpoint_other_paths() -> None:
    async def gather() -> tuple[str, list[dict[str, Any]]]:
        return "pop1", []

    server = MetricsServer(gather)
    await server.start("127.0.0.1", 0)
    try:
        host, port = server.addresses[0]
        for request, status in (
            (b"GET /nope HTTP/1.1\r\n\r\n", b"HTTP/1.0 404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.0 405"),
            (b"HEAD /metrics HTTP/1.0\r\n\r\n", b"HTTP/1.0 200"),
            (b"GET /" + b"x" * 70000, b""),  # no end of head within the limit: dropped
        ):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            response = await reader.read()
            writer.close()
            assert response.startswith(status), (request[:20], response[:40])
            if request.startswith(b"HEAD"):
                assert response.endswith(b"\r\n\r\n")  # head only
    finally:
        await server.close()
