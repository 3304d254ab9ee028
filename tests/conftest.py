"""Shared fixtures: the real Redis Cluster that `cluster` tests run against.

`redis_cluster` starts one 6-node cluster (3 masters, 1 replica each, with a password) per
test session through `deploy/redis-cluster`, so tests exercise exactly what developers and
labs run, and tears it down at session end even if tests fail. Set FLOWSTATE_REDIS_SEEDS
(host:port,...) and FLOWSTATE_REDIS_PASSWORD to use an existing cluster instead.

Concurrent pytest sessions on one machine never share or kill each other's cluster: each
claims its base port with an flock on /tmp/.flowstate-test-session-PORT.lock, held for the
whole session (released by the kernel even on SIGKILL), and moves on by 10 ports if another
live session holds it. `.ci/run` cleans up only clusters whose lock nobody holds.

Without redis-server, `cluster` tests are skipped with the install hint; under CI=true they
fail instead, so CI can never go green by silently skipping them.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "redis-cluster"
#: Password of the session cluster (the default user's requirepass).
TEST_PASSWORD = "flowstate-test"
#: First base port tried for the session cluster (nodes on BASE..BASE+5, bus ports +10000).
TEST_BASE_PORT = int(os.environ.get("FLOWSTATE_TEST_REDIS_PORT", "7300"))
TEST_NODES = 6
#: Lock file a live test session holds for each base port it uses.
SESSION_LOCK = "/tmp/.flowstate-test-session-{port}.lock"


def _load_cluster_lib() -> ModuleType:
    """Import deploy/redis_cluster_lib.py (not a package) as `redis_cluster_lib`."""
    if "redis_cluster_lib" in sys.modules:
        return sys.modules["redis_cluster_lib"]
    spec = importlib.util.spec_from_file_location(
        "redis_cluster_lib", ROOT / "deploy" / "redis_cluster_lib.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["redis_cluster_lib"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


#: deploy/redis_cluster_lib.py; tests may also `import redis_cluster_lib` once conftest ran.
cluster_lib = _load_cluster_lib()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def redis_missing() -> str | None:
    """The install hint if redis-server or redis-cli is not on PATH, else None."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return f"{binary} not found: {cluster_lib.INSTALL_HINT}"
    return None


def require_redis() -> None:
    """Skip the current test without Redis installed, or fail it under CI=true."""
    missing = redis_missing()
    if missing is None:
        return
    if in_ci():
        pytest.fail(f"{missing} (CI=true: cluster tests must run, not skip)", pytrace=False)
    pytest.skip(missing)


