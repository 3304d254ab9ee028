"""A private, frozen copy of the product code to benchmark: what `pip install` would ship.

The work tree is shared: other people rebuild `forwarder/_fastpath*.so` (sometimes with
FLOWSTATE_ASAN=1) and edit Python files while a benchmark runs. So each run copies the
`flowstate` and `forwarder` packages as they are at its start and builds the extension from
those C sources with `setup.py build_ext` (the flags `pip install` uses, never the ASan ones),
in a cache directory keyed by the sources' hash. Processes under test get the copy first on
their PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.framework import BenchmarkError
from benchmarks.pktgen import cache_dir

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flowstate", "forwarder")
_SUFFIXES = (".py", ".pyi", ".c", ".h", ".typed")


def _sources() -> list[Path]:
    files = [REPO / "setup.py", REPO / "pyproject.toml"]
    for pkg in PACKAGES:
        files += sorted(
            p
            for p in (REPO / pkg).rglob("*")
            if p.is_file() and p.suffix in _SUFFIXES and "__pycache__" not in p.parts
        )
    return files


def source_digest() -> str:
    h = hashlib.sha256()
    for path in _sources():
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def snapshot() -> Path:
    """A directory holding `flowstate/` and `forwarder/` (with a fresh `_fastpath` build) as
    they are now; put it first on PYTHONPATH."""
    target = cache_dir() / f"tree-{source_digest()}"
    if (target / "forwarder").is_dir():
        os.utime(target)
        return target
    _prune(keep=4)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tree-", dir=target.parent))
    try:
        # Build from the copy (not the live tree), in place, then drop the build files.
        for path in _sources():
            rel = path.relative_to(REPO)
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, work / rel)
        env = {k: v for k, v in os.environ.items() if k != "FLOWSTATE_ASAN"}
        build = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", ".build"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if build.returncode != 0:
            raise BenchmarkError(f"building forwarder._fastpath failed:\n{build.stderr}")
        for leftover in (".build", "build", "setup.py", "pyproject.toml"):
            path = work / leftover
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        for egg in work.glob("*.egg-info"):
            shutil.rmtree(egg, ignore_errors=True)
        if not list((work / "forwarder").glob("_fastpath*.so")):
            raise BenchmarkError("setup.py build_ext produced no forwarder/_fastpath*.so")
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "forwarder").is_dir():  # not a concurrent run's identical copy
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _prune(keep: int) -> None:
    """Delete all but the `keep` most recently used snapshots."""
    trees = sorted(cache_dir().glob("tree-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in trees[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def pythonpath(tree: Path) -> str:
    """PYTHONPATH for a process under test: the snapshot, then the repository (tests, ...)."""
    return f"{tree}{os.pathsep}{REPO}"
