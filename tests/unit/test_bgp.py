"""BGP announcer: health in → announce/withdraw out (injected clock), birdc calls, the
supervisor side with real worker processes and a fake birdc, the `flowstate bgp` view."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flowstate.cli_bgp import format_bgp
from flowstate.flow import Proto
from forwarder.bgp import (
    AnnounceDecision,
    Announcer,
    BirdControl,
    BirdResult,
    WorkerReport,
    WorkerView,
    announcer_socket,
    pop_problems,
    usable_backends,
)
from forwarder.config import (
    BackendConfig,
    BackendState,
    BgpConfig,
    BgpKind,
    ForwarderConfig,
    VipConfig,
    parse_config,
)

CONFIG = """
pop = "lab"
interfaces = ["veth0"]
source_ipv6 = "fd00::10"

[bgp]
kind = "bird"
socket = "/run/test-bird.ctl"
announce_delay_ms = 1000

[[vip]]
address = "10.0.0.1"
port = 80
protocol = "tcp"

[[vip.backend]]
address = "fd00:b::1"
"""


def config(tmp_path: Path, **bgp: Any) -> ForwarderConfig:
    data = tomllib.loads(CONFIG)
    data["control"] = {"socket": str(tmp_path / "ctl.sock")}
    data["bgp"].update({"drain_file": str(tmp_path / "drained"), **bgp})
    return parse_config(data)


# ---- the decision ----------------------------------------------------------------------------


def healthy(seen_ms: int, **report: Any) -> WorkerView:
    return WorkerView(pid=10, report=WorkerReport(**report), seen_ms=seen_ms)


def test_no_announce_before_health_has_held_for_the_delay() -> None:
    d = AnnounceDecision(announce_delay_ms=1000)
    assert not d.announced
    assert d.check(0, []) is None
    assert d.check(999, []) is None
    assert d.reason == "healthy for 999 ms of 1000 ms"
    change = d.check(1000, [])
    assert change is not None and change.announce and d.announced
    assert change.reason == "healthy for 1000 ms"
    assert d.check(5000, []) is None  # no change while it stays healthy


def test_one_failed_check_withdraws_at_once() -> None:
    d = AnnounceDecision(announce_delay_ms=0)
    assert d.check(0, []) is not None
    change = d.check(200, ["worker 0 killed by SIGKILL"])
    assert change is not None and not change.announce
    assert change.reason == "worker 0 killed by SIGKILL"
    assert d.check(400, ["worker 0 starting"]) is None  # already withdrawn
    assert d.reason == "worker 0 starting"


def test_a_problem_restarts_the_delay() -> None:
    d = AnnounceDecision(announce_delay_ms=1000)
    d.check(0, [])
    assert d.check(600, ["worker 0 starting"]) is None
    assert d.check(800, []) is None
    assert d.check(1700, []) is None  # healthy for 900 ms only
    change = d.check(1800, [])
    assert change is not None and change.announce


def test_drain_withdraws_and_undrain_of_a_healthy_pop_announces_at_once() -> None:
    d = AnnounceDecision(announce_delay_ms=1000)
    d.check(0, [])
    assert d.check(1000, []) is not None
    change = d.check(1200, [], drained=True)
    assert change == type(change)(False, "POP drained (flowstate drain-pop)")
    assert d.check(5000, [], drained=True) is None  # health held all along
    change = d.check(5200, [])
    assert change is not None and change.announce


def test_drained_pop_stays_withdrawn_through_recovery() -> None:
    d = AnnounceDecision(announce_delay_ms=0)
    assert d.check(0, ["worker 0 starting"], drained=True) is None
    assert d.check(200, [], drained=True) is None
    assert not d.announced and d.reason == "POP drained (flowstate drain-pop)"


def test_stopping_withdraws_whatever_the_health() -> None:
    d = AnnounceDecision(announce_delay_ms=0)
    d.check(0, [])
    change = d.check(100, [], stopping="forwarder stopping (SIGTERM)")
    assert change is not None and not change.announce
    assert change.reason == "forwarder stopping (SIGTERM)"


def test_problems_of_the_workers() -> None:
    now = 10_000

    def problems(workers: dict[int, WorkerView], store_required: bool = False) -> list[str]:
        return pop_problems(now, workers, stall_ms=1000, store_required=store_required)

    assert problems({0: healthy(now - 100), 1: healthy(now - 1000)}) == []
    assert problems({}) == ["no worker running"]
    assert problems({0: WorkerView(pid=1, exit_code=-signal.SIGKILL)}) == [
        "worker 0 killed by SIGKILL"
    ]
    assert problems({1: WorkerView(pid=1, exit_code=3)}) == ["worker 1 exited with status 3"]
    assert problems({0: WorkerView(pid=1, gone=True)}) == ["worker 0 exited"]
    assert problems({0: WorkerView(pid=1)}) == ["worker 0 starting"]
    assert problems({0: healthy(now - 1001)}) == ["worker 0 stalled (no heartbeat for 1001 ms)"]
    down = {0: healthy(now, vips_down=("tcp 10.0.0.1:80",)), 1: healthy(now, vips_down=("x",))}
    assert problems(down) == ["no usable backend for tcp 10.0.0.1:80", "no usable backend for x"]
    lost = {0: healthy(now, store_connected=False), 1: healthy(now, store_connected=False)}
    assert problems(lost) == []  # fallback on: forwarding goes on without the store
    assert problems(lost, store_required=True) == ["store not connected"]  # said once


def test_usable_backends() -> None:
    def backend(n: int, **kw: Any) -> BackendConfig:
        return BackendConfig(address=ipaddress.IPv6Address(f"fd00:b::{n}"), **kw)

    vip = VipConfig(
        address=ipaddress.IPv4Address("10.0.0.1"),
        port=80,
        protocol=Proto.TCP,
        backends=(backend(1), backend(2, state=BackendState.DRAINING), backend(3, weight=0)),
    )
    assert usable_backends(vip) == 1
    key = (vip.address.packed, 80, int(Proto.TCP))
    assert usable_backends(vip, {(key, vip.backends[0].address.packed)}) == 0
    other = ((vip.address.packed, 81, int(Proto.TCP)), vip.backends[0].address.packed)
    assert usable_backends(vip, {other}) == 1


def test_report_round_trip_and_garbage() -> None:
    report = WorkerReport(("tcp 10.0.0.1:80",), store_connected=False)
    line = report.encode()
    assert line.endswith(b"\n") and WorkerReport.decode(line) == report
    for bad in (b"[]", b'{"vips_down": "x", "store": true}', b'{"vips_down": []}', b"\xff"):
        with pytest.raises(ValueError):
            WorkerReport.decode(bad)


# ---- birdc -----------------------------------------------------------------------------------


class FakeBirdc:
    """Stands in for subprocess.run(["birdc", ...]): keeps protocol states like BIRD does."""

    def __init__(self, protocols: tuple[str, ...] = ("vip4", "vip6")) -> None:
        self.enabled = dict.fromkeys(protocols, False)
        self.calls: list[list[str]] = []
        self.fail: BaseException | str | None = None

    def __call__(self, argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        if isinstance(self.fail, BaseException):
            raise self.fail
        verb, proto = argv[-2:]
        if self.fail is not None or proto not in self.enabled:
            out = self.fail or "syntax error, unexpected CF_SYM_UNDEFINED"
            return subprocess.CompletedProcess(argv, 1, f"BIRD 2.0.12 ready.\n{out}\n", "")
        want = verb == "enable"
        already = "already " if self.enabled[proto] == want else ""
        self.enabled[proto] = want
        return subprocess.CompletedProcess(
            argv, 0, f"BIRD 2.0.12 ready.\n{proto}: {already}{verb}d\n", ""
        )


def test_birdc_commands_and_answers() -> None:
    fake = FakeBirdc()
    bird = BirdControl(BgpConfig(kind=BgpKind.BIRD, socket=Path("/s.ctl")), run=fake)
    assert bird.apply(True) == BirdResult(("vip4", "vip6"))
    assert fake.calls == [
        ["birdc", "-s", "/s.ctl", "enable", "vip4"],
        ["birdc", "-s", "/s.ctl", "enable", "vip6"],
    ]
    assert bird.apply(True) == BirdResult(())  # already so: nothing changed, no error
    assert bird.apply(False) == BirdResult(("vip4", "vip6"))
    assert fake.enabled == {"vip4": False, "vip6": False}


def test_birdc_failures_are_reported_not_raised() -> None:
    fake = FakeBirdc(("vip4",))
    bird = BirdControl(BgpConfig(kind=BgpKind.BIRD, protocols=("vip4", "vip9")), run=fake)
    result = bird.apply(True)
    assert result.changed == ("vip4",)
    assert result.error == "birdc enable vip9: syntax error, unexpected CF_SYM_UNDEFINED"
    fake.fail = "Unable to connect to server control socket (/run/bird/bird.ctl): No such file"
    assert bird.apply(False).error is not None
    assert "Unable to connect" in str(bird.apply(False).error)
    fake.fail = FileNotFoundError()
    assert bird.apply(False) == BirdResult((), "birdc: not found")
    fake.fail = subprocess.TimeoutExpired("birdc", 2.0)
    assert bird.apply(False).error == (
        "birdc disable vip4: no answer in 2 s; birdc disable vip9: no answer in 2 s"
    )


# ---- the announcer in the supervisor ----------------------------------------------------------

#: A stand-in worker: heartbeats on the fd given as its last argument until killed.
WORKER = """
import os, sys, time
fd = int(sys.argv[-1])
while True:
    os.write(fd, b'{"vips_down": [], "store": true}\\n')
    time.sleep(0.02)
