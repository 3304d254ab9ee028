"""flowstate: anycast connection pinnings shared across POPs through Redis Cluster."""

from flowstate.errors import (
    ConfigError,
    FlowstateError,
    MalformedPacket,
    RecordError,
    StoreError,
    StoreUnavailable,
    UsageError,
)
from flowstate.flow import FiveTuple, Proto, flow_key, key_slot
from flowstate.record import RECORD_VERSION, FlowRecord, decode_record

__all__ = [
    "RECORD_VERSION",
    "ConfigError",
    "FiveTuple",
    "FlowRecord",
    "FlowstateError",
    "MalformedPacket",
    "Proto",
    "RecordError",
    "StoreError",
    "StoreUnavailable",
    "UsageError",
    "decode_record",
    "flow_key",
    "key_slot",
]
__version__ = "0.1.0"
