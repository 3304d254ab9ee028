"""deploy/redis-cluster against real redis-server processes, on its own ports.

The module's cluster (base port 7400, or the next free one another live session does not
hold) is shared by the tests below; each calls `up` first (a no-op when it already runs), so
they do not depend on their order. The module's finalizer runs `down`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SCRIPT, ClusterHandle, claim_base_port, cluster_lib, run_script

FIRST_PORT = int(os.environ.get("FLOWSTATE_TEST_SCRIPT_REDIS_PORT", "7400"))


@dataclass(frozen=True)
class Script:
    """deploy/redis-cluster bound to this module's base port."""

    base: int

    @property
    def dir(self) -> Path:
        return Path(f"/tmp/flowstate-redis-{self.base}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_script(*args, "--base-port", str(self.base), check=check)

    def up(self) -> subprocess.CompletedProcess[str]:
        return self.run("up", "--timeout", "60")

    def status(self) -> tuple[int, dict[str, Any]]:
        proc = self.run("status", "--json", check=False)
        return proc.returncode, json.loads(proc.stdout)


def pid_is_redis(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return b"redis-server" in cmd and state != "Z"


def free_port(start: int) -> socket.socket:
    """A listening socket on the first free port from `start` (whose +10000 fits too)."""
    for port in range(start, 55000):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen()
        return s
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def script() -> Iterator[Script]:
    base, lock = claim_base_port(FIRST_PORT, env="FLOWSTATE_TEST_SCRIPT_REDIS_PORT")
    sc = Script(base)
    try:
        sc.run("down")  # we hold the port's lock: anything there is an orphan
        yield sc
    finally:
        sc.run("down", check=False)
        os.close(lock)


# --- without a cluster ------------------------------------------------------------------------


def test_missing_redis_server_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "up", "--dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env={"PATH": str(tmp_path), "HOME": str(tmp_path)},
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "deploy/redis-cluster: redis-server not found: install it with "
        "`apt-get install -y redis-server redis-tools`"
    ]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "command", ["up", "down", "status", "wait", "kill-node", "start-node", None]
)
def test_help(command: str | None) -> None:
    args = [command, "--help"] if command else ["--help"]
    proc = run_script(*args)
    assert proc.stdout.startswith("usage: ")
    assert "--base-port" in proc.stdout or command is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("up", "--nodes", "4"), "too few"),
        (("up", "--base-port", "60000"), "must fit in 65535"),
        (("kill-node", "0", "--signal", "NOPE"), "unknown signal"),
        (("start-node", "0"), "no cluster in"),
    ],
)
def test_bad_input_is_one_line_error(args: tuple[str, ...], message: str) -> None:
    proc = run_script(*args, "--dir", "/tmp/flowstate-redis-test-nonexistent", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_down_without_cluster_is_noop(tmp_path: Path) -> None:
    proc = run_script("down", "--dir", str(tmp_path / "none"))
    assert "nothing to stop" in proc.stdout


@pytest.mark.cluster
def test_port_in_use_is_reported_before_starting_anything(tmp_path: Path) -> None:
    with free_port(FIRST_PORT + 480) as s:
        base = s.getsockname()[1]  # node 0's port, checked first
        proc = run_script("up", "--base-port", str(base), "--dir", str(tmp_path / "c"), check=False)
    assert proc.returncode == 1
    assert f"127.0.0.1:{base} is already in use" in proc.stderr
    assert not (tmp_path / "c").exists()


# --- with the script's own cluster -------------------------------------------------------------


@pytest.mark.cluster
def test_up_returns_a_healthy_cluster(script: Script) -> None:
    proc = script.up()
    assert "cluster healthy" in proc.stdout or "already up" in proc.stdout
    roles = []
    for i in range(6):
        with cluster_lib.Client("127.0.0.1", script.base + i) as c:
            info = cluster_lib.parse_info(c.text("CLUSTER", "INFO"))
            assert info["cluster_state"] == "ok"
            assert info["cluster_slots_assigned"] == info["cluster_slots_ok"] == "16384"
            assert info["cluster_known_nodes"] == "6"
            role = c.call("ROLE")
            assert isinstance(role, list) and isinstance(role[0], bytes)
            roles.append(role[0].decode())
    assert sorted(roles) == ["master"] * 3 + ["slave"] * 3

    rc, st = script.status()
    assert rc == 0 and st["healthy"] is True and st["cluster_state"] == "ok"
    assert st["seeds"] == [f"127.0.0.1:{script.base + i}" for i in range(6)]
    assert [n["alive"] for n in st["nodes"]] == [True] * 6
    assert sorted(n["role"] for n in st["nodes"]) == ["master"] * 3 + ["replica"] * 3


@pytest.mark.cluster
def test_up_again_is_a_noop(script: Script) -> None:
    script.up()
    before = [n["pid"] for n in script.status()[1]["nodes"]]
    start = time.monotonic()
    proc = script.up()
    assert proc.stdout.startswith("already up")
    assert time.monotonic() - start < 5
    assert [n["pid"] for n in script.status()[1]["nodes"]] == before


@pytest.mark.cluster
def test_up_refuses_a_different_layout_in_the_same_dir(script: Script) -> None:
    script.up()
    proc = script.run("up", "--password", "other", check=False)
    assert proc.returncode == 1
    assert "holds a different cluster" in proc.stderr and "password" in proc.stderr
    assert "down" in proc.stderr


@pytest.mark.cluster
def test_status_text(script: Script) -> None:
    script.up()
    proc = script.run("status")
    lines = proc.stdout.splitlines()
    assert len(lines) == 7
    assert lines[0].startswith(f"node 0  127.0.0.1:{script.base}")
    assert "alive" in lines[0]
    assert lines[-1] == "cluster_state: ok  healthy: yes"


@pytest.mark.cluster
def test_up_restarts_dead_nodes_of_a_half_alive_cluster(script: Script) -> None:
    script.up()
    replica = next(n["index"] for n in script.status()[1]["nodes"] if n["role"] == "replica")
    script.run("kill-node", str(replica))
    rc, st = script.status()
    assert rc == 1 and st["nodes"][replica]["alive"] is False
    proc = script.up()
    assert f"restarted dead node {replica}" in proc.stdout
    assert script.status()[0] == 0


@pytest.mark.cluster
def test_stopped_node_is_unhealthy_until_resumed(script: Script) -> None:
    script.up()
    script.run("kill-node", "1", "--signal", "STOP")
    try:
        rc, st = script.status()
        assert rc == 1 and st["nodes"][1]["stopped"] is True
        assert "stopped" in st["reason"]
    finally:
        proc = script.run("start-node", "1")
    assert "resumed" in proc.stdout
    assert script.status()[0] == 0


@pytest.mark.cluster
def test_master_failover_and_rejoin(script: Script) -> None:
    script.up()
    nodes = script.status()[1]["nodes"]
    master = next(n for n in nodes if n["role"] == "master")
    replica = next(n for n in nodes if n["master_id"] == master["id"])
    script.run("kill-node", str(master["index"]))
    deadline = time.monotonic() + 20
    while script.status()[1]["nodes"][replica["index"]]["role"] != "master":
        assert time.monotonic() < deadline, "replica was not promoted"
        time.sleep(0.2)
    script.run("start-node", str(master["index"]))
    rc, st = script.status()
    assert rc == 0
    assert st["nodes"][master["index"]]["role"] == "replica"
    assert st["nodes"][master["index"]]["master_id"] == replica["id"]


@pytest.mark.cluster
def test_down_stops_every_node_and_removes_the_dir(script: Script) -> None:
    script.up()
    pids = [n["pid"] for n in script.status()[1]["nodes"]]
    assert all(pid_is_redis(p) for p in pids)
    proc = script.run("down")
    assert "stopped 6 redis-server(s)" in proc.stdout
    assert not script.dir.exists()
    assert not any(pid_is_redis(p) for p in pids)
    assert "nothing to stop" in script.run("down").stdout
    assert script.status()[0] == 1


# --- the session fixture -----------------------------------------------------------------------


def test_fixture_cluster_serves_writes_and_flushall(redis_cluster: ClusterHandle) -> None:
    from redis.cluster import ClusterNode, RedisCluster

    assert len(redis_cluster.seeds) == 6 or not redis_cluster.managed
    rc = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.seeds],
        password=redis_cluster.password or None,
    )
    try:
        keys = [f"fixture-test-{i}" for i in range(50)]  # spread over every master
        for k in keys:
            rc.set(k, b"v")
        assert all(rc.get(k) == b"v" for k in keys)
        redis_cluster.flushall()
        assert not any(rc.exists(k) for k in keys)
    finally:
        rc.close()


def test_fixture_kill_and_restart_a_replica(redis_cluster: ClusterHandle) -> None:
    nodes = redis_cluster.status()["nodes"]
    replica = next(n["index"] for n in nodes if n["role"] == "replica")
    redis_cluster.kill_node(replica)
    assert redis_cluster.status()["nodes"][replica]["alive"] is False
    redis_cluster.restart_node(replica)
    assert redis_cluster.status()["healthy"] is True
