"""End to end: the `flowstate` CLI against a live forwarder and a real Redis Cluster.

One POP (tests/e2e/pop.py) with the C data path (Python if the extension is not built); the CLI
runs inside the forwarder's namespace, as an operator on that host would run it. Checks that
what get/ls/count/explain say agrees with the traffic that was sent, that `backends drain` stops
new flows while open connections complete, stats and /metrics, the socket's mode, and that bad
input ends with one line and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from flowstate.flow import FiveTuple
from forwarder.fastpath import c_engine_available
from tests.e2e.conftest import require_netns
from tests.e2e.pop import (
    CLIENT6,
    REDIS_HOST,
    REDIS_PASSWORD,
    REDIS_PORT,
    REPO,
    VIP4,
    VIP6,
    Pop,
    decap_addr,
    failures,
)
from tests.netns import wait_until

pytestmark = pytest.mark.e2e

METRICS = "127.0.0.1:9412"
BACKEND_OF = {f"b{n}": decap_addr(n) for n in range(1, 5)}
B3 = decap_addr(3)


class CliPop(Pop):
    """The standard POP with the metrics endpoint on (inside the forwarder's namespace)."""

    workers = 1

    def config_text(self, impl: str, backends: list[int]) -> str:
        text = super().config_text(impl, backends)
        text = text.replace('metrics = ""', f'metrics = "{METRICS}"')
        return text.replace("\n[store]\n", f"\nworkers = {self.workers}\n[store]\n", 1)


@pytest.fixture(scope="module")
def pop() -> Iterator[Pop]:
    require_netns()
    impl = "c" if c_engine_available() else "python"
    with CliPop.running("cli", impl, backends=3, serving=[1, 2, 3]) as built:
        yield built


def cli(p: Pop, *args: str, socket: bool = True) -> subprocess.CompletedProcess[str]:
    """`flowstate ARGS` in the forwarder's namespace, cluster settings from the environment
    (and this POP's control socket for the commands that talk to the forwarder)."""
    env = {
        "PYTHONPATH": str(REPO),
        "FLOWSTATE_REDIS_SEEDS": ",".join(f"{REDIS_HOST}:{REDIS_PORT + i}" for i in range(3)),
        "FLOWSTATE_REDIS_PASSWORD": REDIS_PASSWORD,
    }
    extra = ["--socket", str(p.workdir / "ctl.sock")] if socket and args[0] != "flows" else []
    return p.fwd.run(
        [sys.executable, "-m", "flowstate.cli", *args, *extra], env=env, check=False, timeout=60
    )


def ok_json(p: Pop, *args: str) -> Any:
    result = cli(p, *args, "--json")
    assert result.returncode == 0, (args, result.stderr, p.log()[-2000:])
    return json.loads(result.stdout)


def test_control_socket_is_private(pop: Pop) -> None:
    mode = os.stat(pop.workdir / "ctl.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_get_ls_count_explain_agree_with_the_traffic(pop: Pop) -> None:
    # UDP to the IPv6 VIP: no other test here sends it, and UDP records keep their full TTL.
    results = pop.tool("udp-clients", "--vip", VIP6, "--flows", "40", "--datagrams", "2")
    assert not failures(results), failures(results)[:3]
    sent = {r["port"]: BACKEND_OF[r["backends"][0]] for r in results}
    keys = {
        "fs1:" + FiveTuple.make("udp", CLIENT6, port, VIP6, 53).digest().hex(): backend
        for port, backend in sent.items()
    }

    def pinned() -> bool:  # pins are written asynchronously, in batches
        return ok_json(pop, "flows", "count", "--vip", VIP6)["count"] >= len(sent)

    assert wait_until(pinned, 10, 0.5)
    # First what needs the local table (UDP entries idle out after 30 s), then the scans.
    for port, backend in list(sent.items())[-3:]:  # the most recent: longest to live
        flow = ["udp", CLIENT6, str(port), VIP6, "53"]
        got = ok_json(pop, "flows", "get", CLIENT6, str(port), VIP6, "53", "udp")
        assert got["found"] and got["record"]["backend"] == backend
        assert got["record"]["pop"] == "pop1" and got["record"]["ttl_ms"] > 0
        assert got["master"].startswith(f"{REDIS_HOST}:") and 0 <= got["slot"] < 16384
        explained = ok_json(pop, "explain", CLIENT6, str(port), VIP6, "53", "udp")
        assert explained["local"][0]["backend"] == backend, explained
        assert explained["store"]["backend"] == backend
        assert explained["decision"]["backend"] == backend
        assert explained["decision"]["layer"] == "local"
        assert explained["decision"]["why"].startswith(f"Local table hit → {backend}; store agrees")
        # Nothing changed since the flows started: Maglev agrees as well.
        assert explained["maglev"] == backend and explained["forwarder_maglev"] == backend
        text = cli(pop, "explain", *flow[1:], "udp")
        assert text.returncode == 0 and f"next      {backend} (local)" in text.stdout

    count = ok_json(pop, "flows", "count", "--vip", VIP6, "--by", "backend")
    assert count["count"] == len(sent) and count["bad_records"] == 0
    assert count["groups"] == dict(Counter(sent.values()))

    listed = cli(pop, "flows", "ls", "--vip", VIP6, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["key"]: r["backend"] for r in rows} == keys
    assert {r["pop"] for r in rows} == {"pop1"} and all(r["ttl_ms"] > 0 for r in rows)
    human = cli(pop, "flows", "ls", "--vip", VIP6, "--backend", B3, "--limit", "3")
    assert human.returncode == 0 and human.stdout.startswith("KEY ")
    assert len(human.stdout.splitlines()) == 1 + min(3, Counter(sent.values())[B3])

    absent = cli(pop, "flows", "get", CLIENT6, "9", VIP6, "53", "udp")
    assert absent.returncode == 1 and "record    none" in absent.stdout


def test_drain_stops_new_flows_while_open_connections_complete(pop: Pop) -> None:
    clients = pop.tool_popen(
        "http-clients", "--vip", VIP4, "--conns", "30", "--requests", "25", "--interval", "0.2"
    )
    try:
        time.sleep(1.5)  # every connection is open and pinned
        drained = cli(pop, "backends", "drain", B3, "--vip", f"{VIP4}:80/tcp")
        assert drained.returncode == 0, drained.stderr
        assert f"{B3} on tcp {VIP4}:80: draining" in drained.stdout
        listing = ok_json(pop, "backends", "ls")
        states = {(v["vip"], b["address"]): b for v in listing["vips"] for b in v["backends"]}
        assert states[(f"tcp {VIP4}:80", B3)]["state"] == "draining"
        assert states[(f"tcp {VIP4}:80", B3)]["slots"] == 0
        assert states[(f"tcp [{VIP6}]:80", B3)]["state"] == "active"  # another VIP: untouched
        human = cli(pop, "backends", "ls", "--vip", VIP4)
        assert "draining*" in human.stdout and "changed at runtime" in human.stdout
        fresh = pop.tool("http-clients", "--vip", VIP4, "--conns", "60")
        assert not failures(fresh), failures(fresh)[:3]
        assert "b3" not in {r["backends"][0] for r in fresh}
        out, err = clients.communicate(timeout=60)
    finally:
        if clients.poll() is None:
            clients.kill()
    results = json.loads(out)
    assert not failures(results), (failures(results)[:3], err[-2000:])
    for r in results:
        assert len(r["backends"]) == 25 and len(set(r["backends"])) == 1, r
    assert any(r["backends"][0] == "b3" for r in results)  # drained, yet completed

    undrained = cli(pop, "backends", "undrain", B3)
    assert undrained.returncode == 0, undrained.stderr
    again = pop.tool("http-clients", "--vip", VIP4, "--conns", "40")
    assert not failures(again) and "b3" in {r["backends"][0] for r in again}
    assert "changed at runtime" not in cli(pop, "backends", "ls").stdout


def test_weight_zero_takes_no_new_flows(pop: Pop) -> None:
    try:
        ok_json(pop, "backends", "weight", decap_addr(1), "0", "--vip", f"{VIP4}:53/udp")
        results = pop.tool("udp-clients", "--vip", VIP4, "--flows", "60", "--datagrams", "1")
        assert not failures(results)
        assert "b1" not in {r["backends"][0] for r in results}
    finally:
        ok_json(pop, "backends", "weight", decap_addr(1), "100")


def test_stats_and_metrics_count_the_traffic(pop: Pop) -> None:
    # Keep-alive connections sending for 3 s: the two samples fall inside the traffic.
    traffic = pop.tool_popen(
        "http-clients", "--vip", VIP4, "--conns", "10", "--requests", "30", "--interval", "0.1"
    )
    try:
        time.sleep(0.8)
        stats = ok_json(pop, "stats", "--interval", "1")
        traffic.communicate(timeout=60)
    finally:
        if traffic.poll() is None:
            traffic.kill()
    s = stats["summary"]
    assert s["pop"] == "pop1" and s["workers"] == 1 and s["store_connected"]
    assert s["rates"]["packets"] > 0 and s["hits"] > 0 and s["new"] > 0
    assert s["store_latency"]["pin"]["calls"] > 0
    assert s["store_latency"]["pin"]["p50_s"] is not None
    human = cli(pop, "stats", "--interval", "0.2")
    assert human.returncode == 0 and " pps" in human.stdout and "fallbacks" in human.stdout

    fetch = (
        "import urllib.request,sys;"
        f"sys.stdout.write(urllib.request.urlopen('http://{METRICS}/metrics').read().decode())"
    )
    text = pop.fwd.run([sys.executable, "-c", fetch]).stdout
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['flowstate_packets_total{pop="pop1",verdict="forward",worker="0"}'] > 0
    assert values['flowstate_store_latency_seconds_count{op="pin",pop="pop1",worker="0"}'] > 0
    assert 'flowstate_store_latency_seconds_bucket{le="0.001",op="lookup"' in text
    assert values['flowstate_store_connected{pop="pop1",worker="0"}'] == 1.0


def test_bad_input_gives_one_line_and_non_zero_exit(pop: Pop) -> None:
    cases = [
        (["flows", "get", "10.1.0.999", "1", VIP4, "80"], 2, "not an IPv4 or IPv6 address"),
        (["explain", "10.1.0.2", "1000", "192.0.2.99", "80"], 2, "not a VIP of this forwarder"),
        (["backends", "drain", "fd00:b::99"], 2, "not a backend of any VIP"),
        (["backends", "ls", "--vip", "192.0.2.99"], 2, "no VIP of this forwarder matches"),
    ]
    for args, code, needle in cases:
        result = cli(pop, *args)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    gone = cli(pop, "stats", "--socket", "/nonexistent/ctl.sock", socket=False)
    assert gone.returncode == 1 and gone.stderr.startswith("flowstate: forwarder unreachable")
    assert gone.stderr.count("\n") == 1
    down = cli(pop, "flows", "count", "--seeds", f"{REDIS_HOST}:1")
    assert down.returncode == 1 and down.stderr.startswith("flowstate: cluster unreachable")
    assert down.stderr.count("\n") == 1


def test_a_second_forwarder_refuses_the_socket(pop: Pop) -> None:
    env = {"FLOWSTATE_E2E_REDIS_PASSWORD": REDIS_PASSWORD, "PYTHONPATH": str(REPO)}
    second = pop.fwd.run(
        [sys.executable, "-m", "forwarder.daemon", "--config", str(pop.workdir / "forwarder.toml"),
         "--keep-offloads"],
        env=env, check=False, timeout=60,
    )  # fmt: skip
    assert second.returncode != 0
    assert "in use by a running forwarder (POP pop1" in second.stderr
    assert not pop.forwarder_died()
    assert ok_json(pop, "backends", "ls")["pop"] == "pop1"  # the first one still answers


def test_two_workers_answer_as_one_forwarder(pop: Pop) -> None:
    """Worker 0 serves the socket and fans stats and changes out to worker 1 (last test: it
    leaves the forwarder running with two workers)."""
    assert isinstance(pop, CliPop)
    impl = "c" if c_engine_available() else "python"
    pop.stop_forwarder()
    pop.workers = 2
    pop.start_forwarder(impl, backends=[1, 2, 3])
    assert wait_until(lambda: pop.log().count("control API on") == 2, 10), pop.log()[-2000:]
    stats = ok_json(pop, "stats", "--interval", "0.2")["stats"]
    assert sorted(w["worker"] for w in stats["workers"]) == [0, 1] and stats["errors"] == []
    assert len({w["pid"] for w in stats["workers"]}) == 2
    drained = ok_json(pop, "backends", "drain", B3, "--vip", f"{VIP4}:80")
    assert sorted(drained["workers"]) == [0, 1] and drained["errors"] == []
    try:
        fresh = pop.tool("http-clients", "--vip", VIP4, "--conns", "60")
        assert not failures(fresh) and "b3" not in {r["backends"][0] for r in fresh}
        after = ok_json(pop, "stats", "--interval", "0.2")["stats"]["workers"]
        assert all(w["engine"]["new"] > 0 for w in after)  # both workers took some of them
    finally:
        ok_json(pop, "backends", "undrain", B3)