def script_env(password: str | None = None) -> dict[str, str]:
    """Environment for running deploy/redis-cluster: no stray FLOWSTATE_REDIS_* settings;
    the password goes through the environment so it does not show in `ps`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_REDIS_")}
    if password:
        env["FLOWSTATE_REDIS_PASSWORD"] = password
    return env


def run_script(
    *args: str, password: str | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run deploy/redis-cluster with this interpreter; raise with its output if check fails."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=script_env(password),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"deploy/redis-cluster {' '.join(args)} exited {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def claim_base_port(first: int, *, env: str, step: int = 10, tries: int = 20) -> tuple[int, int]:
    """Lock a base port for this process: `first`, else first + step, ... (unless `env` set
    the port explicitly, which must then be free). Return (port, lock fd); closing the fd
    (or the process dying) releases it."""
    candidates = [first] if os.environ.get(env) else [first + k * step for k in range(tries)]
    for port in candidates:
        fd = os.open(SESSION_LOCK.format(port=port), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return port, fd
    raise RuntimeError(
        f"base ports {candidates[0]}..{candidates[-1]} are all held by other live test "
        f"sessions ({SESSION_LOCK.format(port='PORT')}); set {env} to a free one"
    )


@dataclass
class ClusterHandle:
    """The session's Redis Cluster: where it is and how to break and repair it.

    `seeds` lists every node (index i is node i: port base_port + i). Methods that change
    the cluster's processes skip the test when the cluster is external (not `managed`).
    """

    seeds: list[tuple[str, int]]
    password: str
    base_port: int
    dir: Path
    managed: bool = True

    @property
    def seed_string(self) -> str:
        """Seeds as `host:port,host:port,...`, the form FLOWSTATE_REDIS_SEEDS takes."""
        return ",".join(f"{h}:{p}" for h, p in self.seeds)

    def _script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if not self.managed:
            pytest.skip("needs the cluster started by deploy/redis-cluster, not an external one")
        where = ["--base-port", str(self.base_port), "--dir", str(self.dir)]
        return run_script(*args, *where, password=self.password, timeout=timeout)

    def start(self) -> None:
        """`up`: create the cluster, or repair a running one (restart dead nodes, SIGCONT
        stopped ones); return once it is healthy."""
        self._script("up", "--nodes", str(len(self.seeds)), "--timeout", "90")

    def stop(self) -> None:
        """`down`: stop every node and delete the cluster directory (a no-op if not up)."""
        self._script("down")

    def kill_node(self, index: int, signal: str = "KILL") -> None:
        """Signal node `index` and wait until it is gone (KILL, TERM) or stopped (STOP)."""
        self._script("kill-node", str(index), "--signal", signal)

    def restart_node(self, index: int, wait: bool = True) -> None:
        """Start node `index` again from its config (or SIGCONT it if stopped); by default
        wait until the whole cluster is healthy again."""
        self._script("start-node", str(index), *([] if wait else ["--no-wait"]))

    def wait_healthy(self, timeout: float = 30) -> None:
        """Wait until every node is up, agrees, covers all slots and replicas are in sync."""
        self._script("wait", "--timeout", str(timeout), timeout=timeout + 30)

    def status(self) -> dict[str, Any]:
        """`status --json` as a dict (does not raise when the cluster is unhealthy)."""
        if not self.managed:
            pytest.skip("needs the cluster started by deploy/redis-cluster, not an external one")
        where = ["--base-port", str(self.base_port), "--dir", str(self.dir)]
        proc = run_script("status", "--json", *where, check=False)
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def client(self, index: int, timeout: float = 2.0) -> Any:
        """A raw connection (`redis_cluster_lib.Client`) to node `index`, authenticated."""
        host, port = self.seeds[index]
        return cluster_lib.Client(host, port, self.password or None, timeout=timeout)

    def flushall(self) -> None:
        """FLUSHALL on every master the cluster knows (not only the seeds); replicas follow.

        Masters are taken from CLUSTER NODES of the first seed that answers; failed
        masters are skipped, so this also works right after `kill_node`.
        """
        last: Exception | None = None
        for host, port in self.seeds:
            try:
                with cluster_lib.Client(host, port, self.password or None) as c:
                    text = c.text("CLUSTER", "NODES")
                break
            except (OSError, cluster_lib.ReplyError) as exc:
                last = exc
        else:
            raise RuntimeError(f"no seed of the cluster answers: {last}")
        for line in text.splitlines():
            fields = line.split()
            flags = set(fields[2].split(","))
            if "master" not in flags or flags & {"fail", "fail?", "noaddr"}:
                continue
            host, _, port = fields[1].split("@")[0].rpartition(":")
            with cluster_lib.Client(host, int(port), self.password or None) as c:
                c.call("FLUSHALL")


def _external_cluster() -> ClusterHandle | None:
    raw = os.environ.get("FLOWSTATE_REDIS_SEEDS", "").strip()
    if not raw:
        return None
    seeds = []
    for item in raw.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise pytest.UsageError(f"FLOWSTATE_REDIS_SEEDS: {item!r} is not host:port")
        seeds.append((host.strip("[]"), int(port)))
    password = os.environ.get("FLOWSTATE_REDIS_PASSWORD", "")
    return ClusterHandle(seeds, password, seeds[0][1], Path(), managed=False)


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> ClusterHandle:
    """The session's real Redis Cluster (see the module docstring)."""
    external = _external_cluster()
    if external is not None:
        return external
    require_redis()
    port, lock = claim_base_port(TEST_BASE_PORT, env="FLOWSTATE_TEST_REDIS_PORT")
    request.addfinalizer(lambda: os.close(lock))  # finalizers run last-in first-out
    handle = ClusterHandle(
        seeds=[("127.0.0.1", port + i) for i in range(TEST_NODES)],
        password=TEST_PASSWORD,
        base_port=port,
        dir=Path(f"/tmp/flowstate-redis-{port}"),
    )
    # Registered before `up` so a half-started cluster is torn down too.
    request.addfinalizer(handle.stop)
    handle.stop()  # we hold the port's lock: anything there is an orphan of a dead session
    handle.start()
    return handle


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses `redis_cluster` as `cluster` (so `-m "not cluster"` works)."""
    for item in items:
        if "redis_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`cluster` tests need redis-server, unless they only use an external cluster."""
    if item.get_closest_marker("cluster") is None:
        return
    uses_external = "redis_cluster" in getattr(item, "fixturenames", ()) and bool(
        os.environ.get("FLOWSTATE_REDIS_SEEDS")
    )
    if not uses_external:
        require_redis()
