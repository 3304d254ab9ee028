"""`read_from_replicas`: the store's setting and the forwarder's `[store]` key."""

from __future__ import annotations

import pytest

from flowstate.errors import ConfigError, UsageError
from flowstate.store.base import ReplicaReads, StoreConfig
from forwarder.config import parse_config

MINIMAL = {
    "pop": "lab",
    "interfaces": ["veth0"],
    "source_ipv6": "fd00::10",
    "vip": [
        {
            "address": "10.0.0.1",
            "port": 80,
            "protocol": "tcp",
            "backend": [{"address": "fd00:b::1"}],
        }
    ],
}


def _with_store(**store: object) -> dict[str, object]:
    return {**MINIMAL, "store": {"seeds": ["127.0.0.1:7000"], **store}}


def test_store_config_default_and_strings() -> None:
    assert StoreConfig().read_from_replicas is ReplicaReads.ON_FAILURE
    off = StoreConfig(read_from_replicas="off")  # type: ignore[arg-type]
    assert off.read_from_replicas is ReplicaReads.OFF
    with pytest.raises(UsageError, match="read_from_replicas"):
        StoreConfig(read_from_replicas="always")  # type: ignore[arg-type]


def test_forwarder_config_key() -> None:
    assert parse_config(_with_store()).store.read_from_replicas is ReplicaReads.ON_FAILURE
    c = parse_config(_with_store(read_from_replicas="off"))
    assert c.store.read_from_replicas is ReplicaReads.OFF
    with pytest.raises(ConfigError) as err:
        parse_config(_with_store(read_from_replicas="sometimes"))
    assert err.value.field == "store.read_from_replicas"
    assert "'off'" in str(err.value) and "'on-failure'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(_with_store(read_from_replicas=True))
    assert err.value.field == "store.read_from_replicas"
