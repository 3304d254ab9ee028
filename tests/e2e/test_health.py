"""End to end: backend health checks of a live forwarder in namespaces.

One POP (tests/e2e/pop.py), C data path (Python if the extension is not built), HTTP checks of
each backend's fabric address (its decap address is a seg6local route, not a socket). Killing
b3's HTTP server takes it out of new-flow selection within fall x interval while connections to
the other backends go on; flows pinned to it stay for the re-pin grace and then move (its UDP
server still answers, so the move shows); restarting the server brings it back.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from tests.e2e.conftest import require_netns
from tests.e2e.pop import CLIENT4, REPO, VIP4, Pop, decap_addr
from tests.e2e.test_reload import IMPL, cli, failures, udp_from_ports
from tests.netns import wait_until

pytestmark = pytest.mark.e2e

INTERVAL_MS, TIMEOUT_MS, RISE, FALL, REPIN_AFTER_MS = 200, 150, 2, 3, 4000
#: What a loaded 2-core machine may add to a deadline (process start-up, scheduling).
SLACK_S = 2.5
B3 = decap_addr(3)


class HealthPop(Pop):
    """The standard POP with HTTP health checks of the backends' fabric addresses."""

    def config_text(self, impl: str, backends: list[int]) -> str:
        text = super().config_text(impl, backends)
        for n in backends:
            line = f'address = "{decap_addr(n)}"\n'
            text = text.replace(line, f'{line}check_address = "fd00:3::{20 + n}"\n')
        return text + (
            f'[health]\nkind = "http"\npath = "/"\nport = 80\ninterval_ms = {INTERVAL_MS}\n'
            f"timeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n"
            f"repin_after_ms = {REPIN_AFTER_MS}\n"
        )

    def http_server(self, n: int) -> tuple[subprocess.Popen[str], list[str]]:
        """Backend n's HTTP server and its command (without `ip netns exec NAME`)."""
        for proc in self.backends[n].processes:
            args = [str(a) for a in cast("list[str]", proc.args)]
            if "serve-http" in args:
                return proc, args[4:]
        raise AssertionError(f"b{n} runs no HTTP server")

    def restart_http_server(self, n: int, args: list[str]) -> None:
        proc = self.backends[n].popen(args, env={"PYTHONPATH": str(REPO)})
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"


@pytest.fixture(scope="module")
def pop() -> Iterator[HealthPop]:
    require_netns()
    with HealthPop.running("health", IMPL, backends=3, serving=[1, 2, 3]) as built:
        yield built


def backends_of(pop: Pop) -> dict[str, dict[str, Any]]:
    """`flowstate backends ls` of the IPv4 TCP VIP, by address."""
    listed = cli(pop, "backends", "ls", "--vip", f"{VIP4}:80/tcp", "--json")
    assert listed.returncode == 0, listed.stderr
    return {b["address"]: b for b in json.loads(listed.stdout)["vips"][0]["backends"]}


def health_of(pop: Pop) -> dict[str, bool | None]:
    return {address: b["healthy"] for address, b in backends_of(pop).items()}


def new_flow_slots(pop: Pop, backend: str) -> int:
    """Maglev slots `backend` owns now (0: it takes no new flows)."""
    slots: int = backends_of(pop)[backend]["slots"]
    return slots


def test_checked_backends_start_healthy(pop: HealthPop) -> None:
    assert health_of(pop) == {decap_addr(n): True for n in (1, 2, 3)}
    assert "DOWN" not in pop.log()


def test_a_dead_server_leaves_new_flows_and_its_pinned_flows_move_after_the_grace(
    pop: HealthPop,
) -> None:
    ports = range(43000, 43060)
    before = udp_from_ports(pop, ports)
    assert None not in before.values() and "b3" in before.values(), before
    on_b3 = [p for p, b in before.items() if b == "b3"]
    clients = pop.tool_popen(
        "http-clients", "--vip", VIP4, "--conns", "30", "--requests", "80", "--interval", "0.1"
    )
    server, command = pop.http_server(3)
    try:
        time.sleep(1.0)  # every connection is open and pinned
        pop.backends[3].stop(server)
        killed = time.monotonic()
        assert wait_until(lambda: f"backend {B3} DOWN" in pop.log(), 20, 0.05), pop.log()[-3000:]
        took = time.monotonic() - killed
        assert took < (FALL * INTERVAL_MS + TIMEOUT_MS) / 1000 + SLACK_S, took
        # Within the grace its pinned flows keep going to it (its UDP server is alive).
        grace = udp_from_ports(pop, range(on_b3[0], on_b3[-1] + 1))
        assert {grace[p] for p in on_b3} == {"b3"}, grace
        assert "its pinned flows move" not in pop.log()  # (still within the grace)
        # New flows avoid it: its Maglev slots are gone within fall x interval (+ slack).
        assert wait_until(lambda: new_flow_slots(pop, B3) == 0, 20, 0.05)
        took = time.monotonic() - killed
        assert took < (FALL * INTERVAL_MS + TIMEOUT_MS) / 1000 + SLACK_S, took
        fresh = pop.tool("http-clients", "--vip", VIP4, "--conns", "40")
        assert not failures(fresh), failures(fresh)[:3]
        assert "b3" not in {r["backends"][0] for r in fresh}
        assert health_of(pop)[B3] is False
        # Past the grace the flows pinned to it move to healthy backends, and so do records.
        assert wait_until(lambda: f"flows of backend {B3} dropped" in pop.log(), 20, 0.1)
        after = udp_from_ports(pop, ports)
        for port, backend in before.items():
            if backend == "b3":
                assert after[port] in ("b1", "b2"), (port, after[port])
            else:
                assert after[port] == backend, (port, backend, after[port])
        flows: list[list[object]] = [["udp", CLIENT4, p, VIP4, 53] for p in on_b3]
        moved = [decap_addr(int(str(after[p])[1:])) for p in on_b3]
        assert wait_until(lambda: pop.records(flows) == moved, 10, 0.5), pop.records(flows)
        out, err = clients.communicate(timeout=120)
    finally:
        if clients.poll() is None:
            clients.kill()
    results = json.loads(out)
    # Connections to the other backends never noticed.
    others = [r for r in results if r["backends"] and r["backends"][0] != "b3"]
    assert others and not failures(others), (failures(others)[:3], err[-2000:])
    for r in others:
        assert len(r["backends"]) == 80 and len(set(r["backends"])) == 1, r

    # The server is back: after `rise` passed checks it takes new flows again.
    pop.restart_http_server(3, command)
    restarted = time.monotonic()
    assert wait_until(lambda: f"backend {B3} healthy again" in pop.log(), 20, 0.05)
    assert wait_until(lambda: new_flow_slots(pop, B3) > 0, 20, 0.05)
    took = time.monotonic() - restarted
    assert took < (RISE * INTERVAL_MS) / 1000 + SLACK_S, took
    again = pop.tool("http-clients", "--vip", VIP4, "--conns", "40")
    assert not failures(again) and "b3" in {r["backends"][0] for r in again}
    assert health_of(pop)[B3] is True
