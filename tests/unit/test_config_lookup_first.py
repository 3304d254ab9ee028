"""`udp_lookup_first` per [[vip]]: parsed, validated (ConfigError naming the field), default on for
UDP VIPs, off for TCP ones, and handed to the engine's `set_vip` by `apply_plan`."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from flowstate.errors import ConfigError
from forwarder import packet as P
from forwarder.config import parse_config
from forwarder.core import CoreConfig, ForwardingCore
from forwarder.fastpath import c_engine_available
from forwarder.service import apply_plan, make_engine, plan_engine

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "forwarder.toml"
IMPLS = ["python"] + (["c"] if c_engine_available() else [])


def config(**vip: Any) -> dict[str, Any]:
    return {
        "pop": "lab",
        "interfaces": ["veth0"],
        "source_ipv6": "fd00::10",
        "vip": [
            {
                "address": "10.0.0.1",
                "port": 80,
                "protocol": "tcp",
                "backend": [{"address": "fd00:b::1"}],
            },
            {
                "address": "10.0.0.1",
                "port": 53,
                "protocol": "udp",
                "backend": [{"address": "fd00:b::1"}],
                **vip,
            },
        ],
    }


def test_default_is_on_for_udp_and_off_for_tcp() -> None:
    tcp, udp = parse_config(config()).vips
    assert udp.udp_lookup_first is True and tcp.udp_lookup_first is False


def test_can_be_turned_off() -> None:
    assert parse_config(config(udp_lookup_first=False)).vips[1].udp_lookup_first is False


def test_not_a_boolean_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"vip\[1\]\.udp_lookup_first"):
        parse_config(config(udp_lookup_first="yes"))


def test_on_a_tcp_vip_names_the_field() -> None:
    data = config()
    data["vip"][0]["udp_lookup_first"] = True
    with pytest.raises(ConfigError, match=r"vip\[0\]\.udp_lookup_first.*udp"):
        parse_config(data)


def test_example_sets_it_on_its_udp_vip() -> None:
    with EXAMPLE.open("rb") as f:
        cfg = parse_config(tomllib.load(f))
    assert [v.udp_lookup_first for v in cfg.vips if v.protocol == 17] == [True]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on", [True, False])
def test_apply_plan_hands_it_to_the_engine(impl: str, on: bool) -> None:
    data = config(udp_lookup_first=on)
    data["impl"] = impl
    cfg = parse_config(data)
    engine = make_engine(cfg)
    core = ForwardingCore(engine, CoreConfig(pop="lab"))
    apply_plan(engine, core, plan_engine(cfg), cfg)
    client, vip = bytes([198, 51, 100, 7]), bytes([10, 0, 0, 1])
    frame = P.frame(P.ipv4(client, vip, P.udp(client, vip, 5000, 53, b"q"), proto=17))
    verdict = engine.process([frame], 1000).verdicts[0]
    assert verdict == (P.Verdict.MISS if on else P.Verdict.NEW)
