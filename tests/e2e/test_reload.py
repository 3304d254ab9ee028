"""End to end: reloading a live forwarder's config (SIGHUP, `flowstate reload`) in namespaces.

One POP (tests/e2e/pop.py), C data path (Python if the extension is not built). Adding a backend
moves no open keep-alive connection and restarts nothing; removing one moves only its flows; an
invalid file keeps the old config running; start-up settings are reported, not applied.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from forwarder.fastpath import c_engine_available
from tests.e2e.conftest import require_netns
from tests.e2e.pop import CLIENT4, VIP4, Pop, decap_addr, failures
from tests.netns import wait_until

pytestmark = pytest.mark.e2e

IMPL = "c" if c_engine_available() else "python"

#: UDP datagrams from fixed client ports (the same flows each run): {port: backend or None}.
UDP_FROM_PORTS = r"""
import json, socket, sys
vip, ports = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]
out = {}
for port in ports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[3], port))
    s.settimeout(2.0)
    s.sendto(b"hello", (vip, 53))
    try:
        out[port] = json.loads(s.recv(2048))["backend"]
    except TimeoutError:
        out[port] = None
    s.close()
print(json.dumps(out))
"""


def udp_from_ports(pop: Pop, ports: range) -> dict[int, str | None]:
    """One datagram per fixed client port to the IPv4 UDP VIP; who answered each."""
    arg = ",".join(str(p) for p in ports)
    out = pop.client.run([sys.executable, "-c", UDP_FROM_PORTS, VIP4, arg, CLIENT4], timeout=120)
    return {int(k): v for k, v in json.loads(out.stdout).items()}


def cli(pop: Pop, *args: str, socket: str = "ctl.sock") -> Any:
    return pop.cli(*args, socket=pop.workdir / socket)


class WorkersPop(Pop):
    """The standard POP with a settable number of workers."""

    workers = 1

    def config_text(self, impl: str, backends: list[int]) -> str:
        text = super().config_text(impl, backends)
        return text.replace("\n[store]\n", f"\nworkers = {self.workers}\n[store]\n", 1)


@pytest.fixture(scope="module")
def pop() -> Iterator[WorkersPop]:
    require_netns()
    with WorkersPop.running("reload", IMPL, backends=4, serving=[1, 2, 3]) as built:
        yield built


def test_adding_a_backend_by_sighup_moves_no_open_connection(pop: Pop) -> None:
    assert pop.forwarder is not None
    pid = pop.forwarder.pid
    clients = pop.tool_popen(
        "http-clients", "--vip", VIP4, "--conns", "30", "--requests", "30", "--interval", "0.1"
    )
    try:
        time.sleep(1.0)  # every connection is open and pinned
        lines = pop.reload_forwarder(IMPL, [1, 2, 3, 4])
        out, err = clients.communicate(timeout=120)
    finally:
        if clients.poll() is None:
            clients.kill()
    assert f"tcp {VIP4}:80: backend {decap_addr(4)} added" in lines, lines
    results = json.loads(out)
    assert not failures(results), (failures(results)[:3], err[-2000:], pop.log()[-2000:])
    # A connection moved by the reload would show two backends, or a reset (b4 has no socket
    # for it). One that a loaded machine opened only after the reload may start on b4.
    for r in results:
        assert len(r["backends"]) == 30 and len(set(r["backends"])) == 1, r
    assert pop.forwarder.pid == pid and not pop.forwarder_died()  # no restart
    assert "counters at exit" not in pop.log()
    fresh = pop.tool("http-clients", "--vip", VIP4, "--conns", "40")
    assert not failures(fresh), failures(fresh)[:3]
    assert "b4" in {r["backends"][0] for r in fresh}


def test_removing_a_backend_moves_only_its_flows(pop: Pop) -> None:
    if pop.forwarder_died():
        pop.start_forwarder(IMPL, [1, 2, 3, 4])
    ports = range(42000, 42080)
    before = udp_from_ports(pop, ports)
    assert None not in before.values() and "b4" in before.values(), before
    lines = pop.reload_forwarder(IMPL, [1, 2, 3])
    assert f"udp {VIP4}:53: backend {decap_addr(4)} removed" in lines, lines
    after = udp_from_ports(pop, ports)
    for port, backend in before.items():
        if backend == "b4":
            assert after[port] in ("b1", "b2", "b3"), (port, after[port])
        else:
            assert after[port] == backend, (port, backend, after[port])  # untouched


def test_invalid_config_keeps_the_old_one_running(pop: WorkersPop) -> None:
    if pop.forwarder_died():
        pop.start_forwarder(IMPL, [1, 2, 3])
    assert pop.forwarder is not None
    pid = pop.forwarder.pid
    good = pop.config_text(IMPL, [1, 2, 3])
    bad = good.replace("port = 80\n", 'port = "80"\n', 1)
    lines = pop.reload_forwarder(IMPL, [], text=bad)
    assert "vip[0].port: must be an integer" in lines and "still running the previous" in lines
    assert pop.forwarder.pid == pid and not pop.forwarder_died()
    results = pop.tool("http-clients", "--vip", VIP4, "--conns", "20")
    assert not failures(results), failures(results)[:3]
    # The CLI names the field and fails; the file is left as it is.
    answer = cli(pop, "reload")
    assert answer.returncode == 1 and "vip[0].port: must be an integer" in answer.stderr
    assert answer.stderr.count("\n") == 1 and "Traceback" not in answer.stderr

    # Start-up settings: reported as needing a restart, the rest applied.
    pop.workers = 2
    try:
        (pop.workdir / "forwarder.toml").write_text(pop.config_text(IMPL, [1, 2]))
    finally:
        pop.workers = 1
    applied = cli(pop, "reload", "--json")
    assert applied.returncode == 0, (applied.stderr, pop.log()[-2000:])
    doc = json.loads(applied.stdout)
    assert doc["applied"] and doc["needs_restart"] == ["workers"] and doc["workers"] == [0]
    assert f"tcp {VIP4}:80: backend {decap_addr(3)} removed" in doc["changes"]
    human = cli(pop, "reload")
    assert human.returncode == 0 and "no changes" in human.stdout
    assert "needs a restart (still running the old value): workers" in human.stdout
    listed = json.loads(cli(pop, "backends", "ls", "--json").stdout)
    assert {b["address"] for b in listed["vips"][0]["backends"]} == {decap_addr(1), decap_addr(2)}
    assert pop.forwarder.pid == pid and os.path.exists(f"/proc/{pid}")


def test_two_workers_reload_as_one_forwarder(pop: WorkersPop) -> None:
    """SIGHUP to the supervisor reaches every worker; the control API's reload fans out (last
    test: it leaves the forwarder running with two workers)."""
    pop.stop_forwarder()
    pop.workers = 2
    pop.start_forwarder(IMPL, backends=[1, 2, 3])
    assert wait_until(lambda: pop.log().count("control API on") == 2, 20), pop.log()[-2000:]
    assert pop.forwarder is not None
    supervisor = pop.forwarder.pid
    pop.reload_forwarder(IMPL, [1, 2, 3, 4])
    assert wait_until(lambda: pop.log().count(" applied (") == 2, 30), pop.log()[-3000:]
    for socket, worker in (("ctl.sock", 0), ("ctl.sock.1", 1)):
        listed = cli(pop, "backends", "ls", "--json", socket=socket)
        assert listed.returncode == 0, listed.stderr
        doc = json.loads(listed.stdout)
        assert doc["worker"] == worker
        assert decap_addr(4) in {b["address"] for b in doc["vips"][0]["backends"]}
    answer = cli(pop, "reload", "--json")
    assert answer.returncode == 0, answer.stderr
    assert sorted(json.loads(answer.stdout)["workers"]) == [0, 1]
    assert pop.forwarder.pid == supervisor and not pop.forwarder_died()
    fresh = pop.tool("http-clients", "--vip", VIP4, "--conns", "60")
    assert not failures(fresh) and "b4" in {r["backends"][0] for r in fresh}
