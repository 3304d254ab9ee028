"""End to end: real TCP and UDP through flowstate-forwarder to decapsulating backends.

Every test runs for both data paths (impl=c and impl=python) on a real namespace topology
(tests/e2e/pop.py) with a real 6-node Redis Cluster inside the fabric.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from forwarder.fastpath import c_engine_available
from tests.e2e.conftest import require_netns
from tests.e2e.pop import CLIENT4, CLIENT6, VIP4, VIP6, WEIGHTS, Pop, decap_addr, failures

pytestmark = pytest.mark.e2e

BACKEND_OF = {f"b{n}": decap_addr(n) for n in WEIGHTS}


@pytest.fixture(scope="module", params=["c", "python"])
def pop(request: pytest.FixtureRequest) -> Iterator[tuple[Pop, str]]:
    require_netns()
    impl = str(request.param)
    if impl == "c" and not c_engine_available():
        pytest.fail("the C fast path is not built (pip install -e .)")
    with Pop.running(f"fwd-{impl}", impl, backends=4, serving=[1, 2, 3]) as built:
        yield built, impl


def ensure_forwarder(pop: Pop, impl: str, backends: list[int]) -> None:
    """(Re)start the forwarder unless it runs with exactly these backends."""
    cfg = pop.workdir / "forwarder.toml"
    wanted = pop.config_text(impl, backends)
    if pop.forwarder_died() or not cfg.exists() or cfg.read_text() != wanted:
        pop.stop_forwarder()
        pop.start_forwarder(impl, backends)


@pytest.mark.parametrize("vip,client", [(VIP4, CLIENT4), (VIP6, CLIENT6)], ids=["ipv4", "ipv6"])
def test_http_requests_reach_the_pinned_backend(
    pop: tuple[Pop, str], vip: str, client: str
) -> None:
    p, impl = pop
    ensure_forwarder(p, impl, [1, 2, 3])
    results = p.tool("http-clients", "--vip", vip, "--conns", "50", "--requests", "4")
    assert not failures(results), (failures(results)[:5], p.log()[-3000:])
    assert sum(len(r["backends"]) for r in results) == 200
    for r in results:
        assert len(set(r["backends"])) == 1, r  # a connection never moves
    # The backend that answered is the one pinned in Redis for that 5-tuple.
    flows = [["tcp", client, r["port"], vip, 80] for r in results]
    stored = p.records(flows)
    for r, backend in zip(results, stored, strict=True):
        assert backend == BACKEND_OF[r["backends"][0]], (r, backend)
    assert {r["backends"][0] for r in results} <= {"b1", "b2", "b3"}


def test_udp_flows_stick_and_follow_weights(pop: tuple[Pop, str]) -> None:
    p, impl = pop
    ensure_forwarder(p, impl, [1, 2, 3])
    results = p.tool("udp-clients", "--vip", VIP4, "--flows", "400", "--datagrams", "2")
    assert not failures(results), failures(results)[:5]
    for r in results:
        assert len(r["backends"]) == 2 and len(set(r["backends"])) == 1, r
    # Weights 100:100:200 → 25 % / 25 % / 50 %. With 400 flows one standard deviation is
    # about 2.2 points (2.5 for the 50 % share); allow 8 points.
    share = Counter(r["backends"][0] for r in results)
    total = sum(WEIGHTS[n] for n in (1, 2, 3))
    for n in (1, 2, 3):
        expected = WEIGHTS[n] / total
        assert abs(share[f"b{n}"] / len(results) - expected) < 0.08, share
    v6 = p.tool("udp-clients", "--vip", VIP6, "--flows", "20", "--datagrams", "3")
    assert not failures(v6) and all(len(set(r["backends"])) == 1 for r in v6)


def test_restart_forwarder_mid_connection(pop: tuple[Pop, str]) -> None:
    p, impl = pop
    ensure_forwarder(p, impl, [1, 2, 3])
    clients = p.tool_popen(
        "http-clients", "--vip", VIP4, "--conns", "20", "--requests", "40", "--interval", "0.1"
    )
    try:
        time.sleep(1.5)
        p.stop_forwarder()
        p.start_forwarder(impl, [1, 2, 3])
        out, err = clients.communicate(timeout=60)
    finally:
        if clients.poll() is None:
            clients.kill()
    results = json.loads(out)
    assert not failures(results), (failures(results)[:5], err[-2000:])
    for r in results:
        assert len(r["backends"]) == 40 and len(set(r["backends"])) == 1, r


def test_adding_a_backend_moves_no_open_connection(pop: tuple[Pop, str]) -> None:
    p, impl = pop
    ensure_forwarder(p, impl, [1, 2, 3])
    clients = p.tool_popen(
        "http-clients", "--vip", VIP4, "--conns", "30", "--requests", "30", "--interval", "0.1"
    )
    try:
        time.sleep(1.0)
        # A new backend changes Maglev's answer for about a fifth of all flows; the open ones
        # must stay where the store pinned them.
        p.stop_forwarder()
        p.start_forwarder(impl, [1, 2, 3, 4])
        out, err = clients.communicate(timeout=60)
    finally:
        if clients.poll() is None:
            clients.kill()
    results = json.loads(out)
    assert not failures(results), (failures(results)[:5], err[-2000:])
    for r in results:
        assert len(set(r["backends"])) == 1, r
        assert r["backends"][0] != "b4"
    # New connections do reach the new backend.
    fresh = p.tool("http-clients", "--vip", VIP4, "--conns", "40")
    assert not failures(fresh)
    assert "b4" in {r["backends"][0] for r in fresh}


def test_vip_frames_are_dropped_after_the_tap(pop: tuple[Pop, str]) -> None:
    """The forwarder installs an nft netdev ingress drop for the VIPs (its ring still gets
    every frame: the requests above went through) and removes it when it stops."""
    p, impl = pop
    ensure_forwarder(p, impl, [1, 2, 3])
    listing = p.fwd.run(["nft", "list", "table", "netdev", "flowstate_f_rt"]).stdout
    assert VIP4 in listing and VIP6 in listing and "drop" in listing
    results = p.tool("http-clients", "--vip", VIP4, "--conns", "5", "--requests", "2")
    assert not failures(results)
    p.stop_forwarder()
    gone = p.fwd.run(["nft", "list", "table", "netdev", "flowstate_f_rt"], check=False)
    assert gone.returncode != 0
