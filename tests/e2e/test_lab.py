"""End to end: the anycast lab (deploy/lab) in a short scenario, and that it leaves nothing behind.

Two BGP route moves and a backend added by rolling forwarder restarts, under 60 long-lived
connections: flowstate mode must keep every connection, naive mode must lose some. Afterwards
(and after a run interrupted with Ctrl-C) no namespace, veth, BIRD, Redis or other process of the
lab may be left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.labkit.cli import run_lab
from deploy.labkit.results import summarize
from deploy.labkit.scenario import ScenarioOptions
from deploy.labkit.topology import Lab
from forwarder.fastpath import c_engine_available
from tests.e2e.conftest import require_netns

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
LAB_DEVICES = re.compile(r"^(c-rt|rt-c|rt-pop\d+|rt-fab|uplink|fabric|f-[a-z0-9]+)$")


def require_lab_tools() -> None:
    require_netns()
    missing = [b for b in ("bird", "birdc", "redis-server", "redis-cli") if not shutil.which(b)]
    problem = f"not installed: {', '.join(missing)}" if missing else None
    if problem is None and not c_engine_available():
        problem = "the C fast path is not built (pip install -e .)"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the lab test cannot run in CI: {problem}")
    pytest.skip(problem)


@dataclass
class Footprint:
    """What a lab made: namespaces (name → nsfs inode), processes, its work dir."""

    namespaces: dict[str, int] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)
    workdir: Path | None = None

    def note(self, names: list[str]) -> None:
        for name in names:
            with_path = Path("/run/netns") / name
            if with_path.exists():
                self.namespaces[name] = with_path.stat().st_ino
                listed = subprocess.run(
                    ["ip", "netns", "pids", name], capture_output=True, text=True
                ).stdout
                self.pids.update(int(p) for p in listed.split())

    def leftovers(self) -> list[str]:
        """Everything of the lab that still exists."""
        left = [f"namespace {n}" for n in self.namespaces if os.path.exists(f"/run/netns/{n}")]
        inodes = set(self.namespaces.values())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                ns = os.readlink(f"/proc/{entry}/ns/net")
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            pid = int(entry)
            inode = int(ns.split("[")[1].rstrip("]"))
            in_workdir = self.workdir is not None and str(self.workdir) in cmd
            if pid in self.pids or inode in inodes or in_workdir:
                left.append(f"process {pid} ({cmd.strip()[:80]})")
        host_links = subprocess.run(
            ["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True
        ).stdout
        for line in host_links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if LAB_DEVICES.match(name):
                left.append(f"veth {name} in the host namespace")
        if self.workdir is not None and self.workdir.exists():
            left.append(f"work dir {self.workdir}")
        return left


def test_flowstate_keeps_every_connection_naive_loses_them() -> None:
    require_lab_tools()
    footprint = Footprint()
    lines: list[str] = []

    def built(lab: Lab) -> None:
        footprint.workdir = lab.workdir
        footprint.note([ns.name for ns in lab.topo.namespaces])

    opts = ScenarioOptions(
        connections=60,
        udp_flows=6,
        interval=0.05,
        gap=2.5,
        warmup=1.0,
        steps=("move:pop2", "add:5", "move:pop3"),
    )
    started = time.monotonic()
    runs = run_lab(["flowstate", "naive"], opts, log=lines.append, on_built=built)
    took = time.monotonic() - started
    log = "\n".join(lines)
    summaries = {run.mode: summarize(run) for run in runs}

    flowstate, naive = summaries["flowstate"], summaries["naive"]
    assert flowstate["connections"] == 60, log
    assert flowstate["reset"] == 0, (flowstate, log)
    assert flowstate["stalled"] == 0, (flowstate, log)
    assert flowstate["completed"] == 60, (flowstate, log)
    assert flowstate["route_moves"] >= 2, flowstate
    assert flowstate["backend_changes"] == 1
    assert flowstate["served_by_several_pops"] == 60
    # Every connection was carried by three POPs' forwarders and still reached one backend;
    # the moved ones were found in the store, none guessed by Maglev.
    assert flowstate["store"]["lookup_hits"] >= 60 and flowstate["store"]["fallbacks"] == 0
    assert naive["reset"] >= 1, (naive, log)
    assert naive["route_moves"] >= 2
    assert footprint.namespaces and footprint.pids, "on_built saw no namespace or process"
    assert footprint.leftovers() == [], log
    assert took < 150, f"the short scenario took {took:.0f}s"


def lab_workdir(pid: int) -> Path | None:
    """The work dir of the lab run by process `pid` (its owner.pid names it)."""
    for wd in Path("/tmp").glob("flowstate-lab-*"):
        owner = wd / "owner.pid"
        if owner.exists() and owner.read_text().strip() == str(pid):
            return wd
    return None


def _ctrl_c_as_in_a_terminal() -> None:
    """The lab started like from a terminal: SIGINT at its default action.

    A command started with `&` by a non-interactive shell (CI in the background, nohup-like
    launchers) runs with SIGINT ignored, and its children inherit that across exec; Python then
    installs no KeyboardInterrupt handler, so the lab rightly ignores Ctrl-C, as a background
    job should. The lab under test must not depend on how pytest itself was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_tears_everything_down() -> None:
    require_lab_tools()
    args = ["run", "--mode", "flowstate", "--connections", "20", "--quick"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "deploy" / "lab"), *args, "--steps", "move:pop2,move:pop3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,  # before exec, in the child only
    )
    footprint = Footprint()
    output: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if "connections open" in line:
                break
        else:
            pytest.fail("the lab never opened its connections:\n" + "".join(output))
        prefix = f"fs-t{proc.pid}-"
        footprint.note([n for n in os.listdir("/run/netns") if n.startswith(prefix)])
        owned = [
            wd
            for wd in Path("/tmp").glob("flowstate-lab-*")
            if (wd / "owner.pid").exists()
            and (wd / "owner.pid").read_text().strip() == str(proc.pid)
        ]
        footprint.workdir = owned[0] if owned else None
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        output.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(output)
    assert len(footprint.namespaces) >= 10 and footprint.pids
    assert footprint.workdir is not None
    assert footprint.leftovers() == [], "".join(output)
