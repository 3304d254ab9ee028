"""End to end: a backend drained with the CLI stays drained across a reload (SIGHUP) and a
restart of the forwarder, until undrained (forwarder.overrides, `[control] state_file`).

One POP (tests/e2e/pop.py) with two workers (the control API's worker 0 fans the drain out and
alone writes the state file; both read it at start and reload), C data path (Python if the
extension is not built). Adds no backend: the backends configured never change here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from forwarder.fastpath import c_engine_available
from tests.e2e.conftest import require_netns
from tests.e2e.pop import VIP4, VIP6, Pop, decap_addr, failures
from tests.netns import wait_until

pytestmark = pytest.mark.e2e

IMPL = "c" if c_engine_available() else "python"
B3 = decap_addr(3)
SERVING = [1, 2, 3]


class OverridesPop(Pop):
    """The standard POP with two workers."""

    def config_text(self, impl: str, backends: list[int]) -> str:
        text = super().config_text(impl, backends)
        return text.replace("\n[store]\n", "\nworkers = 2\n[store]\n", 1)


@pytest.fixture(scope="module")
def pop() -> Iterator[OverridesPop]:
    require_netns()
    with OverridesPop.running("ovr", IMPL, backends=3, serving=SERVING) as built:
        assert wait_until(lambda: built.log().count("control API on") == 2, 20), built.log()
        yield built


def cli(pop: Pop, *args: str, socket: str = "ctl.sock") -> Any:
    return pop.cli(*args, socket=pop.workdir / socket)


def states(pop: Pop, socket: str = "ctl.sock") -> dict[tuple[str, str], tuple[str, str]]:
    """(VIP, backend) -> (state, configured state), as one worker answers `backends ls`."""
    listed = cli(pop, "backends", "ls", "--json", socket=socket)
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    return {
        (v["vip"], b["address"]): (b["state"], b["configured_state"])
        for v in doc["vips"]
        for b in v["backends"]
    }


def new_flows_backends(pop: Pop) -> set[str]:
    fresh = pop.tool("http-clients", "--vip", VIP4, "--conns", "60")
    assert not failures(fresh), failures(fresh)[:3]
    return {r["backends"][0] for r in fresh}


def test_drain_survives_reload_and_restart_until_undrained(pop: OverridesPop) -> None:
    state_file = pop.workdir / "state" / "backends.json"
    assert "b3" in new_flows_backends(pop)  # b3 takes new flows before the drain
    clients = pop.tool_popen(
        "http-clients", "--vip", VIP4, "--conns", "30", "--requests", "40", "--interval", "0.2"
    )
    try:
        time.sleep(1.5)  # every connection is open and pinned
        drained = cli(pop, "backends", "drain", B3)
        assert drained.returncode == 0, drained.stderr
        assert f"{B3} on tcp {VIP4}:80: draining" in drained.stdout
        saved = json.loads(state_file.read_text())["overrides"]
        kept = {(o["vip"]["address"], o["vip"]["port"], o["backend"], o["state"]) for o in saved}
        assert {(VIP4, 80, B3, "draining"), (VIP6, 80, B3, "draining")} <= kept

        # A reload of the unchanged file (SIGHUP to the supervisor, passed on to both workers).
        before = len(pop.log())
        lines = pop.reload_forwarder(IMPL, SERVING)
        assert wait_until(lambda: pop.log()[before:].count(" applied (") == 2, 30), pop.log()
        assert "backend" not in lines, lines  # the drain is no change for the reload
        for socket in ("ctl.sock", "ctl.sock.1"):
            assert states(pop, socket)[(f"tcp {VIP4}:80", B3)] == ("draining", "active")
        human = cli(pop, "backends", "ls", "--vip", VIP4)
        assert "draining*" in human.stdout and f"kept in {state_file}" in human.stdout
        assert f"{B3} on tcp {VIP4}:80: the config file says active" in human.stdout
        assert "b3" not in new_flows_backends(pop)
        out, err = clients.communicate(timeout=120)
    finally:
        if clients.poll() is None:
            clients.kill()
    results = json.loads(out)
    assert not failures(results), (failures(results)[:3], err[-2000:], pop.log()[-2000:])
    for r in results:  # no open connection moved by the drain or the reload
        assert len(r["backends"]) == 40 and len(set(r["backends"])) == 1, r
    assert any(r["backends"][0] == "b3" for r in results)  # drained, yet completed

    # A restart: both workers read the drain back before forwarding.
    pop.stop_forwarder()
    pop.start_forwarder(IMPL, SERVING)
    assert wait_until(lambda: pop.log().count("control API on") == 2, 20), pop.log()[-2000:]
    assert f"backend {B3} of tcp {VIP4}:80 runs with state draining (runtime override)" in (
        pop.log()
    )
    for socket in ("ctl.sock", "ctl.sock.1"):
        assert states(pop, socket)[(f"tcp {VIP4}:80", B3)] == ("draining", "active")
    assert "b3" not in new_flows_backends(pop)

    undrained = cli(pop, "backends", "undrain", B3)
    assert undrained.returncode == 0, undrained.stderr
    assert json.loads(state_file.read_text())["overrides"] == []
    assert "b3" in new_flows_backends(pop)
    listing = cli(pop, "backends", "ls")
    assert listing.returncode == 0 and "changed at runtime" not in listing.stdout


def test_a_corrupt_state_file_is_set_aside_and_the_forwarder_forwards(pop: OverridesPop) -> None:
    state_file = pop.workdir / "state" / "backends.json"
    drained = cli(pop, "backends", "drain", B3, "--vip", f"{VIP4}:80/tcp")
    assert drained.returncode == 0, drained.stderr
    pop.stop_forwarder()
    state_file.write_text('{"version": 1, "overrides": [')  # torn, by hand or a bad disk
    pop.start_forwarder(IMPL, SERVING)
    assert wait_until(lambda: pop.log().count("control API on") == 2, 20), pop.log()[-2000:]
    assert "is unusable" in pop.log() and "going on with no runtime overrides" in pop.log()
    bad = state_file.with_name("backends.json.bad")
    assert bad.read_text() == '{"version": 1, "overrides": ['
    assert states(pop)[(f"tcp {VIP4}:80", B3)] == ("active", "active")
    assert "b3" in new_flows_backends(pop)  # forwarding, with the config's states
