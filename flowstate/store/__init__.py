"""Flow stores: the `FlowStore` API, the Redis Cluster store and the in-process store."""

from flowstate.store.base import FlowStore, PinItem, ScanEntry, StoreConfig, TlsSettings
from flowstate.store.memory import MemoryStore

__all__ = ["FlowStore", "MemoryStore", "PinItem", "ScanEntry", "StoreConfig", "TlsSettings"]
