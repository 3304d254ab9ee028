"""Integration: the store over TLS to a TLS-only Redis Cluster, as an ACL user.

`deploy/redis-cluster up` with `--tls-*` (certificates made here with openssl) and `--user`: every
store operation works on both paths (fast path and redis-py) with TLS and the ACL user, and Redis
refused none of them (ACL LOG stays empty); the user can touch nothing but `fs1:*` keys and run
no admin command; plain text, an unknown CA and a wrong password are refused; no password shows
in an error or a log line; the forwarder's `[store] tls*` settings reach the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flowstate.errors import StoreUnavailable, UsageError
from flowstate.flow import FiveTuple
from flowstate.record import FlowRecord
from flowstate.store import StoreConfig, TlsSettings
from flowstate.store.redis_cluster import RedisClusterStore
from tests.conftest import claim_base_port, cluster_lib, require_redis, run_script

pytestmark = pytest.mark.cluster

ADMIN_PASSWORD = "tls-admin-Pw-9f3c1"
USER, USER_PASSWORD = "flowstate", "tls-user-Pw-77ab2e"
CONFIG = StoreConfig(lookup_deadline_ms=2000, write_deadline_ms=2000, connect_timeout_ms=3000)


@dataclass
class TlsCluster:
    seeds: list[tuple[str, int]]
    files: Any  # redis_cluster_lib.TlsFiles
    dir: Path

    @property
    def tls(self) -> TlsSettings:
        return TlsSettings(
            ca_file=str(self.files.ca),
            cert_file=str(self.files.cert),
            key_file=str(self.files.key),
        )

    def admin(self, index: int) -> Any:
        host, port = self.seeds[index]
        return cluster_lib.Client(host, port, ADMIN_PASSWORD, tls=self.files)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    require_redis()
    port, lock = claim_base_port(7500, env="FLOWSTATE_TEST_TLS_REDIS_PORT")
    work = tmp_path_factory.mktemp("tls")
    files = cluster_lib.make_certs(work / "certs", ["127.0.0.1"])
    user_password = work / "user-password"
    user_password.write_text(USER_PASSWORD + "\n")
    where = ["--base-port", str(port), "--dir", str(work / "redis")]
    try:
        run_script(
            "up", *where, "--user", USER, "--user-password-file", str(user_password),
            "--tls-cert-file", str(files.cert), "--tls-key-file", str(files.key),
            "--tls-ca-cert-file", str(files.ca), "--timeout", "90",
            password=ADMIN_PASSWORD,
        )  # fmt: skip
        yield TlsCluster([("127.0.0.1", port + i) for i in range(6)], files, work)
    finally:
        run_script("down", *where, check=False)
        os.close(lock)


def tuples(n: int) -> list[FiveTuple]:
    return [FiveTuple.make("tcp", f"10.9.{i // 250}.{i % 250 + 1}", 40000 + i, "192.0.2.10", 80)
            for i in range(n)]  # fmt: skip


def records(n: int) -> list[FlowRecord]:
    return [FlowRecord.make(f"fd00:b::{i % 5 + 1}", "192.0.2.10", 1_700_000_000_000, "pop-t")
            for i in range(n)]  # fmt: skip


def acl_denials(cluster: TlsCluster) -> list[Any]:
    out: list[Any] = []
    for i in range(len(cluster.seeds)):
        with cluster.admin(i) as c:
            log = c.call("ACL", "LOG")
            assert isinstance(log, list)
            out.extend(log)
    return out


def reset_acl_log(cluster: TlsCluster) -> None:
    for i in range(len(cluster.seeds)):
        with cluster.admin(i) as c:
            c.call("ACL", "LOG", "RESET")


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "redis-py"])
async def test_every_store_operation_over_tls_as_the_acl_user(
    tls_cluster: TlsCluster, fast_path: bool
) -> None:
    reset_acl_log(tls_cluster)
    store = await RedisClusterStore.connect(
        tls_cluster.seeds,
        username=USER,
        password=USER_PASSWORD,
        tls=tls_cluster.tls,
        config=CONFIG,
        fast_path=fast_path,
    )
    try:
        ts, recs = tuples(300), records(300)
        assert await store.pin_many([(t, r, 60_000) for t, r in zip(ts, recs, strict=True)]) == recs
        assert await store.lookup_many(ts) == recs
        assert all(await store.touch_many([(t, 90_000) for t in ts]))
        assert all(await store.release_many(ts[:10], 5_000))
        ttl = await store.ttl_ms(ts[0])
        assert ttl is not None and ttl <= 5_000
        found = {e.key async for e in store.scan()}
        assert {t.key() for t in ts} <= found
        assert await store.delete(ts) == len(ts)
        await store.refresh_topology()
        assert len(store.masters()) == 3
    finally:
        await store.close()
    # Redis refused nothing the store asked for: the ACL user has what it needs.
    assert acl_denials(tls_cluster) == []


def test_the_acl_user_is_fenced_to_its_keys(tls_cluster: TlsCluster) -> None:
    host, port = tls_cluster.seeds[0]
    with cluster_lib.Client(host, port, tls=tls_cluster.files) as c:
        c.call("AUTH", USER, USER_PASSWORD)
        for command in (
            ("GET", "other:key"),
            ("SET", "session:1", "x"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "requirepass"),
            ("KEYS", "*"),
            ("ACL", "LIST"),
            ("CLUSTER", "FAILOVER"),
            ("EVAL", "return 1", "0"),
        ):
            with pytest.raises(cluster_lib.ReplyError, match="NOPERM"):
                c.call(*command)
    reset_acl_log(tls_cluster)


async def test_plain_text_unknown_ca_and_wrong_password_are_refused(
    tls_cluster: TlsCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    with pytest.raises(StoreUnavailable) as plain:
        await RedisClusterStore.connect(
            tls_cluster.seeds, username=USER, password=USER_PASSWORD, config=CONFIG
        )
    errors.append(str(plain.value))
    other = cluster_lib.make_certs(tmp_path / "other-ca", ["127.0.0.1"])
    with pytest.raises(StoreUnavailable) as unknown:
        await RedisClusterStore.connect(
            tls_cluster.seeds,
            username=USER,
            password=USER_PASSWORD,
            tls=TlsSettings(ca_file=str(other.ca)),
            config=CONFIG,
        )
    errors.append(str(unknown.value))
    wrong = USER_PASSWORD + "-wrong"
    with pytest.raises(StoreUnavailable) as denied:
        await RedisClusterStore.connect(
            tls_cluster.seeds, username=USER, password=wrong, tls=tls_cluster.tls, config=CONFIG
        )
    errors.append(str(denied.value))
    with pytest.raises(UsageError, match="TLS files"):
        await RedisClusterStore.connect(
            tls_cluster.seeds, tls=TlsSettings(ca_file=str(tmp_path / "missing.pem"))
        )
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (USER_PASSWORD, wrong, ADMIN_PASSWORD):
        assert all(secret not in e for e in errors), errors
        assert secret not in logged


async def test_forwarder_store_settings_reach_the_store(
    tls_cluster: TlsCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from forwarder.config import load_config
    from forwarder.service import open_store

    caplog.set_level(logging.DEBUG)
    secret = tmp_path / "redis-password"
    secret.write_text(USER_PASSWORD + "\n")
    seeds = ", ".join(f'"{h}:{p}"' for h, p in tls_cluster.seeds)
    files = tls_cluster.files
    path = tmp_path / "forwarder.toml"
    path.write_text(
        'pop = "pop-t"\ninterfaces = ["lo"]\nsource_ipv6 = "fd00::1"\n'
        f'[store]\nseeds = [{seeds}]\nusername = "{USER}"\npassword_file = "{secret}"\n'
        f'tls = true\ntls_ca_file = "{files.ca}"\ntls_cert_file = "{files.cert}"\n'
        f'tls_key_file = "{files.key}"\nlookup_deadline_ms = 2000\n'
        '[[vip]]\naddress = "192.0.2.10"\nport = 80\nprotocol = "tcp"\n'
        '[[vip.backend]]\naddress = "fd00:b::1"\n'
    )
    config = load_config(path)
    store = await open_store(config)
    try:
        assert isinstance(store, RedisClusterStore)
        t, rec = tuples(1)[0], records(1)[0]
        assert await store.pin_many([(t, rec, 10_000)]) == [rec]
        assert await store.lookup_many([t]) == [rec]
        await store.delete([t])
    finally:
        await store.close()
    shown = f"{config!r}\n{config.summary()}\n" + "\n".join(r.getMessage() for r in caplog.records)
    assert "TLS on" in config.summary()
    assert USER_PASSWORD not in shown


def _roles(cluster: TlsCluster) -> dict[tuple[str, int], str]:
    """Address → id of its master ("" for a master), from CLUSTER NODES."""
    with cluster.admin(0) as c:
        text = c.text("CLUSTER", "NODES")
    out: dict[tuple[str, int], str] = {}
    ids: dict[str, tuple[str, int]] = {}
    for line in text.splitlines():
        f = line.split()
        host, _, port = f[1].split("@")[0].rpartition(":")
        ids[f[0]] = (host, int(port))
        out[(host, int(port))] = "" if f[3] == "-" else f[3]
    return {addr: ("" if not m else f"{ids[m][0]}:{ids[m][1]}") for addr, m in out.items()}


async def test_the_store_follows_a_failover_it_took_no_part_in(tls_cluster: TlsCluster) -> None:
    """A client idle during a failover learns the new master from its periodic refresh (and
    connects to it) before its next batch, instead of sending that batch to the old one."""
    config = StoreConfig(lookup_deadline_ms=2000, connect_timeout_ms=3000, topology_refresh_ms=200)
    store = await RedisClusterStore.connect(
        tls_cluster.seeds, username=USER, password=USER_PASSWORD, tls=tls_cluster.tls,
        config=config,
    )  # fmt: skip
    try:
        before = set(store.masters())
        replica = next(addr for addr, master in sorted(_roles(tls_cluster).items()) if master)
        index = tls_cluster.seeds.index(replica)
        with tls_cluster.admin(index) as c:
            c.call("CLUSTER", "FAILOVER")  # a clean hand-over: the old master becomes replica
        deadline = time.monotonic() + 15
        while replica not in store.masters() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # no store call meanwhile: only the watch can see it
        assert replica in store.masters(), (before, store.masters())
        assert len(store.masters()) == 3
        assert await store.lookup_many(tuples(50)) == [None] * 50
        assert store.counters["moved"] == 0  # nothing was sent to the old master
    finally:
        await store.close()
        # Hand the slots back, so the cluster looks as the other tests expect.
        where = ["--dir", str(tls_cluster.dir / "redis"), "--timeout", "30"]
        run_script("wait", *where)
        roles = _roles(tls_cluster)
        for old in [a for a in before if roles.get(a)]:
            with tls_cluster.admin(tls_cluster.seeds.index(old)) as c:
                c.call("CLUSTER", "FAILOVER")
        run_script("wait", *where)


def test_status_reports_tls_and_the_user(tls_cluster: TlsCluster) -> None:
    import json

    where = ["--dir", str(tls_cluster.dir / "redis")]
    status = json.loads(run_script("status", "--json", *where).stdout)
    assert status["healthy"] and status["tls"] and status["user"] == USER
    # The cluster bus and replication speak TLS too: the cluster is whole and in sync.
    assert {n["role"] for n in status["nodes"]} == {"master", "replica"}
    assert time.monotonic() > 0
