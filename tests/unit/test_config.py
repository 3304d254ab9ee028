"""Forwarder config: the example loads, each bad value names its field, secrets stay hidden."""

from __future__ import annotations

import copy
import ipaddress
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowstate.errors import ConfigError
from flowstate.flow import Proto
from forwarder import daemon, maglev
from forwarder.config import (
    BackendState,
    BgpConfig,
    BgpKind,
    Endpoint,
    ForwarderConfig,
    HealthKind,
    Impl,
    Secret,
    StoreKind,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "forwarder.toml"

MINIMAL = """
pop = "lab"
interfaces = ["veth0"]
source_ipv6 = "fd00::10"

[[vip]]
address = "10.0.0.1"
port = 80
protocol = "tcp"

[[vip.backend]]
address = "fd00:b::1"
"""


def example() -> dict[str, Any]:
    with EXAMPLE.open("rb") as f:
        return tomllib.load(f)


# --- valid files ------------------------------------------------------------------------------


def test_example_loads() -> None:
    c = load_config(EXAMPLE)
    assert c.pop == "fra1"
    assert c.interfaces == ("eth1",)
    assert c.source_ipv6 == ipaddress.IPv6Address("2001:db8:f:1::10")
    assert c.workers == 4 and c.impl is Impl.C
    assert [str(v) for v in c.vips] == [
        "tcp 192.0.2.80:80",
        "tcp [2001:db8:a::443]:443",
        "udp [2001:db8:a::53]:53",
    ]
    assert all(len(v.backends) == 3 for v in c.vips)
    assert c.vips[0].backends[2].weight == 50
    assert c.vips[1].backends[2].state is BackendState.DRAINING
    assert c.vips[2].protocol is Proto.UDP
    assert c.store.kind is StoreKind.REDIS_CLUSTER
    assert c.store.seeds[0] == Endpoint("2001:db8:f:100::1", 6379)
    assert str(c.store.seeds[0]) == "[2001:db8:f:100::1]:6379"
    assert c.store.password_env == "FLOWSTATE_REDIS_PASSWORD"
    assert c.health.kind is HealthKind.HTTP and c.health.path == "/healthz"
    assert "3 VIPs" in c.summary() and "9 backends" in c.summary()


def test_minimal_file_takes_defaults() -> None:
    c = parse_config(tomllib.loads(MINIMAL))
    assert c.workers == 1 and c.impl is Impl.C
    assert c.timeouts.tcp_idle_s == 300 and c.timeouts.udp_idle_s == 30
    assert c.timeouts.fin_linger_s == 10 and c.timeouts.store_ttl_s == 300
    assert c.timeouts.store_refresh_ms == 75_000
    assert c.store.kind is StoreKind.MEMORY and c.store.seeds == ()
    assert c.store.lookup_deadline_ms == 5 and c.store.write_deadline_ms == 50
    assert c.store.max_writes_per_s == 50000 and c.store.fallback is True
    assert c.flow_table.capacity == 1_000_000
    assert (c.flow_table.miss_queue_per_flow, c.flow_table.miss_queue_total) == (8, 10000)
    assert c.vips[0].maglev_size == 65537
    assert c.vips[0].backends[0].weight == 100
    assert c.vips[0].backends[0].state is BackendState.ACTIVE
    assert str(c.control.socket) == "/run/flowstate/forwarder.sock"
    assert c.control.metrics == Endpoint("127.0.0.1", 9412)
    assert c.health.kind is HealthKind.NONE
    assert isinstance(c, ForwarderConfig)


def test_store_ttl_defaults_to_tcp_idle() -> None:
    data = tomllib.loads(MINIMAL + "\n[timeouts]\ntcp_idle_s = 120\n")
    assert parse_config(data).timeouts.store_ttl_s == 120


def test_seeds_imply_redis_cluster_and_metrics_can_be_off() -> None:
    data = tomllib.loads(MINIMAL)
    data["store"] = {"seeds": ["10.0.0.5:7000"]}
    data["control"] = {"metrics": ""}
    c = parse_config(data)
    assert c.store.kind is StoreKind.REDIS_CLUSTER
    assert c.control.metrics is None


def test_relative_paths_follow_the_file(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "[[vip]]",
        '[store]\npassword_file = "secret/pw"\n\n[control]\nsocket = "run/fw.sock"\n\n[[vip]]',
    )
    (tmp_path / "fw.toml").write_text(text)
    c = load_config(tmp_path / "fw.toml")
    assert c.store.password_file == tmp_path / "secret" / "pw"
    assert c.control.socket == tmp_path / "run" / "fw.sock"


def test_maglev_backends_give_draining_weight_zero() -> None:
    vip = load_config(EXAMPLE).vips[1]
    weights = dict(vip.maglev_backends())
    assert weights[ipaddress.IPv6Address("2001:db8:b::4").packed] == 0
    table = maglev.MaglevTable.build(vip.maglev_backends(), vip.maglev_size)
    assert table.slot_counts()[ipaddress.IPv6Address("2001:db8:b::4").packed] == 0


# --- every broken variant names its field -----------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """Mutation setting a key by dotted path; `vip.1.backend.0.address` indexes arrays."""

    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[last] = value

    return mutate


def _del(path: str) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        del node[last]

    return mutate


def _dup_vip(d: dict[str, Any]) -> None:
    d["vip"].append(copy.deepcopy(d["vip"][0]))


def _dup_backend(d: dict[str, Any]) -> None:
    d["vip"][1]["backend"][2]["address"] = "2001:DB8:b:0::1"  # same as backend[0], other spelling


BROKEN: list[tuple[str, Mutation, str, str]] = [
    ("unknown top key", _set("workrs", 2), "workrs", "did you mean 'workers'"),
    ("unknown store key", _set("store.pasword", "x"), "store.pasword", "unknown key"),
    ("unknown backend key", _set("vip.1.backend.0.wieght", 5), "vip[1].backend[0].wieght", ""),
    ("missing pop", _del("pop"), "pop", "missing"),
    ("bad pop", _set("pop", "fra 1"), "pop", "not a POP id"),
    ("long pop", _set("pop", "x" * 33), "pop", "not a POP id"),
    ("no interfaces", _set("interfaces", []), "interfaces", "empty"),
    ("bad interface", _set("interfaces", ["eth0", "a/b"]), "interfaces[1]", "interface name"),
    ("source is IPv4", _set("source_ipv6", "192.0.2.1"), "source_ipv6", "IPv4 address"),
    ("source multicast", _set("source_ipv6", "ff02::1"), "source_ipv6", "multicast"),
    ("source loopback", _set("source_ipv6", "::1"), "source_ipv6", "loopback"),
    ("workers zero", _set("workers", 0), "workers", "out of range"),
    ("workers string", _set("workers", "4"), "workers", "must be an integer"),
    ("impl", _set("impl", "rust"), "impl", "'c' or 'python'"),
    ("tcp idle ms", _set("timeouts.tcp_idle_s", 300000), "timeouts.tcp_idle_s", "seconds"),
    ("udp idle zero", _set("timeouts.udp_idle_s", 0), "timeouts.udp_idle_s", "more than 0"),
    ("store kind", _set("store.kind", "redis"), "store.kind", "'redis-cluster' or 'memory'"),
    ("no seeds", _set("store.seeds", []), "store.seeds", "at least one seed"),
    ("bare IPv6 seed", _set("store.seeds", ["2001:db8::1:6379"]), "store.seeds[0]", "brackets"),
    ("seed port", _set("store.seeds", ["redis:99999"]), "store.seeds[0]", "not a port"),
    ("two passwords", _set("store.password", "hunter2"), "store.password_env", "at most one"),
    ("tls file tls off", _set("store.tls_ca_file", "ca.pem"), "store.tls_ca_file", "tls is off"),
    ("deadline", _set("store.lookup_deadline_ms", -1), "store.lookup_deadline_ms", "more than"),
    ("fallback", _set("store.fallback", "yes"), "store.fallback", "true or false"),
    ("capacity", _set("flow_table.capacity", 0), "flow_table.capacity", "out of range"),
    ("vip table", _set("vip", {"address": "192.0.2.1"}), "vip", "[[vip]]"),
    ("no vip", _set("vip", []), "vip", "no VIP"),
    ("vip address", _set("vip.0.address", "192.0.2.300"), "vip[0].address", "IPv4 or IPv6"),
    ("vip port", _set("vip.2.port", 0), "vip[2].port", "out of range"),
    ("vip protocol", _set("vip.2.protocol", "sctp"), "vip[2].protocol", "'tcp' or 'udp'"),
    ("maglev not prime", _set("vip.0.maglev_size", 65536), "vip[0].maglev_size", "not prime"),
    ("duplicate vip", _dup_vip, "vip[3]", "duplicate of vip[0]"),
    ("no backends", _set("vip.1.backend", []), "vip[1].backend", "no backend"),
    (
        "backend not IPv6",
        _set("vip.1.backend.0.address", "2001:db8::zz"),
        "vip[1].backend[0].address",
        "'2001:db8::zz' is not an IPv6 address",
    ),
    (
        "backend IPv4",
        _set("vip.0.backend.1.address", "192.0.2.7"),
        "vip[0].backend[1].address",
        "IPv4 address",
    ),
    (
        "backend link-local",
        _set("vip.0.backend.1.address", "fe80::1"),
        "vip[0].backend[1].address",
        "link-local",
    ),
    ("backend weight", _set("vip.0.backend.0.weight", 70000), "vip[0].backend[0].weight", "range"),
    ("backend state", _set("vip.0.backend.0.state", "down"), "vip[0].backend[0].state", "draining"),
    ("duplicate backend", _dup_backend, "vip[1].backend[2].address", "already backend[0]"),
    (
        "backend is self",
        _set("vip.0.backend.0.address", "2001:db8:f:1::10"),
        "vip[0].backend[0].address",
        "would loop",
    ),
    ("metrics", _set("control.metrics", "localhost"), "control.metrics", "host:port"),
    ("health kind", _set("health.kind", "icmp"), "health.kind", "'tcp', 'http' or 'none'"),
    ("health timeout", _set("health.timeout_ms", 5000), "health.timeout_ms", "interval_ms"),
    ("health path", _set("health.path", "healthz"), "health.path", "start with '/'"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [pytest.param(m, f, r, id=name) for name, m, f, r in BROKEN],
)
def test_broken_variant_names_field(mutate: Mutation, field: str, reason: str) -> None:
    data = example()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.field == field, info.value
    assert reason in info.value.reason


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('pop = "x"\ninterfaces = ["eth0"\nworkers = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.field == str(f)
    assert "line 2" in info.value.reason or "line 3" in info.value.reason


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/forwarder.toml")


# --- secrets ----------------------------------------------------------------------------------

PASSWORD = "s3cr3t-Hunter2-do-not-print"


def test_inline_password_is_hidden() -> None:
    data = tomllib.loads(MINIMAL)
    data["store"] = {"seeds": ["[fd00::5]:6379"], "password": PASSWORD}
    c = parse_config(data)
    assert c.store.password is not None
    assert c.store.password.reveal() == PASSWORD
    for text in (repr(c), str(c), repr(c.store), str(c.store.password), c.summary()):
        assert PASSWORD not in text
    assert c.store.read_password() == Secret(PASSWORD)


def test_bad_password_value_is_not_echoed() -> None:
    data = tomllib.loads(MINIMAL)
    data["store"] = {"password": 987654321}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.field == "store.password"
    assert "987654321" not in str(info.value)


def test_password_from_env() -> None:
    data = tomllib.loads(MINIMAL)
    data["store"] = {"password_env": "FS_PW"}
    store = parse_config(data).store
    assert store.read_password({"FS_PW": PASSWORD}) == Secret(PASSWORD)
    with pytest.raises(ConfigError) as info:
        store.read_password({})
    assert info.value.field == "store.password_env"


def test_password_from_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    data = tomllib.loads(MINIMAL)
    data["store"] = {"password_file": "pw"}
    store = parse_config(data, base_dir=tmp_path).store
    secret = store.read_password()
    assert secret is not None and secret.reveal() == PASSWORD
    assert PASSWORD not in repr(store)
    (tmp_path / "pw").unlink()
    with pytest.raises(ConfigError) as info:
        store.read_password()
    assert info.value.field == "store.password_file"


# --- the CLI ----------------------------------------------------------------------------------


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.main(["--check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "fra1" in out and "3 VIPs" in out and "9 backends" in out and "redis-cluster" in out


def test_check_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "fw.toml"
    f.write_text(MINIMAL.replace('address = "fd00:b::1"', 'address = "2001:db8::zz"'))
    assert daemon.main(["--check-config", str(f)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "flowstate-forwarder: config error: vip[0].backend[0].address: "
        "'2001:db8::zz' is not an IPv6 address\n"
    )


def test_check_config_subprocess(tmp_path: Path) -> None:
    f = tmp_path / "fw.toml"
    f.write_text("pop = [\n")
    run = subprocess.run(
        [sys.executable, "-m", "forwarder.daemon", "--check-config", str(f)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("flowstate-forwarder: config error: ")
    assert "Traceback" not in run.stderr


def test_check_address_defaults_to_the_backend_address() -> None:
    data = tomllib.loads(MINIMAL)
    backend = parse_config(data).vips[0].backends[0]
    assert backend.check_address is None
    assert backend.check_target == ipaddress.IPv6Address("fd00:b::1")
    data["vip"][0]["backend"][0]["check_address"] = "10.3.0.21"
    backend = parse_config(data).vips[0].backends[0]
    assert backend.check_target == ipaddress.IPv4Address("10.3.0.21")
    assert backend.address == ipaddress.IPv6Address("fd00:b::1")  # the tunnel is unchanged


@pytest.mark.parametrize(
    ("value", "reason"),
    [("fd00:b::zz", "not an IPv4 or IPv6 address"), ("::1", "loopback"), (7, "a string")],
)
def test_bad_check_address_names_its_field(value: Any, reason: str) -> None:
    data = tomllib.loads(MINIMAL)
    data["vip"][0]["backend"][0]["check_address"] = value
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.field == "vip[0].backend[0].check_address"
    assert reason in info.value.reason


def test_repin_after_defaults_to_ten_intervals() -> None:
    data = tomllib.loads(MINIMAL)
    data["health"] = {"kind": "tcp", "interval_ms": 200, "timeout_ms": 100}
    assert parse_config(data).health.repin_after == 2000
    data["health"]["repin_after_ms"] = 500
    assert parse_config(data).health.repin_after == 500
    data["health"]["repin_after_ms"] = -1
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.field == "health.repin_after_ms"


# --- [bgp] --------------------------------------------------------------------------------------


def test_bgp_is_off_by_default_and_bird_takes_defaults() -> None:
    data = tomllib.loads(MINIMAL)
    assert parse_config(data).bgp.kind is BgpKind.NONE
    data["bgp"] = {"kind": "bird"}
    bgp = parse_config(data).bgp
    assert bgp.kind is BgpKind.BIRD
    assert bgp.birdc == "birdc" and bgp.socket == Path("/run/bird/bird.ctl")
    assert bgp.protocols == ("vip4", "vip6")
    assert bgp.check_interval_ms == 200 and bgp.stall_timeout_ms == 1000
    assert not bgp.withdraw_on_store_loss
    assert bgp.drain_file == Path("/var/lib/flowstate/pop-drained")
    assert "BGP via BIRD (vip4, vip6)" in parse_config(data).summary()


def test_bgp_paths_are_taken_from_the_file_directory(tmp_path: Path) -> None:
    data = tomllib.loads(MINIMAL)
    data["bgp"] = {
        "kind": "bird",
        "birdc": "bin/birdc",
        "socket": "bird.ctl",
        "protocols": ["v4_anycast"],
        "drain_file": "",
        "withdraw_on_store_loss": True,
    }
    bgp = parse_config(data, base_dir=tmp_path).bgp
    assert bgp.birdc == str(tmp_path / "bin" / "birdc")
    assert bgp.socket == tmp_path / "bird.ctl"
    assert bgp.protocols == ("v4_anycast",) and bgp.drain_file is None
    assert bgp.withdraw_on_store_loss


@pytest.mark.parametrize(
    ("bgp", "field", "reason"),
    [
        ({"kind": "exabgp"}, "bgp.kind", "is not one of 'bird' or 'none'"),
        ({"socket": "/run/bird.ctl"}, "bgp.socket", "kind = 'none' announces nothing"),
        ({"kind": "bird", "protocols": []}, "bgp.protocols", "non-empty array"),
        ({"kind": "bird", "protocols": ["vip*"]}, "bgp.protocols[0]", "not a BIRD protocol"),
        ({"kind": "bird", "protocols": ["a", "a"]}, "bgp.protocols[1]", "listed twice"),
        ({"kind": "bird", "check_interval_ms": 0}, "bgp.check_interval_ms", "out of range"),
        (
            {"kind": "bird", "check_interval_ms": 500, "stall_timeout_ms": 400},
            "bgp.stall_timeout_ms",
            "shorter than check_interval_ms",
        ),
        ({"kind": "bird", "withdraw_on_store_loss": 1}, "bgp.withdraw_on_store_loss", "true"),
        ({"kind": "bird", "announce": True}, "bgp.announce", "unknown key"),
    ],
)
def test_bad_bgp_settings_name_their_field(bgp: dict[str, Any], field: str, reason: str) -> None:
    data = tomllib.loads(MINIMAL)
    data["bgp"] = bgp
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.field == field
    assert reason in info.value.reason


def test_example_bgp_section_parses_when_uncommented() -> None:
    text = EXAMPLE.read_text()
    block = text.split("# [bgp]\n", 1)[1].split("\n\n", 1)[0]
    keys = [line[2:] for line in block.splitlines() if re.match(r"# [a-z_]+ = ", line)]
    data = example()
    data["bgp"] = tomllib.loads("\n".join(keys))
    assert parse_config(data).bgp == BgpConfig(kind=BgpKind.BIRD)


# --- user / group ---------------------------------------------------------------------------


def test_user_and_group_default_to_staying_root() -> None:
    config = parse_config(tomllib.loads(MINIMAL))
    assert (config.user, config.group) == (None, None)


def test_existing_user_and_group_are_kept_by_name() -> None:
    import grp
    import pwd

    nogroup = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    data = tomllib.loads(MINIMAL)
    data["user"] = "nobody"
    assert parse_config(data).user == "nobody"
    data["group"] = nogroup
    config = parse_config(data)
    assert (config.user, config.group) == ("nobody", nogroup)


@pytest.mark.parametrize(
    ("settings", "field", "reason"),
    [
        ({"user": "flowstate-no-such-user"}, "user", "no user 'flowstate-no-such-user'"),
        ({"user": ""}, "user", "no user ''"),
        ({"user": 1000}, "user", "must be a string"),
        ({"user": "root"}, "user", "is root"),
        ({"group": "nogroup"}, "group", "only with `user`"),
        ({"user": "nobody", "group": "flowstate-no-such-group"}, "group", "no group"),
        ({"user": "nobody", "group": "root"}, "group", "root's group"),
        ({"usr": "nobody"}, "usr", "did you mean 'user'?"),
    ],
)
def test_bad_user_or_group_names_its_field(
    settings: dict[str, Any], field: str, reason: str
) -> None:
    data = tomllib.loads(MINIMAL)
    data.update(settings)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.field == field, info.value
    assert reason in info.value.reason, info.value


def test_check_config_refuses_an_unknown_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "fwd.toml"
    f.write_text('user = "flowstate-no-such-user"\n' + MINIMAL)
    assert daemon.check_config(str(f)) == 1
    err = capsys.readouterr().err
    assert "config error: user: no user 'flowstate-no-such-user' on this host" in err


def test_a_changed_user_needs_a_restart() -> None:
    from forwarder.reload import merge

    running = parse_config(tomllib.loads(MINIMAL))
    loaded = parse_config({**tomllib.loads(MINIMAL), "user": "nobody"})
    merged, needs = merge(running, loaded)
    assert merged.user is None
    assert needs == ["user"]
