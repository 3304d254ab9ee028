"""Build `pktgen.c` (generator and counting sink) with gcc, cached by the source's hash.

The benchmarks' other C tools (`pingpong.c`) are built the same way (`compile_cached`); their
shared helpers live in `pkt_common.h`, which is hashed with every source.

The binary lives in `$XDG_CACHE_HOME/flowstate-bench/` (default `~/.cache/...`), never in the
repository; a changed source gets a new file name, so a stale build is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.framework import BenchmarkError

SOURCE = Path(__file__).with_name("pktgen.c")
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
#: Included by every source (`#include "pkt_common.h"`): part of each build's hash.
HEADERS = (Path(__file__).with_name("pkt_common.h"),)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowstate-bench"


def build(cc: str | None = None) -> Path:
    """Path of the compiled pktgen, compiling it first if this source was never built."""
    return compile_cached(SOURCE, "the fastpath benchmark", cc)


def compile_cached(source_path: Path, user: str, cc: str | None = None) -> Path:
    """Path of `source_path` compiled with CFLAGS, cached by the hash of source, HEADERS and
    flags (a benchmark's helper program; `user` names the benchmark in the error without a
    compiler)."""
    compiler = cc or os.environ.get("CC") or "gcc"
    if shutil.which(compiler) is None:
        raise BenchmarkError(f"{compiler} not found: {user} compiles {source_path.name}")
    source = source_path.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source_path.stem}-{digest}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent runs never see a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=f"{source_path.stem}-", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [compiler, *CFLAGS, "-o", tmp, str(source_path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise BenchmarkError(f"compiling {source_path.name} failed:\n{proc.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
