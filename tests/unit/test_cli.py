"""The `flowstate` CLI's pure parts: argument parsing, settings, the `explain` reasoning, and
formatting. Commands against a live forwarder and cluster are in tests/e2e/test_cli.py."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from flowstate import cli
from flowstate.cli_common import (
    ENV_PASSWORD,
    ENV_SEEDS,
    cluster_settings,
    duration,
    parse_seeds,
    seconds,
    table,
)
from flowstate.cli_explain import BackendView, Facts, maglev_choice, reason
from flowstate.cli_flows import FlowFilter, format_count, format_get, format_row, key_text
from flowstate.cli_ops import format_backends, format_change, format_stats, summarize
from flowstate.control_client import VipSelector
from flowstate.errors import UsageError
from flowstate.flow import FiveTuple, Proto
from flowstate.record import FlowRecord
from flowstate.store.base import ScanEntry
from forwarder.config import parse_config

B1, B2, B3, B4 = "fd00:b::1", "fd00:b::2", "fd00:b::3", "fd00:b::4"


# --- the command line ----------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help, usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv,code,needle",
    [
        (["flows", "get", "10.1.0.999", "1", "192.0.2.10", "80"], 2, "not an IPv4 or IPv6"),
        (["flows", "get", "10.1.0.1", "x", "192.0.2.10", "80"], 2, "'x' is not a port"),
        (["flows", "get", "10.1.0.1", "1", "192.0.2.10", "80", "icmp"], 2, "unsupported protocol"),
        (
            ["flows", "get", "10.1.0.1", "1", "2001:db8::1", "80"],
            2,
            "must both be IPv4 or both IPv6",
        ),
        (["flows", "ls", "--seeds", "nohost"], 2, "is not host:port"),
        (["flows", "ls", "--seeds", "127.0.0.1:7000", "--backend", "10.0.0.1"], 2, "not an IPv6"),
        (["flows", "count", "--limit", "0"], 2, "not a positive integer"),
        (["backends", "weight", "fd00:b::1", "70000"], 2, "not a weight"),
        (["backends", "drain", "fd00:b::1", "--vip", "192.0.2.1:99999"], 2, "not a port"),
        (["stats", "--watch", "0"], 2, "not a number of seconds"),
        (["flows"], 2, "required"),
        (["nonsense"], 2, "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], code: int,
    needle: str,
) -> None:  # fmt: skip
    monkeypatch.delenv(ENV_SEEDS, raising=False)
    got, out, err = run_cli(capsys, *argv)
    assert got == code
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def test_unreachable_forwarder_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv in (["backends", "ls"], ["stats"], ["backends", "drain", B1]):
        code, out, err = run_cli(capsys, *argv, "--socket", str(tmp_path / "none.sock"))
        assert code == 1 and out == ""
        want = f"no forwarder control socket at {tmp_path}/none.sock"
        assert err == f"flowstate: forwarder unreachable: {want}\n"


def test_unreachable_cluster_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "flows", "count", "--seeds", "127.0.0.1:1")
    assert code == 1 and out == ""
    assert err.startswith("flowstate: cluster unreachable: ") and err.count("\n") == 1


def test_explain_needs_something_to_ask(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(ENV_SEEDS, raising=False)
    code, _, err = run_cli(
        capsys, "explain", "10.1.0.2", "1000", "192.0.2.10", "80", "--socket", str(tmp_path / "x")
    )
    assert code == 1 and "nothing to ask" in err and err.count("\n") == 1


def test_help_of_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [
        [], ["flows"], ["flows", "get"], ["flows", "ls"], ["flows", "count"], ["explain"],
        ["backends"], ["backends", "ls"], ["backends", "drain"], ["backends", "undrain"],
        ["backends", "weight"], ["stats"],
    ]  # fmt: skip
    for argv in commands:
        code, out, _ = run_cli(capsys, *argv, "--help")
        assert code == 0 and out.startswith("usage: flowstate"), argv
        if argv and argv[-1] not in ("flows", "backends"):
            assert "--json" in out, argv


def test_json_may_come_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--json", "stats"]).json is True
    assert parser.parse_args(["stats", "--json"]).json is True
    assert parser.parse_args(["stats"]).json is False


# --- settings ------------------------------------------------------------------------------------


def test_vip_selector_forms() -> None:
    v4 = ipaddress.ip_address("192.0.2.10")
    v6 = ipaddress.ip_address("2001:db8::10")
    assert VipSelector.parse("192.0.2.10") == VipSelector(v4)
    assert VipSelector.parse("192.0.2.10:80") == VipSelector(v4, 80)
    assert VipSelector.parse("192.0.2.10:80/tcp") == VipSelector(v4, 80, Proto.TCP)
    assert VipSelector.parse("udp 192.0.2.10:53") == VipSelector(v4, 53, Proto.UDP)
    assert VipSelector.parse("2001:db8::10") == VipSelector(v6)
    assert VipSelector.parse("[2001:db8::10]:80") == VipSelector(v6, 80)
    assert VipSelector.parse("tcp [2001:db8::10]:80") == VipSelector(v6, 80, Proto.TCP)
    for sel in (VipSelector(v4, 80, Proto.TCP), VipSelector(v6), VipSelector(v6, 53, Proto.UDP)):
        assert VipSelector.parse(str(sel)) == sel
        assert VipSelector.from_params(sel.to_params()) == sel
    for bad in ("192.0.2.300", "192.0.2.10:0", "[2001:db8::10", "[2001:db8::10]x", "a:b/sctp"):
        with pytest.raises(UsageError):
            VipSelector.parse(bad)
    sel = VipSelector.parse("192.0.2.10/udp")
    assert sel.matches(v4.packed, 53, 17) and not sel.matches(v4.packed, 53, 6)


def test_parse_seeds() -> None:
    assert parse_seeds("10.0.0.1:7000, 10.0.0.2:7001,") == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert parse_seeds("[fd00::1]:7000,redis-a:7000") == (("fd00::1", 7000), ("redis-a", 7000))
    for bad in ("", "10.0.0.1", "10.0.0.1:x", "fd00::1:7000", "[nope]:1", "h:70000"):
        with pytest.raises(UsageError):
            parse_seeds(bad)


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"seeds": None, "password_file": None, "username": None, **kw})


def test_cluster_settings_precedence(tmp_path: Path) -> None:
    config = parse_config(
        {
            "pop": "p",
            "interfaces": ["eth0"],
            "source_ipv6": "fd00:3::10",
            "store": {"seeds": ["10.9.9.9:7000"], "password_env": "PW", "username": "fs"},
            "vip": [
                {"address": "192.0.2.1", "port": 80, "protocol": "tcp",
                 "backend": [{"address": B1}]}
            ],
        }
    )  # fmt: skip
    assert cluster_settings(_args(), None, {}) is None
    s = cluster_settings(_args(), config, {"PW": "from-config"})
    assert s is not None and s.seeds == (("10.9.9.9", 7000),) and s.password == "from-config"
    assert s.username == "fs"
    env = {ENV_SEEDS: "10.0.0.1:1", ENV_PASSWORD: "from-env", "PW": "x"}
    s = cluster_settings(_args(), config, env)
    assert s is not None and s.seeds == (("10.0.0.1", 1),) and s.password == "from-env"
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    s = cluster_settings(_args(seeds="10.0.0.2:2", password_file=pw, username="u"), config, env)
    assert s is not None and s.seeds == (("10.0.0.2", 2),) and s.password == "from-file"
    assert s.username == "u"
    with pytest.raises(UsageError, match="--config"):
        cluster_settings(_args(), config, {})  # $PW unset
    with pytest.raises(UsageError, match="cannot read"):
        cluster_settings(_args(seeds="h:1", password_file=tmp_path / "missing"), None, {})


# --- formatting ----------------------------------------------------------------------------------


def test_durations_and_tables() -> None:
    assert [duration(x) for x in (None, 5, 850, 12_345, 245_000, 7_380_000, 3 * 86_400_000)] == [
        "-", "5 ms", "850 ms", "12.3 s", "4 min 05 s", "2 h 03 min", "3 d 00 h",
    ]  # fmt: skip
    assert duration(-1500) == "-1.5 s"
    assert [seconds(x) for x in (None, 0.00042, 0.012, 1.5)] == ["-", "0.42 ms", "12 ms", "1.5 s"]
    assert table(["A", "BB"], [["xxx", "y"], ["z", ""]]) == "A    BB\nxxx  y\nz"


def test_flow_listing_and_filters() -> None:
    t = FiveTuple.make("tcp", "10.1.0.2", 40000, "192.0.2.10", 80)
    rec = FlowRecord.make(B2, "192.0.2.10", 1_000, "pop1")
    entry = ScanEntry(t.key(), rec, 5_000)
    assert key_text(t.key()) == "fs1:" + t.digest().hex()
    assert FlowFilter().matches(entry)
    assert FlowFilter(backend=ipaddress.IPv6Address(B2).packed, pop="pop1").matches(entry)
    assert not FlowFilter(vip=ipaddress.ip_address("192.0.2.11").packed).matches(entry)
    assert not FlowFilter(pop="pop2").matches(entry)
    bad = ScanEntry(t.key(), None, None, "record is not valid msgpack")
    assert FlowFilter().matches(bad) and not FlowFilter(pop="pop1").matches(bad)
    view = {"key": key_text(t.key()), "backend": B2, "vip": "192.0.2.10", "pop": "pop1",
            "age_ms": 12_300, "ttl_ms": 5_000}  # fmt: skip
    row = format_row(view)
    assert row.split() == [view["key"], B2, "192.0.2.10", "pop1", "12.3", "s", "5.0", "s"]
    assert "bad record" in format_row({"key": "k", "error": "boom", "ttl_ms": None})
    text = format_count({"count": 3, "bad_records": 1, "by": "pop", "groups": {"p1": 2, "p2": 1}})
    assert text.splitlines() == ["3 flows (1 undecodable)", "POP  FLOWS", "p1   2", "p2   1"]
    got = format_get(
        {"flow": str(t), "found": False, "key": "fs1:00", "slot": 7, "master": "h:1",
         "replicas": ["h:2"]}
    )  # fmt: skip
    assert "slot 7 on h:1 (replicas h:2)" in got and "record    none" in got


def _stats(packets: dict[str, int], lookups: int, pid: int = 10, worker: int = 0) -> dict[str, Any]:
    engine = {"forward": 0, "new": 0, "miss": 0, "pass_not_vip": 0, "drop_no_route": 0,
              "flows": 7, "capacity": 1024, "evicted": 0, "expired": 0, "tx_bytes": 10**6,
              **packets}  # fmt: skip
    snap = {"le": [0.001, 0.01], "counts": [lookups, 0, 0], "sum": 0.0005 * lookups,
            "count": lookups, "errors": 0}  # fmt: skip
    return {
        "worker": worker,
        "pid": pid,
        "uptime_s": 60.0,
        "engine": engine,
        "core": {"lookups": lookups, "fallbacks": 1, "miss_queue_full": 2},
        "rings": [{"interface": "eth0", "counters": {"tx_errors": 0}}],
        "store": {"connected": True},
        "store_latency": {"lookup": snap},
    }


def test_stats_rates_from_two_samples() -> None:
    prev = {"pop": "p", "workers": [_stats({"forward": 100, "new": 10}, 4)]}
    cur = {"pop": "p", "workers": [_stats({"forward": 300, "new": 30, "drop_no_route": 3}, 8)]}
    s = summarize(cur, prev, 2.0)
    assert s["packets"] == 333 and s["hits"] == 300
    assert s["rates"]["packets"] == pytest.approx((333 - 110) / 2)
    assert s["rates"]["hits"] == pytest.approx(100.0)
    assert s["drops"] == {"drop_no_route": 3, "miss_queue_full": 2}
    lat = s["store_latency"]["lookup"]
    assert lat["calls"] == 8 and lat["avg_s"] == pytest.approx(0.0005)
    text = format_stats(s)
    assert "111.5 pps" in text and "hits 300 (100.0/s)" in text
    assert "drop_no_route 3, miss_queue_full 2" in text and "fallbacks  1" in text
    two = {"pop": "p", "workers": [cur["workers"][0], _stats({"forward": 5}, 0, 11, 1)]}
    s2 = summarize(two, None, None)
    assert s2["hits"] == 305 and [w["worker"] for w in s2["per_worker"]] == [0, 1]
    assert "worker 1 (pid 11)" in format_stats(s2, [{"worker": 2, "message": "gone"}])


def test_stats_show_replica_reads() -> None:
    """The Redis store client's reads around failed masters, summed over the workers; no line
    for a store without them (the in-process one)."""
    w0, w1 = _stats({"forward": 1}, 2), _stats({"forward": 1}, 2, 11, 1)
    w0["store"] = {"connected": True, "counters": {"masters_failed": 1, "replica_reads": 40,
                   "replica_failures": 0, "failed_items": 3, "timeouts": 2}}  # fmt: skip
    w1["store"] = {"connected": True, "counters": {"masters_failed": 1, "replica_reads": 2,
                   "replica_failures": 1, "failed_items": 0}}  # fmt: skip
    s = summarize({"pop": "p", "workers": [w0, w1]}, None, None)
    assert s["store_client"] == {
        "masters_failed": 2, "replica_reads": 42, "replica_failures": 1, "failed_items": 3
    }  # fmt: skip
    text = format_stats(s)
    assert "replicas 42 lookups read from a replica, masters failed 2, replica failures 1; " in (
        text
    )
    assert "3 lookups unanswered" in text
    plain = summarize({"pop": "p", "workers": [_stats({"forward": 1}, 2)]}, None, None)
    assert "store_client" not in plain and "replica" not in format_stats(plain)


def test_backends_table_marks_runtime_changes() -> None:
    vip = {"vip": "tcp 192.0.2.10:80", "maglev_size": 200, "backends": [
        {"address": B1, "weight": 100, "state": "active", "healthy": None, "slots": 100,
         "configured_weight": 100, "configured_state": "active"},
        {"address": B2, "weight": 100, "state": "draining", "healthy": None, "slots": 0,
         "configured_weight": 100, "configured_state": "active"},
    ]}  # fmt: skip
    lines = format_backends([vip]).splitlines()
    assert lines[0].split() == ["VIP", "BACKEND", "WEIGHT", "STATE", "HEALTH", "NEW", "FLOWS"]
    assert "active" in lines[1] and "50.0%" in lines[1]
    assert "draining*" in lines[2] and "0.0%" in lines[2]
    assert lines[-1].startswith("* changed at runtime")
    change = {"changed": [{"vip": "tcp 192.0.2.10:80", "backend": B2, "weight": 100,
                           "state": "draining"}], "workers": [1, 0], "errors": []}  # fmt: skip
    assert format_change("drain", B2, change).splitlines()[-1] == "drained on workers 0, 1"
    assert "nothing to change" in format_change("drain", B2, {**change, "changed": []})


# --- explain -------------------------------------------------------------------------------------


def backends(*spec: tuple[str, int, str]) -> list[BackendView]:
    return [BackendView(a, w, s) for a, w, s in spec]


THREE = backends((B1, 100, "active"), (B2, 100, "active"), (B3, 100, "active"))


def local(backend: str, state: str = "established", expires: int = 1000) -> list[dict[str, Any]]:
    return [{"worker": 0, "backend": backend, "state": state, "expires_in_ms": expires}]


def found(backend: str, pop: str = "pop1") -> dict[str, Any]:
    return {"status": "found", "backend": backend, "pop": pop, "age_ms": 12_300, "ttl_ms": 1}


def test_explain_local_hit_store_agrees_maglev_agrees() -> None:
    d = reason(Facts("f", backends=THREE, local=local(B2), store=found(B2), maglev=B2))
    assert (d.backend, d.layer) == (B2, "local")
    assert d.why == f"Local table hit → {B2}; store agrees; Maglev would pick {B2} too."


def test_explain_backend_added_after_the_flow_started() -> None:
    four = [*THREE, BackendView(B4, 100, "active")]
    f = Facts("f", backends=four, local=local(B2), store=found(B2), maglev=B4,
              maglev_without={B1: B4, B3: B4, B4: B2})  # fmt: skip
    d = reason(f)
    assert d.why == (
        f"Local table hit → {B2}; store agrees; Maglev would pick {B4} now because backend "
        f"{B4} was added after the flow started."
    )


def test_explain_draining_and_weight_zero() -> None:
    drained = backends((B1, 100, "active"), (B2, 100, "draining"))
    d = reason(Facts("f", backends=drained, local=local(B2), store=found(B2), maglev=B1))
    assert d.backend == B2 and f"because {B2} is draining" in d.why
    zero = backends((B1, 100, "active"), (B2, 0, "active"))
    d = reason(Facts("f", backends=zero, local=[], store=found(B2), maglev=B1))
    assert (d.backend, d.layer) == (B2, "store")
    assert "local table miss; store lookup finds" in d.why.lower()
    assert f"because {B2} has weight 0" in d.why


def test_explain_store_disagrees_with_the_local_table() -> None:
    d = reason(Facts("f", backends=THREE, local=local(B1), store=found(B3, "pop7"), maglev=B1))
    assert d.backend == B1
    assert f"store says {B3} (pinned by POP pop7" in d.why and "local entry wins here" in d.why


def test_explain_fallbacks() -> None:
    d = reason(Facts("f", backends=THREE, local=[], store={"status": "absent"}, maglev=B3))
    assert (d.backend, d.layer) == (B3, "maglev")
    assert "store has no record; Maglev fallback picks" in d.why
    rejected = found("fd00:b::99")
    d = reason(Facts("f", backends=THREE, local=[], store=rejected, maglev=B3))
    assert (d.backend, d.layer) == (B3, "maglev") and "rejected" in d.why
    gone = {"status": "unavailable", "error": "timeout"}
    d = reason(Facts("f", backends=THREE, local=local(B1, expires=-5), store=gone, maglev=B1))
    assert (d.backend, d.layer) == (B1, "maglev")
    assert "Local entry expired" in d.why and "store unavailable (timeout)" in d.why
    none = backends((B1, 100, "draining"))
    d = reason(Facts("f", backends=none, local=[], store={"status": "absent"}, maglev=None))
    assert (d.backend, d.layer) == (None, "none") and "drop_no_backend" in d.why


def test_explain_with_partial_knowledge() -> None:
    d = reason(Facts("f", store=found(B2)))  # no forwarder, no config
    assert (d.backend, d.layer) == (B2, "store")
    assert d.why.startswith("Local table unknown") and "Maglev's choice unknown" in d.why
    d = reason(Facts("f", backends=THREE, local=local(B2), maglev=B2, forwarder_maglev=B1,
                     backends_source="config"))  # fmt: skip
    assert "the forwarder's own table picks" in d.why


def test_maglev_choice_matches_the_forwarder_plan() -> None:
    from forwarder.service import make_engine, plan_engine

    config = parse_config(
        {
            "pop": "p",
            "interfaces": ["eth0"],
            "source_ipv6": "fd00:3::10",
            "impl": "python",
            "vip": [
                {"address": "192.0.2.1", "port": 80, "protocol": "tcp", "maglev_size": 251,
                 "backend": [{"address": B1}, {"address": B2, "weight": 300},
                             {"address": B3, "state": "draining"}]}
            ],
        }
    )  # fmt: skip
    plan = plan_engine(config)
    engine = make_engine(config)
    for ip, bid in plan.backend_ids.items():
        engine.set_backend(bid, ip)
    engine.set_maglev(0, plan.tables[0])
    names = {bid: str(ipaddress.IPv6Address(ip)) for ip, bid in plan.backend_ids.items()}
    views = [BackendView(str(b.address), b.weight, str(b.state)) for b in config.vips[0].backends]
    for port in range(1000, 1300):
        h = FiveTuple.make("tcp", "10.0.0.1", port, "192.0.2.1", 80).hash64()
        assert maglev_choice(views, 251, h) == names[engine.maglev_pick(0, h)]