"""


@pytest.fixture
def announcer(tmp_path: Path) -> Iterator[tuple[Announcer, FakeBirdc]]:
    fake = FakeBirdc()
    # A stall timeout far beyond the tests' waits: a withdrawal they see comes from an exit.
    cfg = config(tmp_path, announce_delay_ms=0, check_interval_ms=50, stall_timeout_ms=600_000)
    a = Announcer(cfg, bird=BirdControl(cfg.bgp, run=fake))
    a.start()
    yield a, fake
    procs = [w.proc for w in a._workers.values()]
    a.close("test over")
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(a: Announcer, predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        a.wait(0.02)
    return True


def test_worker_sigkill_withdraws_at_the_next_select(
    announcer: tuple[Announcer, FakeBirdc],
) -> None:
    a, fake = announcer
    assert a.status.applied is False  # withdrawn at start, before any worker reported
    proc = a.start_worker(0, [sys.executable, "-c", WORKER])
    assert wait_for(a, lambda: a.status.applied is True)
    assert fake.enabled == {"vip4": True, "vip6": True}
    proc.kill()
    assert wait_for(a, lambda: a.status.applied is False)
    assert fake.enabled == {"vip4": False, "vip6": False}
    assert a.decision.reason in ("worker 0 killed by SIGKILL", "worker 0 exited")
    a.start_worker(0, [sys.executable, "-c", WORKER])  # what the supervisor does
    assert wait_for(a, lambda: a.status.applied is True)
    assert a.status.changes == 3  # announce, withdraw, announce (the start is no change)


def test_drain_and_undrain_over_the_socket(
    announcer: tuple[Announcer, FakeBirdc], tmp_path: Path
) -> None:
    a, fake = announcer
    a.start_worker(0, [sys.executable, "-c", WORKER])
    assert wait_for(a, lambda: a.status.applied is True)

    def call(method: str) -> dict[str, Any]:
        path = announcer_socket(tmp_path / "ctl.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(json.dumps({"id": 7, "method": method}).encode() + b"\n")
            s.setblocking(False)
            buf = b""
            while not buf.endswith(b"\n"):
                a.wait(0.02)
                with contextlib.suppress(BlockingIOError):
                    buf += s.recv(65536)
        answer: dict[str, Any] = json.loads(buf)
        assert answer["id"] == 7
        return answer

    drained = call("drain_pop")["result"]
    assert drained["announced"] is False and drained["drained"] is True
    assert drained["reason"] == "POP drained (flowstate drain-pop)"
    assert fake.enabled == {"vip4": False, "vip6": False}
    assert (tmp_path / "drained").exists()
    status = call("bgp")["result"]
    assert status["workers"][0]["state"] == "running" and status["healthy"] is True
    text = format_bgp(status)
    assert text.startswith("POP lab: WITHDRAWN for ")
    assert "drained: yes" in text and "worker 0 (pid " in text
    undrained = call("undrain_pop")["result"]
    assert undrained["announced"] is True and not (tmp_path / "drained").exists()
    assert call("nonsense")["error"]["code"] == "unknown_method"


def test_drain_file_outlives_a_restart(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    fake = FakeBirdc()
    first = Announcer(cfg, bird=BirdControl(cfg.bgp, run=fake), serve=False)
    assert first.set_drained(True) is None
    first.close("test")
    second = Announcer(cfg, bird=BirdControl(cfg.bgp, run=fake), serve=False)
    assert second.drained
    second.close("test")
    memory_only = replace(cfg, bgp=replace(cfg.bgp, drain_file=None))
    third = Announcer(memory_only, bird=BirdControl(cfg.bgp, run=fake), serve=False)
    assert not third.drained
    third.close("test")


def test_withdraws_when_stopping_and_retries_when_bird_fails(tmp_path: Path) -> None:
    now = [0]
    cfg = config(tmp_path, announce_delay_ms=0)
    fake = FakeBirdc()
    a = Announcer(cfg, bird=BirdControl(cfg.bgp, run=fake), clock=lambda: now[0], serve=False)
    a.start()
    # As if announced; then BIRD becomes unreachable.
    a.decision.announced = a.status.applied = True
    fake.enabled = {"vip4": True, "vip6": True}
    fake.fail = "Unable to connect to server control socket"
    now[0] = 300
    a.check()  # no worker: withdraw, which fails
    assert a.status.bird_error is not None and not a.decision.announced
    calls = len(fake.calls)
    now[0] = 600
    a.check()  # within the retry interval: no call
    assert len(fake.calls) == calls and a.status.applied is True
    fake.fail = None
    now[0] = 1300
    a.check()
    assert len(fake.calls) > calls and a.status.applied is False and a.status.bird_error is None
    assert fake.enabled == {"vip4": False, "vip6": False}
    a.close("stopping")


def test_worker_report_reads_the_plan_and_the_store(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from forwarder.bgp import _ReportCache, worker_report
    from forwarder.service import plan_engine

    cfg = config(tmp_path)
    vip, backend = cfg.vips[0], cfg.vips[0].backends[0]
    fwd: Any = SimpleNamespace(config=cfg, plan=plan_engine(cfg), store=object())
    cache = _ReportCache()
    assert worker_report(fwd, cache) == WorkerReport((), store_connected=True)
    key = ((vip.address.packed, vip.port, int(vip.protocol)), backend.address.packed)
    fwd.plan = plan_engine(cfg, down={key})  # health checks took the only backend out
    fwd.store = None
    assert worker_report(fwd, cache) == WorkerReport(("tcp 10.0.0.1:80",), store_connected=False)


def test_stats_view_shows_the_announce_state() -> None:
    from flowstate.cli_ops import format_stats, summarize

    worker = {
        "worker": 0,
        "pid": 5,
        "uptime_s": 1.0,
        "engine": {},
        "core": {},
        "rings": [],
        "store": {"connected": True},
        "store_latency": {},
    }
    bgp = {"announced": False, "protocols": ["vip4", "vip6"], "reason": "worker 0 starting"}
    text = format_stats(summarize({"pop": "p", "workers": [worker], "bgp": bgp}, None, None))
    assert "bgp        WITHDRAWN (vip4, vip6): worker 0 starting" in text
    text = format_stats(summarize({"pop": "p", "workers": [worker], "bgp": None}, None, None))
    assert "bgp " not in text
    gone = {"error": "no forwarder control socket at /run/x.bgp"}
    text = format_stats(summarize({"pop": "p", "workers": [worker], "bgp": gone}, None, None))
    assert "bgp        announcer not answering: no forwarder control socket" in text
