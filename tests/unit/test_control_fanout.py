"""Worker 0 waits long enough for another worker's change: that worker replans (its Maglev tables
rebuilt) after its change lock, which a health-check replan or a reload may hold for a while.

Real `Forwarder`s (Python engine, in-process store, no rings) on their control sockets.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from flowstate.control_client import ControlClient
from flowstate.store import MemoryStore
from forwarder.control import PEER_TIMEOUT_S
from forwarder.service import Forwarder, make_engine
from tests.unit.test_cli_control import B2, Running, backend_id, make_config, picks, start, stop


class WatchedLock(asyncio.Lock):
    """An asyncio.Lock that says when someone waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.waited.set()
        return await super().acquire()


async def start_with_lock(tmp_path: Path, worker: int, lock: asyncio.Lock) -> Running:
    config = make_config(tmp_path, workers=2)
    fwd = Forwarder(config, make_engine(config), [], store=MemoryStore(), worker=worker)
    fwd.change_lock = lock
    fwd.operations = True
    task = asyncio.get_running_loop().create_task(fwd.run())
    for _ in range(300):
        if task.done():
            task.result()
        if fwd.config.control.socket.with_name(f"ctl.sock.{worker}").exists():
            break
        await asyncio.sleep(0.01)
    return Running(fwd, task)


async def test_a_change_waits_for_a_busy_worker(tmp_path: Path) -> None:
    lock = WatchedLock()
    w0 = await start(make_config(tmp_path, workers=2), 0)
    w1 = await start_with_lock(tmp_path, 1, lock)
    try:
        await lock.acquire()  # worker 1 is replanning for a health check
        async with await ControlClient.connect(w0.path, timeout=60) as c:
            drain = asyncio.ensure_future(c.drain(B2))
            await asyncio.wait_for(lock.waited.wait(), 30)  # worker 1 has the drain
            # Worker 0 has been waiting for worker 1 since before this: longer than a read's.
            await asyncio.sleep(PEER_TIMEOUT_S + 0.5)
            lock.release()
            answer = await drain
        assert answer["errors"] == [] and sorted(answer["workers"]) == [0, 1]
        for r in (w0, w1):
            assert backend_id(r, B2) not in picks(r)
    finally:
        await stop(w1)
        await stop(w0)
