"""`perf` profiles of one CPU while a benchmark drives it: where the time goes, in text.

Used by `fastpath --profile`: the forwarder CPU is sampled (cpu-clock, call graphs) while a
peer forwards a paced, loss-free load; the report keeps two views, self time by command and
shared object, and inclusive ("children") time of the hottest symbols, which is where the
kernel's AF_PACKET transmit, the receive softirq, the engine and Python each show up.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from benchmarks.framework import BenchmarkError


def available() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(
        ["perf", "record", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"],
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0


def start(cpu: int, data: Path) -> subprocess.Popen[str]:
    """Sample CPU `cpu` with call graphs into `data` until `stop()`."""
    return subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-C", str(cpu), "-g", "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(2)  # SIGINT: perf writes its file and exits
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BenchmarkError("perf record did not stop") from None


def summarize(data: Path, top: int = 45) -> str:
    """Self time by command/object, then inclusive time of the `top` hottest symbols."""
    parts = []
    for title, args in (
        ("self time by command and object", ["--no-children", "--sort", "comm,dso"]),
        ("inclusive time by symbol (children)", ["--children", "--sort", "sym"]),
    ):
        out = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "-g", "none", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [ln for ln in out.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        parts.append(f"## {title}\n" + "\n".join(lines[:top]))
    return "\n\n".join(parts) + "\n"
