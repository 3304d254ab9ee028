"""The project's exceptions: one root, and one type per party at fault.

Every error flowstate raises on purpose derives from `FlowstateError`, so callers
(the CLI, the forwarder) can catch the project's errors without catching bugs.
"""

from __future__ import annotations


class FlowstateError(Exception):
    """Root of every error raised by flowstate and the forwarder."""


class ConfigError(FlowstateError, ValueError):
    """A configuration value is invalid; `field` names it (dotted path)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UsageError(FlowstateError, ValueError):
    """The caller passed a bad argument (CLI input, API misuse)."""


class RecordError(FlowstateError, ValueError):
    """Bytes read from the store are not a valid flow record (wrong version, type or range)."""


class MalformedPacket(FlowstateError, ValueError):
    """A frame from the wire cannot be parsed; `reason` is the drop counter's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class StoreError(FlowstateError):
    """Root of flow-store failures."""


class StoreUnavailable(StoreError):
    """The store did not answer within its deadline, refused the connection, or is down.

    Raised quickly instead of hanging; the forwarder falls back to Maglev on it.
    """
