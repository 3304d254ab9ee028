"""Runtime backend overrides (forwarder.overrides): the state file's format, its atomic writes,
laying overrides over a config (start, reload), bad files; and through a real in-process
`Forwarder`'s control API: drain, reload, restart, reset."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flowstate import cli
from flowstate.cli_ops import format_backends
from flowstate.control_client import VipSelector
from forwarder import overrides
from forwarder.config import BackendState, ForwarderConfig, load_config, parse_config
from forwarder.overrides import Override, StateFileError
from forwarder.privileges import Identity
from forwarder.reload import reload_config
from tests.unit.test_cli_control import start, stop

B1, B2, B3 = "2001:db8:b::1", "2001:db8:b::2", "2001:db8:b::3"
VIP = "192.0.2.10"


def config_text(state_file: Path, backends: tuple[str, ...] = (B1, B2, B3)) -> str:
    text = (
        'pop = "pop1"\ninterfaces = ["eth0"]\nsource_ipv6 = "2001:db8:f0::1"\nimpl = "python"\n'
        f'[control]\nsocket = "{state_file.parent.parent}/ctl.sock"\nmetrics = ""\n'
        f'state_file = "{state_file}"\n'
    )
    for port, proto in ((80, "tcp"), (53, "udp")):
        text += f'[[vip]]\naddress = "{VIP}"\nport = {port}\nprotocol = "{proto}"\n'
        text += "maglev_size = 251\n"
        for b in backends:
            weight = 200 if b == B3 else 100
            text += f'[[vip.backend]]\naddress = "{b}"\nweight = {weight}\n'
    return text


def config(tmp_path: Path, backends: tuple[str, ...] = (B1, B2, B3)) -> ForwarderConfig:
    path = tmp_path / "forwarder.toml"
    path.write_text(config_text(tmp_path / "state" / "backends.json", backends))
    return load_config(path)


def key(port: int, backend: str, proto: int = 6) -> overrides.Key:
    return ((ipaddress.IPv4Address(VIP).packed, port, proto), ipaddress.IPv6Address(backend))


def backend(cfg: ForwarderConfig, port: int, address: str) -> tuple[str, int]:
    v = next(v for v in cfg.vips if v.port == port)
    b = next(b for b in v.backends if str(b.address) == address)
    return str(b.state), b.weight


# --- pure logic ----------------------------------------------------------------------------------


def test_diff_and_apply_round_trip(tmp_path: Path) -> None:
    configured = config(tmp_path)
    ov = {
        key(80, B3): Override(state=BackendState.DRAINING, changed_at=5.0),
        key(53, B1, 17): Override(weight=0, changed_at=6.0),
    }
    running, kept, dropped = overrides.apply(configured, ov)
    assert kept == ov and dropped == []
    assert backend(running, 80, B3) == ("draining", 200)
    assert backend(running, 53, B1) == ("active", 0)
    assert backend(running, 53, B3) == ("active", 200)  # another VIP: untouched
    assert overrides.diff(configured, running, ov) == ov  # changed_at kept when unchanged
    assert overrides.diff(configured, configured, ov) == {}
    fresh = overrides.diff(configured, running, {})
    assert fresh.keys() == ov.keys() and all(o.changed_at > 1e9 for o in fresh.values())


def test_apply_drops_what_the_config_no_longer_has_or_now_agrees_with(tmp_path: Path) -> None:
    configured = config(tmp_path, backends=(B1, B2))
    ov = {
        key(80, B3): Override(state=BackendState.DRAINING),  # B3 removed from the config
        key(80, B1): Override(state=BackendState.ACTIVE, weight=7),  # state as configured
        key(80, B2): Override(weight=100),  # the config's weight: nothing left
    }
    running, kept, dropped = overrides.apply(configured, ov)
    assert kept == {key(80, B1): Override(weight=7)}
    assert backend(running, 80, B1) == ("active", 7)
    assert backend(running, 80, B2) == ("active", 100)
    assert len(dropped) == 3
    assert any(f"backend {B3} of tcp {VIP}:80: no longer in the config" in d for d in dropped)
    assert any(f"{B1} of tcp {VIP}:80: the config now has the override's state active" in d
               for d in dropped)  # fmt: skip
    assert any("weight 100" in d for d in dropped)


def test_encode_decode_round_trip() -> None:
    ov = {
        key(80, B3): Override(state=BackendState.DRAINING, weight=3, changed_at=1700000000.5),
        (
            (ipaddress.IPv6Address("2001:db8::80").packed, 443, 6),
            ipaddress.IPv6Address(B1),
        ): Override(weight=0, changed_at=1.0),
    }
    data = overrides.encode(ov)
    doc = json.loads(data)
    assert doc["version"] == 1
    entry = {"vip": {"address": VIP, "port": 80, "protocol": "tcp"}, "backend": B3,
             "state": "draining", "weight": 3, "changed_at": 1700000000.5}  # fmt: skip
    assert entry in doc["overrides"]
    assert overrides.decode(data) == ov
    assert overrides.decode(overrides.encode({})) == {}


@pytest.mark.parametrize(
    "data, why",
    [
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b'{"version": 2, "overrides": []}', "not a version 1"),
        (b'{"version": 1}', "not a list"),
        (
            b'{"version": 1, "overrides": [{"backend": "2001:db8:b::1"}]}',
            "missing or unknown 'vip'",
        ),
        (
            b'{"version": 1, "overrides": [{"vip": {"address": "192.0.2.10", "port": 80, '
            b'"protocol": "tcp"}, "backend": "2001:db8:b::1", "weight": 70000}]}',
            "weight 70000",
        ),
        (
            b'{"version": 1, "overrides": [{"vip": {"address": "192.0.2.10", "port": 80, '
            b'"protocol": "tcp"}, "backend": "2001:db8:b::1"}]}',
            "neither state nor weight",
        ),
        (
            b'{"version": 1, "overrides": [{"vip": {"address": "192.0.2.10", "port": 80, '
            b'"protocol": "sctp"}, "backend": "2001:db8:b::1", "state": "draining"}]}',
            "sctp",
        ),
    ],
)
def test_decode_rejects_bad_files(data: bytes, why: str) -> None:
    with pytest.raises(StateFileError, match=re.escape(why)):
        overrides.decode(data)


def test_decode_rejects_a_backend_listed_twice() -> None:
    one = overrides.encode({key(80, B1): Override(weight=1)})
    doc = json.loads(one)
    doc["overrides"] *= 2
    with pytest.raises(StateFileError, match="listed twice"):
        overrides.decode(json.dumps(doc).encode())


# --- the file ------------------------------------------------------------------------------------


def test_save_is_atomic_private_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state" / "backends.json"
    assert overrides.load(path) == {}  # no file: no overrides
    ov = {key(80, B2): Override(state=BackendState.DRAINING, changed_at=2.0)}
    overrides.save(path, ov)
    assert overrides.load(path) == ov
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    inode = os.stat(path).st_ino
    overrides.save(path, {})
    assert overrides.load(path) == {}
    assert os.stat(path).st_ino != inode  # replaced by rename, never rewritten in place
    assert os.listdir(path.parent) == ["backends.json"]


def test_save_failure_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "backends.json"
    ov = {key(80, B2): Override(weight=5)}
    overrides.save(path, ov)
    (path.parent / f"backends.json.tmp.{os.getpid()}").mkdir()  # the temp file cannot be made
    with pytest.raises(OSError):
        overrides.save(path, {})
    assert overrides.load(path) == ov


def test_reapply_at_start_prunes_and_rewrites(tmp_path: Path) -> None:
    configured = config(tmp_path, backends=(B1, B2))
    path = configured.control.state_file
    assert path is not None
    overrides.save(
        path,
        {
            key(80, B1): Override(state=BackendState.DRAINING),
            key(80, B3): Override(state=BackendState.DRAINING),
        },
    )
    before = path.read_bytes()
    running, kept = overrides.reapply(configured, writer=False)  # a reader never writes
    assert backend(running, 80, B1) == ("draining", 100) and list(kept) == [key(80, B1)]
    assert path.read_bytes() == before
    running, kept = overrides.reapply(configured, writer=True)
    assert backend(running, 80, B1) == ("draining", 100)
    assert overrides.load(path) == {key(80, B1): Override(state=BackendState.DRAINING)}


def test_a_corrupt_file_is_set_aside_and_the_forwarder_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    configured = config(tmp_path)
    path = configured.control.state_file
    assert path is not None
    path.parent.mkdir()
    path.write_bytes(b'{"version": 1, "overrides": [')  # torn by hand
    caplog.set_level(logging.INFO, "flowstate.forwarder")
    running, kept = overrides.reapply(configured, writer=False)
    assert running == configured and kept == {}
    assert path.exists()  # only worker 0 moves it
    running, kept = overrides.reapply(configured, writer=True)
    assert running == configured and kept == {}
    assert not path.exists()
    assert (path.parent / "backends.json.bad").read_bytes() == b'{"version": 1, "overrides": ['
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("is unusable" in e and "no runtime overrides" in e for e in errors)
    assert any("kept as" in e and "backends.json.bad" in e for e in errors)


def test_a_corrupt_file_at_reload_keeps_the_running_overrides(tmp_path: Path) -> None:
    configured = config(tmp_path)
    path = configured.control.state_file
    assert path is not None
    path.parent.mkdir()
    path.write_bytes(b"garbage")
    running_ov = {key(53, B2, 17): Override(weight=9)}
    running, kept = overrides.reapply(configured, writer=True, running=running_ov)
    assert backend(running, 53, B2) == ("active", 9) and kept == running_ov
    assert overrides.load(path) == running_ov  # written back
    assert (path.parent / "backends.json.bad").read_bytes() == b"garbage"


def test_no_state_file_keeps_nothing(tmp_path: Path) -> None:
    configured = config(tmp_path)
    memory_only = replace(configured, control=replace(configured.control, state_file=None))
    running, kept = overrides.reapply(
        memory_only, writer=True, running={key(80, B1): Override(weight=1)}
    )
    assert running == memory_only and kept == {}


def test_config_default_and_empty_state_file(tmp_path: Path) -> None:
    base = {"pop": "p", "interfaces": ["eth0"], "source_ipv6": "2001:db8::1",
            "vip": [{"address": VIP, "port": 80, "protocol": "tcp",
                     "backend": [{"address": B1}]}]}  # fmt: skip
    c = parse_config(base)
    assert c.control.state_file == Path("/var/lib/flowstate/overrides/backends.json")
    off = parse_config({**base, "control": {"state_file": ""}})
    assert off.control.state_file is None


def test_give_directory_takes_over_only_its_own(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    nobody = Identity("nobody", 65534, 65534, (65534,))
    path = tmp_path / "state" / "backends.json"
    overrides.give_directory(path, nobody)
    st = os.stat(path.parent)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "pop-drained").write_text("")
    with pytest.raises(OSError, match="holds other files"):
        overrides.give_directory(shared / "backends.json", nobody)
    assert os.stat(shared).st_uid == 0


# --- the CLI ------------------------------------------------------------------------------------


def test_ls_marks_each_overridden_value_and_says_where_it_is_kept() -> None:
    vip: dict[str, Any] = {"vip": f"tcp {VIP}:80", "maglev_size": 200, "backends": [
        {"address": B1, "weight": 100, "state": "active", "healthy": None, "slots": 200,
         "configured_weight": 100, "configured_state": "active"},
        {"address": B2, "weight": 0, "state": "draining", "healthy": None, "slots": 0,
         "configured_weight": 100, "configured_state": "active"},
    ]}  # fmt: skip
    lines = format_backends([vip], "/var/lib/flowstate/overrides/backends.json").splitlines()
    assert "*" not in lines[1]
    assert "0*" in lines[2] and "draining*" in lines[2]
    assert lines[3] == f"* {B2} on tcp {VIP}:80: the config file says active, weight 100"
    assert lines[-1].startswith("* changed at runtime: an override of the config file, kept in ")
    assert "/var/lib/flowstate/overrides/backends.json" in lines[-1]
    memory = format_backends([vip], None).splitlines()[-1]
    assert "in memory only: lost at the next reload or restart" in memory
    vip["backends"] = vip["backends"][:1]
    assert "changed at runtime" not in format_backends([vip], None)


@pytest.mark.parametrize("extra", [[], ["7", "--reset"]])
def test_weight_needs_a_weight_or_reset(
    extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["backends", "weight", B1, *extra, "--socket", str(tmp_path / "none.sock")]
    assert cli.main(argv) == 2
    assert "give either WEIGHT or --reset" in capsys.readouterr().err


# --- through a real forwarder's control API ------------------------------------------------------


async def test_drain_outlives_reload_and_restart_until_undrained(tmp_path: Path) -> None:
    cfg_path = tmp_path / "forwarder.toml"
    configured = config(tmp_path)
    path = configured.control.state_file
    assert path is not None
    r = await start(configured)
    r.fwd.config_path = cfg_path
    try:
        async with await r.client() as c:
            answer = await c.drain(B3, VipSelector.parse(f"tcp {VIP}:80"))
            assert answer["changed"] and dict(answer)["save_error"] is None
            assert overrides.load(path).keys() == {key(80, B3)}
            reloaded = await reload_config(r.fwd)
            assert reloaded["applied"] and reloaded["changes"] == []
            assert backend(r.fwd.config, 80, B3) == ("draining", 200)
            assert backend(r.fwd.configured, 80, B3) == ("active", 200)
            listing = await c.backends()
            info = {(v["vip"], b["address"]): b for v in listing["vips"] for b in v["backends"]}
            assert info[(f"tcp {VIP}:80", B3)]["state"] == "draining"
            assert info[(f"tcp {VIP}:80", B3)]["configured_state"] == "active"
            assert info[(f"tcp {VIP}:80", B3)]["slots"] == 0
            assert dict(listing)["state_file"] == str(path)
            await c.set_weight(B1, 0)
            assert len(overrides.load(path)) == 3  # B3 drained, B1 weight 0 on both VIPs
        argv = ["backends", "weight", B1, "--reset", "--socket", str(r.path)]
        code = await asyncio.to_thread(cli.main, argv)
        assert code == 0
        assert overrides.load(path).keys() == {key(80, B3)}
        assert backend(r.fwd.config, 53, B1) == ("active", 100)
    finally:
        await stop(r)
    # A restart (what `serve` does at start): the drain is there again.
    running, _ = overrides.reapply(load_config(cfg_path), writer=True)
    assert backend(running, 80, B3) == ("draining", 200)
    r = await start(running)
    r.fwd.configured = load_config(cfg_path)
    try:
        async with await r.client() as c:
            undrained = await c.undrain(B3)
            assert undrained["changed"]
            assert overrides.load(path) == {}
            await c.drain(B2)
            await c.set_weight(B2, 3, VipSelector.parse(f"{VIP}:53/udp"))
            assert len(overrides.load(path)) == 2
        code = await asyncio.to_thread(cli.main, ["backends", "reset", B2, "--socket", str(r.path)])
        assert code == 0
        assert overrides.load(path) == {}
        assert backend(r.fwd.config, 80, B2) == ("active", 100)
    finally:
        await stop(r)
