"""Where a forwarder process spends its time: `py-spy` samples, Python and C frames, as text.

Used by new_flows and fallback with `--profile`: the daemon is sampled (`--native`, so the
C engine and ring show up by function) while it carries a paced load; the summary keeps
self time and inclusive time of the hottest frames. `--native` pauses the process for each
sample, so the run under the profiler forwards somewhat less than an unprofiled one.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import threading
from pathlib import Path

RATE_HZ = 400


def available() -> bool:
    return shutil.which("py-spy") is not None


class Recording:
    """`py-spy record` of `pid` for `seconds`, started now in the background."""

    def __init__(self, pid: int, seconds: float, raw: Path, delay: float = 0.0) -> None:
        self.raw = raw
        self.error = ""
        cmd = ["py-spy", "record", "-p", str(pid), "-d", str(max(1, round(seconds)))]
        cmd += ["-r", str(RATE_HZ), "--native", "-f", "raw", "-o", str(raw)]
        self._cmd = cmd
        self._delay = delay
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stop = threading.Event()
        stop.wait(self._delay)
        proc = subprocess.run(self._cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            self.error = proc.stderr.strip()[-500:]

    def wait(self) -> None:
        self._thread.join(timeout=150)


def summarize(raw: Path, top: int = 30) -> str:
    """Self and inclusive shares of the hottest frames of a raw (collapsed) py-spy file."""
    if not raw.exists():
        return "no samples\n"
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples at {RATE_HZ} Hz", "", "## self time"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += ["", "## inclusive time"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in inclusive.most_common(top + 15)]
    return "\n".join(lines) + "\n"
