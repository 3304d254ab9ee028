"""The data path's one public module: verdict/event codes, `Result`, and the engine loader.

`load_engine("c")` is the C fast path (`forwarder._fastpath`), `load_engine("python")` the pure
Python reference (`forwarder.pyengine`); both implement `Engine` as forwarder/DATAPATH.md says.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, cast

from flowstate.errors import UsageError
from forwarder.packet import REPLY, TP_STATUS_CSUMNOTREADY, Event, Verdict
from forwarder.pyengine import Engine as PyEngine
from forwarder.pyengine import FlowT, Result, flow_hash64

__all__ = [
    "IMPLS",
    "REPLY",
    "TP_STATUS_CSUMNOTREADY",
    "Engine",
    "Event",
    "FlowT",
    "Result",
    "Verdict",
    "c_engine_available",
    "flow_hash64",
    "load_engine",
]

#: Accepted values of `load_engine`'s `impl` (and of the forwarder's `datapath.impl` setting).
IMPLS = ("c", "python")


if TYPE_CHECKING:
    from forwarder._fastpath import EngineAPI as Engine
else:

    class Engine(Protocol):
        """The data-path engine interface; get a class from `load_engine` (DATAPATH.md).

        Its signatures are stated once, for type checkers, as `EngineAPI` in
        forwarder/_fastpath.pyi (the C `Engine` there derives from it).
        """


def _c_engine() -> object | None:
    try:
        module = importlib.import_module("forwarder._fastpath")
    except ImportError:
        return None
    return getattr(module, "Engine", None)


def c_engine_available() -> bool:
    """True when the C extension is built and provides `Engine`."""
    return _c_engine() is not None


def load_engine(impl: str) -> type[Engine]:
    """The engine class for `impl` ("c" or "python").

    Raises UsageError for another name, ImportError when "c" is asked for but the extension is
    not built (or is an older build without `Engine`): rebuild with `pip install -e .`.
    """
    if impl == "python":
        return PyEngine
    if impl == "c":
        engine = _c_engine()
        if engine is None:
            raise ImportError(
                "the C data path (forwarder._fastpath.Engine) is not built; "
                "run `pip install -e .` or choose impl='python'"
            )
        # The extension's class implements the same interface (checked by the golden tests).
        return cast("type[Engine]", engine)
    raise UsageError(f"unknown data path impl {impl!r} (want one of {', '.join(IMPLS)})")
